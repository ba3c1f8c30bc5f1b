"""Pair shards on disk: the sample schema, atomic writes, reading back, and summaries.

A pair-shard folder holds `{split}-{n:06d}.tar` WebDataset shards, `index.parquet` (one row
per stored sample), `rejects.parquet` (one row per input not stored, with the reason) and
`manifest.json`. A sample's members are `{key}.rgb.<ext>`, `{key}.tir.<ext>` and
`{key}.json`. Images are uint8 (TIR: uint8 or uint16) on disk and float32 in [-1, 1] in
memory. This is the only module that knows the tar layout.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

INDEX = "index.parquet"
REJECTS = "rejects.parquet"
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
REJECT_COLUMNS = ("key", "dataset", "rgb_path", "tir_path", "reason")
UMASK = os.umask(0o022)
os.umask(UMASK)


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def write_shard(path: Path, samples: Iterable[dict[str, Any]]) -> int:
    """Write samples (`__key__` plus member name -> bytes) to a tar, atomically.

    The tar is written under a hidden temporary name and renamed when complete, so no
    reader ever sees half a shard. It is not fsynced (that doubles the cost of ingest);
    the index records each shard's size instead, and a resume redoes a shard whose size
    does not match after a system crash. Returns the number of samples written.
    """
    count = 0
    with (
        atomic_output(path, durable=False) as handle,
        tarfile.open(fileobj=handle, mode="w", format=tarfile.GNU_FORMAT) as tar,
    ):
        tar.copybufsize = 1 << 22  # copy each member in one go
        for sample in samples:
            key = sample["__key__"]
            if "." in key or "/" in key:
                raise ValueError(f"sample key {key!r} contains '.' or '/'")
            for member, data in sample.items():
                if member == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{member}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
            count += 1
    return count


def read_shard(path: str | Path) -> Iterator[dict[str, Any]]:
    """Samples of one shard as WebDataset groups them: `__key__` plus member bytes."""
    with open(path, "rb") as stream:
        files = tar_file_expander([{"url": str(path), "stream": stream}])
        yield from group_by_keys(files)


def decode_rgb(data: bytes) -> np.ndarray:
    """RGB member bytes -> (H, W, 3) uint8."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def decode_tir(data: bytes) -> np.ndarray:
    """TIR member bytes -> (H, W) uint8, or uint16 for 16-bit thermal."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode.startswith("I"):
            return np.asarray(image).astype(np.uint16)
        # Gray stored as three equal channels (LLVIP) reduces exactly: Pillow's L weights sum to 1.
        return np.asarray(image.convert("L"))


def write_table(path: Path, rows: list[dict[str, Any]] | pa.Table) -> None:
    """Write a Parquet table atomically."""
    if not isinstance(rows, pa.Table):
        # Columns are the union over rows: metadata columns may differ between datasets.
        names = list(dict.fromkeys(name for row in rows for name in row))
        rows = pa.table({name: [row.get(name) for row in rows] for name in names})
    table = rows
    with atomic_output(path) as handle:
        pq.write_table(table, handle)


def write_rejects(root: str | Path, rows: list[dict[str, Any]]) -> None:
    # Built column by column: Table.from_pylist would import pandas (a quarter second).
    columns = {
        name: pa.array([row.get(name) for row in rows], pa.string()) for name in REJECT_COLUMNS
    }
    write_table(Path(root) / REJECTS, pa.table(columns))


def read_table(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    # One open handle: reading by path may open the file twice and mix two versions of
    # a table that a writer replaced in between.
    with open(path, "rb") as handle:
        return pq.read_table(handle).to_pylist()


def read_index(root: str | Path) -> list[dict[str, Any]]:
    return read_table(Path(root) / INDEX)


def read_rejects(root: str | Path) -> list[dict[str, Any]]:
    return read_table(Path(root) / REJECTS)


def read_manifest(root: str | Path) -> dict[str, Any] | None:
    path = Path(root) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def write_json(path: Path, value: Any) -> None:
    with atomic_output(path) as handle:
        handle.write(json.dumps(value, indent=2, ensure_ascii=False).encode())


def summarize(root: str | Path) -> dict[str, Any]:
    """Counts of a pair-shard folder: by split, dataset and day/night; rejects by reason."""
    rows = read_index(root)
    rejects = read_rejects(root)
    manifest = read_manifest(root) or {}
    return {
        "root": str(root),
        "status": manifest.get("status", "unknown"),
        "pairs": len(rows),
        "shards": len({r["shard"] for r in rows}),
        "by_split": dict(Counter(r["split"] for r in rows)),
        "by_dataset": dict(Counter(r["dataset"] for r in rows)),
        "by_daynight": dict(Counter(r["daynight"] for r in rows)),
        "by_dataset_daynight": dict(Counter(f"{r['dataset']}/{r['daynight']}" for r in rows)),
        "rejects": len(rejects),
        "rejects_by_reason": dict(Counter(reason_kind(r["reason"]) for r in rejects)),
    }


class atomic_output:
    """Context manager: a binary handle on a hidden temp file renamed to `path` on success."""

    def __init__(self, path: Path, durable: bool = True):
        self.path = Path(path)
        self.durable = durable  # fsync before the rename

    def __enter__(self):
        fd, self.tmp = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
        )
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes 0600; give outputs normal permissions
        self.handle = os.fdopen(fd, "wb")
        return self.handle

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.handle.flush()
                if self.durable:
                    os.fsync(self.handle.fileno())
            self.handle.close()
            if exc_type is None:
                os.replace(self.tmp, self.path)
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)


def reason_kind(reason: str) -> str:
    # "missing TIR partner", "truncated or corrupt image data: <detail>" -> text before ':'
    return reason.split(":", 1)[0]
