"""The real RoadScene and LLVIP pairs in ../shared/data (skipped when absent)."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from tirsynth import ingest, shards
from tirsynth.config import IngestConfig


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory):
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "roadscene").is_dir():
        pytest.skip(f"real RoadScene/LLVIP data not found at {SHARED_DATA} (../shared/data)")
    out = tmp_path_factory.mktemp("real") / "data"
    cfg = IngestConfig(
        sources=(str(SHARED_DATA / "roadscene"), str(SHARED_DATA / "llvip")),
        meta=str(SHARED_DATA / "roadscene-daynight.csv"),
        out=str(out),
    )
    ingest.run(cfg)
    return out


def test_shared_data_counts(real_shards):
    summary = shards.summarize(real_shards)
    assert summary["pairs"] == 203
    assert summary["by_daynight"] == {"day": 80, "night": 123}
    assert summary["by_dataset"] == {"roadscene": 171, "llvip": 32}
    assert summary["rejects"] == 0
    index = shards.read_index(real_shards)
    assert len({r["key"] for r in index}) == len(index)


def test_every_stored_image_decodes_to_its_source_pixels(real_shards):
    checked = 0
    for shard in sorted(real_shards.glob("*.tar")):
        for sample in shards.read_shard(shard):
            record = json.loads(sample["json"])
            rgb_member = next(k for k in sample if k.startswith("rgb."))
            tir_member = next(k for k in sample if k.startswith("tir."))
            source_rgb = np.asarray(Image.open(record["rgb_path"]).convert("RGB"))
            source_tir = np.asarray(Image.open(record["tir_path"]))
            if source_tir.ndim == 3:  # LLVIP stores gray thermal in three equal channels
                assert (source_tir == source_tir[..., :1]).all()
                source_tir = source_tir[..., 0]
            assert np.array_equal(shards.decode_rgb(sample[rgb_member]), source_rgb)
            assert np.array_equal(shards.decode_tir(sample[tir_member]), source_tir)
            checked += 1
    assert checked == 203


def test_auto_daynight_agrees_with_hand_labels(shared_data, tmp_path):
    out = tmp_path / "auto"
    ingest.run(
        IngestConfig(sources=(str(shared_data / "roadscene"),), out=str(out), daynight="auto")
    )
    with open(shared_data / "roadscene-daynight.csv") as handle:
        labels = {row["stem"]: row["daynight"] for row in csv.DictReader(handle)}
    rows = shards.read_index(out)
    agree = sum(labels[r["key"].removeprefix("roadscene_")] == r["daynight"] for r in rows)
    assert len(rows) == 171
    assert agree / len(rows) >= 0.90, f"auto day/night agrees on {agree}/{len(rows)}"
