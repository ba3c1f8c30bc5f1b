import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import pair_images, write_csv, write_pair
from PIL import Image

from tirsynth import ingest, shards
from tirsynth.config import IngestConfig


def run(sources, out, **options):
    return ingest.run(IngestConfig(sources=tuple(map(str, sources)), out=str(out), **options))


def stored_samples(out: Path) -> dict[str, dict]:
    """Every sample in the folder's shards by key; fails on a key stored twice."""
    found = {}
    for shard in sorted(out.glob("*.tar")):
        for sample in shards.read_shard(shard):
            assert sample["__key__"] not in found, f"{sample['__key__']} stored twice"
            found[sample["__key__"]] = {**sample, "shard": shard.name}
    return found


def assert_consistent(out: Path) -> list[dict]:
    """index.parquet has exactly one row per stored sample, pointing at its shard."""
    index = shards.read_index(out)
    samples = stored_samples(out)
    assert len(index) == len({r["key"] for r in index})
    assert {r["key"]: r["shard"] for r in index} == {k: s["shard"] for k, s in samples.items()}
    assert {p.name for p in out.glob("*.tar")} == {r["shard"] for r in index}  # none stray
    return index


def test_layouts_in_one_call(tmp_path, roadscene_dir, llvip_dir, kaist_dir):
    meta = write_csv(
        tmp_path / "meta.csv",
        [
            {"stem": "FLIR_00000", "daynight": "day", "weather": "rain"},
            {"stem": "FLIR_00001", "daynight": "night", "weather": ""},
            {"stem": "nobody", "daynight": "day", "weather": ""},
        ],
    )
    result = run(
        [roadscene_dir, llvip_dir, kaist_dir], tmp_path / "out", meta=str(meta), shard_size=4
    )
    index = assert_consistent(tmp_path / "out")
    assert result.added == len(index) == 6 + 6 + 4
    assert result.meta_unmatched == ["nobody"]
    rows = {r["key"]: r for r in index}
    assert rows["roadscene_FLIR_00000"]["daynight"] == "day"
    assert rows["roadscene_FLIR_00000"]["weather"] == "rain"
    assert rows["roadscene_FLIR_00001"]["daynight_source"] == "meta"
    assert rows["roadscene_FLIR_00002"]["daynight"] == "unknown"
    assert rows["llvip_test_019000"]["split"] == "test"
    assert rows["llvip_test_019000"]["daynight"] == "night"
    assert rows["kaist_set09_V000_I00000"]["split"] == "test"
    record = json.loads(stored_samples(tmp_path / "out")["llvip_train_010000"]["json"])
    assert record["annotations"]["objects"][0]["bbox"] == [1.0, 2.0, 11.0, 22.0]
    assert record["width"] == 40 and record["height"] == 32
    manifest = shards.read_manifest(tmp_path / "out")
    assert manifest["status"] == "complete" and manifest["counts"]["pairs"] == 16


def test_stored_pixels_equal_the_sources(tmp_path, roadscene_dir):
    out = tmp_path / "out"
    run([roadscene_dir], out)
    for sample in stored_samples(out).values():
        record = json.loads(sample["json"])
        rgb = shards.decode_rgb(sample["rgb.jpg"])
        tir = shards.decode_tir(sample["tir.jpg"])
        assert np.array_equal(rgb, np.asarray(Image.open(record["rgb_path"]).convert("RGB")))
        assert np.array_equal(tir, np.asarray(Image.open(record["tir_path"]).convert("L")))


@pytest.mark.parametrize("workers", [1, 2], ids=["in-process", "process-pool"])
def test_every_bad_input_is_rejected_and_the_run_goes_on(tmp_path, workers):
    root = tmp_path / "pairs"
    rgb_dir, tir_dir = root / "rgb", root / "tir"
    good = ["plain", "with space", "ünïcode", "sub/plain"]  # sub/plain: same name elsewhere
    for seed, stem in enumerate(good):
        write_pair(rgb_dir / f"{stem}.png", tir_dir / f"{stem}.png", seed)
    # Odd but valid colour inputs convert correctly.
    rgb, tir = pair_images(9)
    rgb.convert("CMYK").save(rgb_dir / "cmyk.jpg")
    tir.save(tir_dir / "cmyk.png")
    rgb.convert("P").save(rgb_dir / "palette.png")
    tir.save(tir_dir / "palette.png")
    Image.fromarray(np.asarray(tir, np.uint16) * 257).save(tir_dir / "deep.png")
    rgb.save(rgb_dir / "deep.webp", lossless=True)
    # The bad ones.
    (rgb_dir / "empty.png").write_bytes(b"")
    tir.save(tir_dir / "empty.png")
    write_pair(rgb_dir / "cut.jpg", tir_dir / "cut.png", 3)
    data = (rgb_dir / "cut.jpg").read_bytes()
    (rgb_dir / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    (rgb_dir / "text.jpg").write_text("this is not an image")
    tir.save(tir_dir / "text.png")
    write_pair(rgb_dir / "huge.png", tir_dir / "huge.png", 4, size=(400, 300))
    write_pair(rgb_dir / "mismatch.png", tir_dir / "other.png", 5)
    tir.resize((20, 16)).save(tir_dir / "mismatch.png")
    tir.save(tir_dir / "orphan.png")
    (rgb_dir / "readme.txt").write_text("notes")

    result = ingest.run(
        IngestConfig(
            rgb_dir=str(rgb_dir),
            tir_dir=str(tir_dir),
            out=str(tmp_path / "out"),
            max_pixels=50_000,
            workers=workers,
            shard_size=2,  # several tasks, some of only rejected pairs
        )
    )
    index = assert_consistent(tmp_path / "out")
    stored = {r["rgb_path"].rsplit("/rgb/", 1)[1] for r in index}
    assert stored == {
        "plain.png",
        "with space.png",
        "ünïcode.png",
        "sub/plain.png",
        "cmyk.jpg",
        "palette.png",
        "deep.webp",
    }
    deep = next(r for r in index if r["rgb_path"].endswith("deep.webp"))
    assert deep["tir_bits"] == 16
    reasons = {
        Path(r["rgb_path"] or r["tir_path"]).name: r["reason"]
        for r in shards.read_rejects(tmp_path / "out")
    }
    assert reasons["empty.png"] == "RGB empty file (0 bytes)"
    assert reasons["cut.jpg"].startswith("RGB truncated or corrupt image")
    assert reasons["text.jpg"].startswith("RGB not an image")
    assert reasons["huge.png"].startswith("RGB image too large")
    assert reasons["mismatch.png"].startswith("size mismatch: RGB 40x32 vs TIR 20x16")
    assert reasons["other.png"] == "missing RGB partner"
    assert reasons["orphan.png"] == "missing RGB partner"
    assert reasons["readme.txt"].startswith("not an image file")
    assert len(result.rejects) == 8


def test_size_mismatch_can_be_resized_explicitly(tmp_path):
    write_pair(tmp_path / "rgb" / "a.png", tmp_path / "tir" / "a.png", 0, size=(40, 32))
    Image.open(tmp_path / "tir" / "a.png").resize((20, 16)).save(tmp_path / "tir" / "a.png")
    ingest.run(
        IngestConfig(
            rgb_dir=str(tmp_path / "rgb"),
            tir_dir=str(tmp_path / "tir"),
            out=str(tmp_path / "out"),
            resize="tir",
        )
    )
    (row,) = assert_consistent(tmp_path / "out")
    assert (row["width"], row["height"]) == (40, 32)
    assert row["tir_conversion"] == "resized 20x16->40x32"


def test_rerun_adds_nothing_and_another_dataset_needs_overwrite(tmp_path, roadscene_dir, llvip_dir):
    out = tmp_path / "out"
    first = run([roadscene_dir], out)
    files = sorted(p.name for p in out.iterdir())
    again = run([roadscene_dir], out)
    assert (first.added, again.added, again.pairs) == (6, 0, 6)
    assert sorted(p.name for p in out.iterdir()) == files
    with pytest.raises(FileExistsError, match="--overwrite"):
        run([llvip_dir], out)
    replaced = run([llvip_dir], out, overwrite=True)
    assert replaced.pairs == 6
    assert {r["dataset"] for r in assert_consistent(out)} == {"llvip"}


def test_non_ingest_folder_is_not_overwritten(tmp_path, roadscene_dir):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        run([roadscene_dir], tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "precious.txt").exists()


def test_split_is_a_stable_function_of_the_key():
    keys = [f"roadscene_FLIR_{i:05d}" for i in range(2000)]
    splits = [ingest.hash_split(k, (0.8, 0.1, 0.1)) for k in keys]
    assert splits == [ingest.hash_split(k, (0.8, 0.1, 0.1)) for k in keys]
    counts = Counter(splits)
    assert 1500 < counts["train"] < 1700 and 140 < counts["val"] < 260
    # Pinned: a dataset ingested by any version lands in the same splits.
    pinned = {"00000": "train", "00007": "train", "00014": "val", "00021": "train"}
    pinned |= {"00049": "test", "00070": "test", "00182": "val", "00252": "test"}
    for number, split in pinned.items():
        assert ingest.hash_split(f"roadscene_FLIR_{number}", (0.8, 0.1, 0.1)) == split


def test_auto_daynight_is_recorded_as_an_estimate(tmp_path, roadscene_dir):
    run([roadscene_dir], tmp_path / "out", daynight="auto")
    sources = {r["daynight_source"] for r in shards.read_index(tmp_path / "out")}
    assert sources == {"auto"}
    record = json.loads(next(iter(stored_samples(tmp_path / "out").values()))["json"])
    assert "daynight_sky_luma" in record


def test_killed_ingest_resumes_without_duplicates_or_gaps(tmp_path):
    rgb_dir, tir_dir = tmp_path / "rgb", tmp_path / "tir"
    total = 240
    for i in range(total):
        write_pair(rgb_dir / f"{i:04d}.png", tir_dir / f"{i:04d}.png", i, size=(160, 120))
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "tirsynth.cli",
        "ingest",
        "--rgb",
        str(rgb_dir),
        "--tir",
        str(tir_dir),
        "--out",
        str(out),
        "--shard-size",
        "2",
        "--verify",
        "full",
        "--workers",
        "2",
    ]
    process = subprocess.Popen(
        command, start_new_session=True, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while not shards.read_index(out) if (out / shards.INDEX).exists() else True:
        assert process.poll() is None, "ingest ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)  # the parent and its workers, mid-run
    process.wait()
    done_at_kill = len(shards.read_index(out))
    assert 0 < done_at_kill < total, "the kill did not land mid-run"
    assert shards.read_manifest(out)["status"] == "incomplete"
    # No half-written shard is visible, and every committed row points at its sample.
    # (A shard finished but not yet committed is complete; the resume removes it.)
    stored = stored_samples(out)
    assert all(stored[r["key"]]["shard"] == r["shard"] for r in shards.read_index(out))

    subprocess.run(command, check=True, capture_output=True)
    index = assert_consistent(out)
    assert len(index) == total
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert shards.read_manifest(out)["status"] == "complete"


def test_each_shard_commits_its_own_index_fragment(tmp_path):
    """Committing a shard writes that shard's rows only (the cost stays flat as the index
    grows), and the folder of fragments reads as one table with one schema."""
    rgb_dir, tir_dir = tmp_path / "rgb", tmp_path / "tir"
    for i in range(12):
        write_pair(rgb_dir / f"{i:03d}.png", tir_dir / f"{i:03d}.png", i)
    meta = tmp_path / "meta.csv"
    meta.write_text("stem,site\n000,north\n")  # one pair only has the metadata column
    out = tmp_path / "out"
    cfg = IngestConfig(rgb_dir=str(rgb_dir), tir_dir=str(tir_dir), meta=str(meta), out=str(out),
                       shard_size=1, workers=1)  # fmt: skip
    ingest.run(cfg)
    parts = shards.fragments(out / shards.INDEX)
    assert len(parts) == 12 == len(list(out.glob("*.tar")))
    assert {p.stem + ".tar" for p in parts} == {p.name for p in out.glob("*.tar")}
    assert all(pq.read_metadata(p).num_rows == 1 for p in parts)
    schemas = {pq.read_schema(p) for p in parts}
    assert len(schemas) == 1 and schemas.pop().field("site").type == pa.string()
    table = pq.read_table(out / shards.INDEX)  # pyarrow.dataset under the hood
    assert table.num_rows == 12 and table.column("site").null_count == 11
    keys = sorted(r["key"] for r in shards.read_index(out))
    assert sorted(table.column("key").to_pylist()) == keys


def test_an_index_file_of_an_older_run_becomes_fragments_on_resume(tmp_path):
    rgb_dir, tir_dir = tmp_path / "rgb", tmp_path / "tir"
    for i in range(6):
        write_pair(rgb_dir / f"{i:03d}.png", tir_dir / f"{i:03d}.png", i)
    out = tmp_path / "out"
    cfg = IngestConfig(rgb_dir=str(rgb_dir), tir_dir=str(tir_dir), out=str(out), shard_size=2,
                       workers=1)  # fmt: skip
    ingest.run(cfg)
    rows = shards.read_index(out)
    shutil.rmtree(out / shards.INDEX)
    shards.write_table(out / shards.INDEX, rows)  # the single-file layout of older runs
    assert ingest.run(cfg).added == 0
    assert (out / shards.INDEX).is_dir()
    assert sorted(map(str, shards.read_index(out))) == sorted(map(str, rows))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_full_disk_stops_with_a_message_and_a_rerun_finishes(tmp_path, workers):
    rgb_dir, tir_dir = tmp_path / "rgb", tmp_path / "tir"
    for i in range(130):
        write_pair(rgb_dir / f"{i:03d}.png", tir_dir / f"{i:03d}.png", i, size=(96, 64))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "tirsynth.cli", "ingest", "--rgb", str(rgb_dir)]
    command += ["--tir", str(tir_dir), "--out", str(out), "--workers", workers]

    def small_disk():  # files past 200 kB fail to grow (EFBIG), like a full disk
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    stopped = subprocess.run(command, capture_output=True, text=True, preexec_fn=small_disk)
    assert stopped.returncode == 1
    assert "File too large" in stopped.stderr and "run the same command again" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    subprocess.run(command, check=True, capture_output=True)
    assert len(assert_consistent(out)) == 130
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
