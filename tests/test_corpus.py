import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tirsynth import corpus
from tirsynth.corpus import discover_corpus, read_listing_group, write_listing


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def listed_rows(listing):
    rows = []
    for group in range(listing.groups):
        columns = read_listing_group(listing.folder, listing.file_groups, group)
        rows += [
            dict(zip(columns, values, strict=True))
            for values in zip(*columns.values(), strict=True)
        ]
    return rows


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 rows, so that a handful of files crosses every chunk boundary."""
    monkeypatch.setattr(corpus, "LISTING_CHUNK_ROWS", 3)


def test_listing_streams_every_pending_image_once_in_row_groups(tmp_path, small_chunks):
    source = tmp_path / "in"
    for i in range(11):
        touch(source / f"d{i % 2}" / f"im{i:02d}.png")
    touch(source / "notes.txt")
    done = pa.array(["d0_im00", "d1_im05"], pa.string())
    listing = write_listing(discover_corpus(source), tmp_path / "listing", done, 2, file_groups=2)
    rows = listed_rows(listing)
    keys = [row["key"] for row in rows]
    assert len(keys) == len(set(keys)) == listing.images == 9
    assert "d0_im00" not in keys and "d1_im05" not in keys
    assert listing.groups == 5  # groups of 2 images; files of 2 groups, the last one short
    assert sorted(p.name for p in listing.folder.iterdir()) == [
        "part-000000.parquet", "part-000001.parquet", "part-000002.parquet"
    ]  # fmt: skip
    assert [pq.ParquetFile(p).metadata.num_row_groups for p in sorted(listing.folder.iterdir())] \
        == [2, 2, 1]  # fmt: skip
    assert [r["reason"] for r in listing.rejects] == ["not an image file"]
    row = next(r for r in rows if r["key"] == "d1_im03")
    assert row["path"] == str(source / "d1" / "im03.png") and row["relpath"] == "d1/im03.png"


def test_colliding_keys_get_full_path_keys_across_chunks(tmp_path, small_chunks):
    source = tmp_path / "in"
    for name in ("a.jpg", "b.png", "c.png", "d.png", "e.png", "a.png"):
        touch(source / name)
    listing = write_listing(discover_corpus(source), tmp_path / "l", pa.array([], pa.string()), 4)
    keys = sorted(row["key"] for row in listed_rows(listing))
    expected = sorted(i.key for i in discover_corpus(source).images())
    assert keys == expected and len(set(keys)) == 6
    assert "a" not in keys and any(k.startswith("a_jpg") for k in keys)


def test_yolo_labels_without_an_image_are_found_folder_by_folder(tmp_path):
    touch(tmp_path / "images" / "s" / "x.JPG")
    touch(tmp_path / "labels" / "s" / "x.txt", b"0 0.5 0.5 0.1 0.1\n")
    touch(tmp_path / "labels" / "s" / "orphan.txt", b"")
    found = discover_corpus(tmp_path)
    assert found.kind == "yolo"
    assert [json.loads(i.labels)["yolo"] for i in found.images()] == ["0 0.5 0.5 0.1 0.1\n"]
    rejects = [e for e in found.entries() if not isinstance(e, corpus.InputImage)]
    assert [r["reason"] for r in rejects] == ["labels without an image"]


def test_an_empty_split_of_pair_shards_is_an_error(learnable_shards):
    with pytest.raises(ValueError, match="no pair samples in split 'nope'"):
        discover_corpus(learnable_shards, split="nope")
    assert {json.loads(i.labels)["split"] for i in
            discover_corpus(learnable_shards, split="val").images()} == {"val"}  # fmt: skip
