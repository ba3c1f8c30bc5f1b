import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from tirsynth import shards


def samples(n):
    return [
        {
            "__key__": f"k{i}",
            "rgb.jpg": bytes([i]) * 10,
            "tir.png": b"t" * i,
            "json": json.dumps({"i": i}).encode(),
        }
        for i in range(n)
    ]


def test_write_then_read_round_trip(tmp_path):
    path = tmp_path / shards.shard_name("train", 0)
    assert path.name == "train-000000.tar"
    assert shards.write_shard(path, samples(5)) == 5
    back = list(shards.read_shard(path))
    assert [s["__key__"] for s in back] == [f"k{i}" for i in range(5)]
    assert back[3]["rgb.jpg"] == bytes([3]) * 10 and back[3]["tir.png"] == b"ttt"
    # The shard is a plain WebDataset: the library reads it as it is.
    loaded = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [json.loads(s["json"])["i"] for s in loaded] == list(range(5))
    assert [p.name for p in tmp_path.iterdir()] == ["train-000000.tar"]  # no temp left


def test_keys_with_dots_are_refused(tmp_path):
    with pytest.raises(ValueError, match="contains"):
        shards.write_shard(tmp_path / "x.tar", [{"__key__": "a.b", "json": b"{}"}])
    assert list(tmp_path.iterdir()) == []  # the failed write left nothing behind


def test_parquet_tables_take_the_union_of_columns(tmp_path):
    shards.write_table(tmp_path / "t.parquet", [{"a": 1}, {"a": 2, "b": "x"}])
    assert shards.read_table(tmp_path / "t.parquet") == [{"a": 1, "b": None}, {"a": 2, "b": "x"}]


def test_rejects_keep_their_schema_when_empty(tmp_path):
    shards.write_rejects(tmp_path, [])
    assert shards.read_rejects(tmp_path) == []


def test_decode_tir_8bit_scales_16_bit_and_keeps_8_bit():
    values = np.array([[0, 257, 300], [65535, 128, 1000]], dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    assert shards.decode_tir_8bit(buffer.getvalue()).tolist() == [[0, 1, 1], [255, 0, 4]]
    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.uint8)).save(buffer, format="PNG")
    assert shards.decode_tir_8bit(buffer.getvalue()).dtype == np.uint8
