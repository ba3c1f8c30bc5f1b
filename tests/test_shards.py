import io
import json
import math
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from tirsynth import shards, tables


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


@pytest.mark.parametrize("count", [0, 1, 7, 40])
@pytest.mark.parametrize("batch", ["one-write", "many-writes"])
def test_shards_are_byte_identical_to_tarfile_archives(tmp_path, monkeypatch, count, batch):
    if batch == "many-writes":  # flushed by size and by buffer count, mid-sample
        monkeypatch.setattr(shards, "WRITE_BATCH_BYTES", 700)
        monkeypatch.setattr(shards, "WRITE_BATCH_BUFFERS", 4)
    # Member names around the header's 100-byte name field, and a GNU long name.
    edge = [{"__key__": "n" * n, "json": b"x" * n} for n in (93, 94, 95, 96, 160)]
    written = samples(count) + edge
    shards.write_shard(tmp_path / "s.tar", written)
    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for sample in written:
            for member, data in sample.items():
                if member != "__key__":
                    info = tarfile.TarInfo(f"{sample['__key__']}.{member}")
                    info.size, info.mode, info.mtime = len(data), 0o644, 0
                    tar.addfile(info, io.BytesIO(data))
    assert (tmp_path / "s.tar").read_bytes() == expected.getvalue()


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
    schema = pq.read_schema(shards.fragments(tmp_path / shards.REJECTS)[0])
    assert schema.names == list(shards.REJECT_COLUMNS)
    assert set(schema.types) == {pa.string()}


def test_tables_from_rows_equal_what_pyarrow_builds():
    rows = [
        {"s": "x", "i": 1, "f": 1.5, "b": True, "none": None, "mixed": 1},
        {"s": None, "i": None, "f": float("nan"), "b": None, "u": "é, 日本", "mixed": 2.5},
        {"s": "", "i": -(2**63), "f": float("inf"), "b": False, "mixed": None},
        {"s": "long " * 50, "i": 2**63 - 1, "f": None, "b": True, "tags": ["a", "b"]},
    ]
    built = tables.from_rows(rows)
    names = list(dict.fromkeys(n for row in rows for n in row))
    expected = pa.table({n: [row.get(n) for row in rows] for n in names})
    assert built.schema == expected.schema
    for name in names:  # column by column: NaN != NaN in Table.equals
        built[name].validate(full=True)
        assert built[name].to_pylist() == expected[name].to_pylist() or name == "f"
    assert built["f"].to_pylist()[0] == 1.5 and math.isnan(built["f"].to_pylist()[1])


def test_ingest_and_info_never_import_pandas(tmp_path, roadscene_dir):
    # pandas (via pyarrow's Python conversions and pyarrow.dataset) costs every run 0.14 s
    # and 20 MB, and makes ingest's forks dearer.
    script = (
        "import os, sys, tirsynth.cli as cli\n"
        "from click.testing import CliRunner\n"
        f"r = CliRunner().invoke(cli.cli, ['ingest', {str(roadscene_dir)!r}, '--out', "
        f"{str(tmp_path / 'out')!r}, '--workers', '2'])\n"
        "assert r.exit_code == 0, r.output\n"
        f"r = CliRunner().invoke(cli.cli, ['info', {str(tmp_path / 'out')!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(sorted(m for m in ('pandas', 'torch', 'pyarrow.dataset') if m in sys.modules))\n"
        "sys.stdout.flush(); os._exit(0)\n"  # as the CLI leaves (see cli.main)
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_decode_tir_8bit_scales_16_bit_and_keeps_8_bit():
    values = np.array([[0, 257, 300], [65535, 128, 1000]], dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    assert shards.decode_tir_8bit(buffer.getvalue()).tolist() == [[0, 1, 1], [255, 0, 4]]
    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.uint8)).save(buffer, format="PNG")
    assert shards.decode_tir_8bit(buffer.getvalue()).dtype == np.uint8


def test_read_samples_reads_the_wanted_samples_only(tmp_path):
    path = tmp_path / "s.tar"
    shards.write_shard(path, samples(6))
    found = shards.read_samples(path, {"k1", "k4", "missing"})
    every = {s["__key__"]: s for s in shards.read_shard(path)}
    for sample in every.values():
        del sample["__url__"]  # where WebDataset read it from
    assert found == {"k1": every["k1"], "k4": every["k4"]}


def test_pair_counts_of_an_arrow_index_equal_those_of_its_rows():
    rows = [
        {"split": s, "dataset": d, "daynight": n, "shard": f"{s}-{i // 3}.tar"}
        for i, (s, d, n) in enumerate(
            [("train", "a", "day"), ("train", "a", "day"), ("val", "b", "night"),
             ("test", "a", "unknown"), ("train", "b", "day")]
        )
    ]  # fmt: skip
    by_rows, by_table = shards.PairCounts(), shards.PairCounts()
    by_rows.add(rows)
    by_table.add_table(tables.from_rows(rows))
    by_table.add_table(pa.table({"key": pa.array([], pa.string())}))  # a new folder's index
    assert by_table.groups == by_rows.groups and by_table.shards == by_rows.shards
    assert by_table.pairs == 5


def test_read_arrow_of_a_missing_table_has_the_asked_columns(tmp_path):
    table = shards.read_arrow(tmp_path / shards.INDEX, ["key", "shard"])
    assert table.column_names == ["key", "shard"] and len(table) == 0
