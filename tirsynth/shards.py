"""Pair shards on disk: the sample schema, atomic writes, reading back, and summaries.

A pair-shard folder holds `{split}-{n:06d}.tar` WebDataset shards, `index.parquet` (one row
per stored sample), `rejects.parquet` (one row per input not stored, with the reason) and
`manifest.json`. A sample's members are `{key}.rgb.<ext>`, `{key}.tir.<ext>` and
`{key}.json`. Images are uint8 (TIR: uint8 or uint16) on disk and float32 in [-1, 1] in
memory. This is the only module that knows the tar layout.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from tirsynth import tables

INDEX = "index.parquet"
REJECTS = "rejects.parquet"
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
REJECT_COLUMNS = ("key", "dataset", "rgb_path", "tir_path", "reason")
WRITE_BATCH_BYTES = 1 << 20
WRITE_BATCH_BUFFERS = 512  # well under IOV_MAX (1024 on Linux)
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
    with atomic_output(path, durable=False) as handle:
        batch = _WriteBatch(handle.fileno())
        for sample in samples:
            key = sample["__key__"]
            if "." in key or "/" in key:
                raise ValueError(f"sample key {key!r} contains '.' or '/'")
            for member, data in sample.items():
                if member != "__key__":
                    batch.add(tar_header(f"{key}.{member}", len(data)))
                    batch.add(data)
                    batch.add(tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE))
            count += 1
        # The end of archive as TarFile.close writes it: two zero blocks, then zeros up to
        # a whole record.
        end = 2 * tarfile.BLOCKSIZE
        end += -(batch.written + end) % tarfile.RECORDSIZE
        batch.add(tarfile.NUL * end)
        batch.flush()
    return count


class _WriteBatch:
    """Buffers written with one writev per WRITE_BATCH_BYTES.

    Each write to a file costs a fixed amount in the kernel (ext4 updates the inode's
    times under a journal handle): one writev per tar member made ingest's writes twice as
    slow as batches of about a megabyte. Larger batches gain nothing and hold more memory.
    """

    def __init__(self, fd: int):
        self.fd, self.buffers, self.pending, self.written = fd, [], 0, 0

    def add(self, data: bytes) -> None:
        self.buffers.append(data)
        self.pending += len(data)
        self.written += len(data)
        if self.pending >= WRITE_BATCH_BYTES or len(self.buffers) >= WRITE_BATCH_BUFFERS:
            self.flush()

    def flush(self) -> None:
        done = os.writev(self.fd, self.buffers) if self.buffers else 0
        if done < self.pending:  # a short write (signal, full disk): finish what is left
            rest = memoryview(b"".join(self.buffers))[done:]
            while rest:
                rest = rest[os.write(self.fd, rest) :]
        self.buffers, self.pending = [], 0


def _header_template() -> tuple[bytes, int]:
    info = tarfile.TarInfo("")
    info.mode, info.mtime = 0o644, 0
    header = info.tobuf(tarfile.GNU_FORMAT)
    return header, sum(header[:148]) + sum(header[156:]) + 8 * ord(" ")


HEADER_TEMPLATE, TEMPLATE_CHECKSUM = _header_template()


def tar_header(name: str, size: int) -> bytes:
    """The GNU tar header `tarfile` writes for a regular file (mode 644, mtime 0).

    tarfile builds it field by field in Python, a third of ingest's per-pair cost; here
    only the name, size and checksum of a header tarfile made are filled in. Names too
    long for the header and sizes past 8 GiB go through tarfile itself.
    """
    encoded = name.encode()
    if len(encoded) >= tarfile.LENGTH_NAME or size >= 8**11:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o644, 0
        return info.tobuf(tarfile.GNU_FORMAT)
    size_field = b"%011o\0" % size
    header = bytearray(HEADER_TEMPLATE)
    header[: len(encoded)] = encoded
    header[124:136] = size_field
    # The template's name is empty and its size field is "00000000000\0".
    checksum = TEMPLATE_CHECKSUM + sum(encoded) + sum(size_field) - sum(b"00000000000\0")
    header[148:155] = b"%06o\0" % checksum
    return bytes(header)


def read_shard(path: str | Path) -> Iterator[dict[str, Any]]:
    """Samples of one shard as WebDataset groups them: `__key__` plus member bytes."""
    # Imported here: webdataset imports torch (a second), which ingest and info never need.
    from webdataset.tariterators import group_by_keys, tar_file_expander

    with open(path, "rb") as stream:
        files = tar_file_expander([{"url": str(path), "stream": stream}])
        yield from group_by_keys(files)


def read_samples(path: str | Path, keys: set[str]) -> dict[str, dict[str, Any]]:
    """The samples of `keys` in one shard, reading only their members' bytes: the tar's
    headers say where each member lies, and the others are skipped, not read."""
    found: dict[str, dict[str, Any]] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            key, _, suffix = member.name.partition(".")
            if member.isfile() and key in keys:
                sample = found.setdefault(key, {"__key__": key})
                sample[suffix] = tar.extractfile(member).read()
    return found


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


def decode_tir_8bit(data: bytes) -> np.ndarray:
    """A TIR image as (H, W) uint8: 16-bit TIR is scaled (65535 / 255 = 257) and rounded,
    so metrics compare it on the same 8-bit scale as generated images."""
    pixels = decode_tir(data)
    if pixels.dtype == np.uint16:
        return (pixels / 257).round().astype(np.uint8)
    return pixels


def rejects_by_reason(rejects: list[dict[str, Any]]) -> Counter:
    """How many rejects of each kind (the reason's text before any ':')."""
    return Counter(reason_kind(r["reason"]) for r in rejects)


def write_table(
    path: Path,
    rows: list[dict[str, Any]] | pa.Table,
    schema: pa.Schema | None = None,
    row_group_size: int | None = None,
) -> None:
    """Write a Parquet table atomically; rows become columns named by the union of their
    keys (metadata columns may differ between datasets), typed by `schema` where it names
    them, so that fragments of one table agree even where a column is all null."""
    if isinstance(rows, pa.Table):
        table = rows
    elif schema is None:
        table = tables.from_rows(rows)
    else:
        table = tables.from_rows(rows, schema)
    # Serialised in memory, then one write: pyarrow writing to a Python file object calls
    # back into Python for every chunk (a third slower for an index of a few hundred rows).
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_size)
    with atomic_output(path) as handle:
        handle.write(sink.getvalue())


def write_fragment(
    out: Path, table: str, name: str, rows: list[dict[str, Any]], schema: pa.Schema | None = None
) -> Path:
    """Rows as the fragment `out/<table>/<name>.parquet`, atomically.

    A table (index.parquet, rejects.parquet) is a folder of fragments, one per shard,
    written by the worker that wrote the shard, right after it: committing a shard costs
    the same at the millionth shard as at the first. pyarrow, pandas and Ray Data read the
    folder as one table.
    """
    folder = out / table
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.parquet"
    write_table(path, rows, schema)
    return path


def write_rejects(
    root: str | Path,
    rows: list[dict[str, Any]],
    names: tuple[str, ...] = REJECT_COLUMNS,
    fragment: str = "listing",
) -> None:
    """Reject rows as one fragment of rejects.parquet (by default the one for rejects found
    before any shard is written), every column a string so that readers see one schema."""
    schema = pa.schema([(name, pa.string()) for name in names])
    write_fragment(Path(root), REJECTS, fragment, [{n: r.get(n) for n in names} for r in rows],
                   schema)  # fmt: skip


def read_table(path: Path, columns: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of a table: a folder of fragments, or a single Parquet file (older runs)."""
    return read_arrow(path, columns).to_pylist()


class DamagedFile(ValueError):
    """A file tirsynth wrote is truncated, corrupt or gone; the message names it and says
    that running the command that wrote it again repairs it."""


def damaged(path: Path, what: str, error: object) -> DamagedFile:
    folder = path.parent.parent if path.parent.name in (INDEX, REJECTS) else path.parent
    return DamagedFile(
        f"{path}: {what} ({error}); run the command that wrote {folder} again with the "
        "same options: it removes what is damaged and redoes those items, nothing else"
    )


def read_arrow(
    path: Path, columns: list[str] | None = None, skip_damaged: list[Path] | None = None
) -> pa.Table:
    """A table (folder of fragments, or one Parquet file) as Arrow columns: a tenth of the
    memory of its rows as Python dicts, for what reads a whole corpus's index.

    Raises:
        DamagedFile: a fragment cannot be read; with `skip_damaged`, such fragments are
            appended to it and left out instead.
    """
    if path.is_dir():
        parts = []
        for fragment in fragments(path):
            try:
                parts.append(_read_parquet(fragment, columns))
            except DamagedFile:
                if skip_damaged is None:
                    raise
                skip_damaged.append(fragment)
        if parts:
            return pa.concat_tables(parts, promote_options="permissive")
        return _empty_table(columns or [])
    if not path.exists():
        return _empty_table(columns or [])
    return _read_parquet(path, columns)


def _empty_table(columns: list[str]) -> pa.Table:
    # Not pa.array([]) or Schema.empty_table(): those ask pyarrow's pandas shim, which
    # imports pandas (see `tables`).
    return pa.Table.from_batches([], pa.schema([(name, pa.string()) for name in columns]))


def fragments(table: Path) -> list[Path]:
    """A table folder's committed fragments (temporary files start with a dot)."""
    return sorted(p for p in table.glob("*.parquet") if not p.name.startswith("."))


def _read_parquet(path: Path, columns: list[str] | None) -> pa.Table:
    # One open handle: reading by path may open the file twice and mix two versions of
    # a table that a writer replaced in between.
    try:
        with open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            if columns is not None:
                columns = [c for c in columns if c in parquet.schema_arrow.names]
            return parquet.read(columns=columns)
    except (pa.ArrowException, EOFError) as error:
        raise damaged(path, "damaged Parquet file", error) from error


def read_index(root: str | Path, columns: list[str] | None = None) -> list[dict[str, Any]]:
    return read_table(Path(root) / INDEX, columns)


def read_rejects(root: str | Path) -> list[dict[str, Any]]:
    return read_table(Path(root) / REJECTS)


def read_manifest(root: str | Path) -> dict[str, Any] | None:
    path = Path(root) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise DamagedFile(
            f"{path}: damaged ({error}); move {path.parent} aside and run the command again"
        ) from error


def write_json(path: Path, value: Any) -> None:
    with atomic_output(path) as handle:
        handle.write(json.dumps(value, indent=2, ensure_ascii=False).encode())


COUNTED = ("shard", "split", "dataset", "daynight")  # the index columns counts need
VALUE_ROWS_BATCH = 1 << 16


def value_rows(table: pa.Table, names: Sequence[str]) -> Iterator[tuple]:
    """The values of columns `names`, row by row as tuples, converted a batch at a time (so
    that a large table is never all Python objects at once). Not pyarrow.compute: its first
    call imports pandas (see `tables`), which ingest and info do without."""
    for batch in table.select(list(names)).to_batches(max_chunksize=VALUE_ROWS_BATCH):
        yield from zip(*(batch.column(name).to_pylist() for name in names), strict=True)


def summarize(root: str | Path) -> dict[str, Any]:
    """Counts of a pair-shard folder: by split, dataset and day/night; rejects by reason."""
    status = (read_manifest(root) or {}).get("status", "unknown")
    counts = PairCounts()
    index = read_arrow(Path(root) / INDEX, [*COUNTED, "shard_bytes"])
    counts.add_table(index)
    summary = count_pairs(root, counts, read_rejects(root), status)
    summary["damaged_shards"] = damaged_shards(Path(root), index)
    if summary["damaged_shards"]:
        summary["status"] = f"damaged (was {status})"
    return summary


class PairCounts:
    """Running counts of index rows by split, dataset and day/night, so that a run's
    summary needs no rows kept in memory."""

    def __init__(self) -> None:
        self.groups: Counter = Counter()  # (split, dataset, daynight) -> pairs
        self.shards: set[str] = set()

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self.groups[row["split"], row["dataset"], row["daynight"]] += 1
            self.shards.add(row["shard"])

    def add_table(self, index: pa.Table) -> None:
        """An index read as Arrow (see `read_arrow`), a batch of rows at a time."""
        if len(index):
            self.add(dict(zip(COUNTED, row, strict=True)) for row in value_rows(index, COUNTED))

    @property
    def pairs(self) -> int:
        return sum(self.groups.values())


def count_pairs(
    root: str | Path, counts: PairCounts, rejects: list[dict[str, Any]], status: str
) -> dict[str, Any]:
    """The summary `info` prints and the manifest records."""

    def by(*fields: int) -> dict[str, int]:
        total: Counter = Counter()
        for group, n in counts.groups.items():
            total["/".join(str(group[i]) for i in fields)] += n
        return dict(total)

    return {
        "root": str(root),
        "status": status,
        "pairs": counts.pairs,
        "shards": len(counts.shards),
        "by_split": by(0),
        "by_dataset": by(1),
        "by_daynight": by(2),
        "by_dataset_daynight": by(1, 2),
        "rejects": len(rejects),
        "rejects_by_reason": dict(rejects_by_reason(rejects)),
    }


def prepare_output(
    out: Path,
    fingerprint: str,
    overwrite: bool,
    shard_prefixes: tuple[str, ...],
    stage: str,
    extra_files: tuple[str, ...] = (),
) -> list[dict]:
    """Check that `out` is empty or holds this same run; clear what a killed run left.

    Args:
        out: the output folder (it exists).
        fingerprint: what identifies the run's inputs and options (see manifest.json).
        overwrite: replace a different run's files (never files tirsynth did not write).
        shard_prefixes: shard names this stage writes, `{prefix}-{n:06d}.tar`.
        stage: "ingest" or "generate", for messages.
        extra_files: other file names this stage writes in `out`.

    Returns:
        The index, as Arrow, of the shards that are intact (empty for a new or replaced
        folder).
    """

    def is_ours(path: Path) -> bool:
        name = path.name
        return (
            name in (INDEX, REJECTS, MANIFEST, *extra_files)
            or (name.endswith(".tar") and name.rsplit("-", 1)[0] in shard_prefixes)
            or (name.startswith(".") and name.endswith(".tmp"))
        )

    manifest = read_manifest(out)
    ours = [p for p in out.iterdir() if is_ours(p)]
    foreign = [p for p in out.iterdir() if not is_ours(p) and not p.name.endswith(".lock")]
    same = manifest is not None and manifest.get("fingerprint") == fingerprint
    if not same and (ours or foreign):
        if not overwrite:
            what = f"a different {stage}" if manifest else f"files that are not a {stage}"
            raise FileExistsError(
                f"{out} already holds {what}; pass --overwrite to replace it, or choose "
                "another --out"
            )
        if foreign:
            raise FileExistsError(
                f"{out} holds files tirsynth did not write ({foreign[0].name}, ...); "
                "refusing to clear it"
            )
        for path in ours:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        return _empty_table(["key"])
    for table in (INDEX, REJECTS):
        _split_into_fragments(out, table)
    broken_fragments: list[Path] = []
    index = read_arrow(out / INDEX, skip_damaged=broken_fragments)
    read_arrow(out / REJECTS, ["key"], skip_damaged=broken_fragments)
    for fragment in broken_fragments:  # their shard is then an orphan: redone below
        print(f"repairing {out}: removed damaged {fragment.parent.name}/{fragment.name}; "
              "its items are done again")  # fmt: skip
        fragment.unlink()
    if not len(index):
        index = _empty_table(["key"])
    intact, broken = set(), set()
    shard_sizes = set(value_rows(index, ["shard", "shard_bytes"])) if len(index) else set()
    for shard, size in shard_sizes:
        if file_size(out / shard) == size:
            intact.add(shard)
        elif shard not in broken:  # a system crash can leave a renamed but unflushed shard
            broken.add(shard)
            (out / INDEX / f"{Path(shard).stem}.parquet").unlink()  # its samples are redone
    if broken:
        index = index.filter(pc.is_in(index["shard"], pa.array(sorted(intact), pa.string())))
    remove_temporaries(out)  # in every subfolder: fragments, grids, a listing
    for path in ours:
        if path.exists() and path.suffix == ".tar" and path.name not in intact:
            path.unlink()  # an orphan: its samples are redone
    return index


def _split_into_fragments(out: Path, table: str) -> None:
    """An index or rejects file of an older tirsynth becomes a folder of fragments (one
    per shard), so that a resumed run commits as new ones do."""
    path = out / table
    if not path.is_file():
        return
    rows = read_table(path)
    staging = out / f".{table}.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    by_shard: dict[str, list[dict]] = {}
    for row in rows:
        by_shard.setdefault(Path(row.get("shard") or "listing").stem, []).append(row)
    for name, members in by_shard.items():
        write_table(staging / f"{name}.parquet", members)
    old = out / f".{table}.old.tmp"
    os.replace(path, old)
    os.replace(staging, path)
    old.unlink()


def next_shard_number(out: Path, prefix: str) -> int:
    numbers = [int(p.stem.rsplit("-", 1)[1]) for p in out.glob(f"{prefix}-*.tar")]
    return max(numbers, default=-1) + 1


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def remove_temporaries(folder: Path) -> int:
    """Remove what killed writers left anywhere under `folder`: `atomic_output`'s hidden
    `.<name>.<random>.tmp` files and tirsynth's hidden `.<name>.tmp` folders. Only a run
    that owns `folder` (holds its lock, or is the one run of it) may call this.

    Returns:
        How many were removed.
    """
    removed = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in [*filenames, *dirnames]:
            if name.startswith(".") and name.endswith(".tmp"):
                path = Path(dirpath) / name
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                removed += 1
        dirnames[:] = [d for d in dirnames if not (d.startswith(".") and d.endswith(".tmp"))]
    return removed


def damaged_shards(root: Path, index: pa.Table) -> list[str]:
    """Shards the index names that are missing or whose size is not the one committed
    (truncated, or rewritten): one line each."""
    if not len(index) or "shard_bytes" not in index.column_names:
        return []
    problems = []
    for shard, size in sorted(set(value_rows(index, ["shard", "shard_bytes"]))):
        found = file_size(root / shard)
        if found != size:
            what = "missing" if found < 0 else f"{found} bytes, {size} committed"
            problems.append(f"{shard} ({what})")
    return problems


def file_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else -1


class exclusive_lock:
    """flock on a file in `out`: one run of a stage per folder at a time."""

    def __init__(self, out: Path, name: str, stage: str):
        self.path, self.stage = out / name, stage

    def __enter__(self):
        self.handle = open(self.path, "w")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another {self.stage} into {self.path.parent} to finish ...")
            fcntl.flock(self.handle, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


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
