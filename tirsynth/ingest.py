"""Paired RGB/TIR datasets in their published layouts -> pair shards (see `shards`).

`run(cfg)` discovers pairs, tags split and day/night, converts them in this process and
forked workers (`parallel.fork_map`; each task writes a whole shard) and commits finished
shards to `index.parquet`, so a killed run resumes where it stopped. Bad inputs land in
`rejects.parquet` with a reason.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
from PIL import Image
from tqdm import tqdm

from tirsynth import __version__, images, layouts, parallel, shards, video
from tirsynth.config import IngestConfig, to_dict
from tirsynth.layouts import PairSource, Reject

LOCK = ".ingest.lock"
MIN_PAIRS_PER_WORKER = 60
MIN_PAIRS_PER_TASK = 50
META_KEYS = ("key", "stem", "clip")  # what a --meta row is matched by, in this order
OPTIONS_IN_FINGERPRINT = ("layout", "dataset", "daynight", "split", "resize", "max_pixels")


class IngestStopped(RuntimeError):
    """Writing the output failed (disk full, permissions, a worker killed); a rerun resumes."""


class PlannedPair(NamedTuple):  # a tuple: made once per pair
    source: PairSource
    split: str
    daynight: str | None  # None: estimate from the RGB image in the worker
    daynight_source: str  # meta | cli | layout | auto | unknown
    extra: tuple[tuple[str, str], ...] = ()  # metadata CSV columns for this sample


@dataclass(frozen=True)
class ShardTask:
    path: Path
    pairs: tuple[PlannedPair, ...]


@dataclass(frozen=True)
class IngestResult:
    out: Path
    added: int  # pairs stored by this run
    pairs: int  # pairs in the folder now
    rejects: list[dict[str, Any]]
    meta_unmatched: list[str]


def run(cfg: IngestConfig) -> IngestResult:
    """Ingest `cfg.sources` into pair shards under `cfg.out`.

    Args:
        cfg: the ingest options.

    Returns:
        What was stored and what was rejected (also written to `cfg.out`).
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with shards.exclusive_lock(out, LOCK, "ingest"):
        inputs, pairs, rejects = discover_all(cfg)
        meta_rows = read_meta(cfg.meta) if cfg.meta else []
        fingerprint = compute_fingerprint(cfg, inputs)
        index = shards.prepare_output(out, fingerprint, cfg.overwrite, shards.SPLITS, "ingest")
        done = set(index["key"].to_pylist())
        counts = shards.PairCounts()
        counts.add_table(index)
        del index  # the counts are all this run needs of it
        planned, meta_unmatched = plan_pairs(pairs, meta_rows, cfg)
        planned, duplicates = drop_duplicate_keys(planned)
        rejects += duplicates
        pending = [p for p in planned if p.source.key not in done]
        manifest = build_manifest(cfg, inputs, fingerprint, meta_unmatched, status="incomplete")
        shards.write_json(out / shards.MANIFEST, manifest)
        reject_rows = [reject_row(r) for r in rejects]
        try:
            added = write_pending(out, counts, pending, cfg, reject_rows)
        except (OSError, parallel.WorkerLost) as err:  # inputs that fail are rejects instead
            raise IngestStopped(
                f"ingest into {out} stopped: {err}. The pairs committed so far are kept; "
                "run the same command again to finish."
            ) from err
        summary = shards.count_pairs(out, counts, reject_rows, "complete")
        manifest.update(status="complete", counts=summary)
        shards.write_json(out / shards.MANIFEST, manifest)
    return IngestResult(out, added, counts.pairs, reject_rows, meta_unmatched)


def discover_all(cfg: IngestConfig) -> tuple[list[dict], list[PairSource], list[Reject]]:
    """Pairs and name-level rejects of every source, in a stable order."""
    inputs, pairs, rejects = [], [], []
    for source in cfg.sources:
        found, bad, used = layouts.discover(source, cfg.layout, cfg.dataset, cfg.frame_stride)
        described = {"source": str(Path(source).resolve()), "layout": used, "pairs": len(found)}
        if used == "video":  # part of the fingerprint where it matters only
            described["frame_stride"] = cfg.frame_stride
        inputs.append(described)
        pairs += found
        rejects += bad
    if cfg.rgb_dir is not None:
        name = layouts.dataset_name(cfg.dataset or Path(cfg.rgb_dir).resolve().parent.name)
        found, bad = layouts.match_folders(Path(cfg.rgb_dir), Path(cfg.tir_dir), name)
        inputs.append(
            {
                "rgb": str(Path(cfg.rgb_dir).resolve()),
                "tir": str(Path(cfg.tir_dir).resolve()),
                "layout": "folders",
                "pairs": len(found),
            }
        )
        pairs += found
        rejects += bad
    if not inputs:
        raise ValueError("nothing to ingest: give SRC paths or --rgb DIR --tir DIR")
    return inputs, pairs, rejects


def read_meta(path: str) -> list[dict[str, str]]:
    """Rows of a metadata CSV; each needs a `stem`, `key` or `clip` column (a `clip` row
    holds for every frame of that video)."""
    rows = []
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if not set(META_KEYS) & set(reader.fieldnames or ()):
            raise ValueError(f"{path}: a metadata CSV needs a 'stem', 'key' or 'clip' column")
        for row in reader:
            if not any(row.get(name) for name in META_KEYS):
                raise ValueError(
                    f"{path}, line {reader.line_num}: no {', '.join(META_KEYS)} to match it by"
                )
            if row.get("daynight") not in (None, "", "day", "night"):
                raise ValueError(f"{path}: daynight must be day or night, got {row['daynight']!r}")
            rows.append(row)
    return rows


def plan_pairs(
    pairs: list[PairSource], meta_rows: list[dict[str, str]], cfg: IngestConfig
) -> tuple[list[PlannedPair], list[str]]:
    """Give each pair its split and day/night; merge metadata rows.

    Day/night comes from, in order: a metadata row, `--daynight day|night`, the dataset's
    layout, and with `--daynight auto` an estimate from the RGB image. The split comes from
    a metadata row's `split`, else the dataset's own split, else a hash of the key.
    """
    by_key = {row["key"]: row for row in meta_rows if row.get("key")}
    by_stem = {row["stem"]: row for row in meta_rows if row.get("stem")}
    by_clip = {row["clip"]: row for row in meta_rows if row.get("clip")}
    used: set[int] = set()
    planned = []
    for pair in pairs:
        row = by_key.get(pair.key) or by_stem.get(pair.stem)
        if row is None and pair.clip is not None:
            row = by_clip.get(pair.clip)
        if row is not None:
            used.add(id(row))
        extra = {k: v for k, v in (row or {}).items() if k not in META_KEYS and v != ""}
        if pair.clip is not None:  # a video frame: its clip and number go into the index
            extra = {"clip": pair.clip, "frame": str(pair.frame), **extra}
        daynight = extra.pop("daynight", None)
        if daynight:
            source = "meta"
        elif cfg.daynight in ("day", "night"):
            daynight, source = cfg.daynight, "cli"
        elif pair.daynight:
            daynight, source = pair.daynight, "layout"
        elif cfg.daynight == "auto":
            daynight, source = None, "auto"
        else:
            daynight, source = "unknown", "unknown"
        # A clip's frames share one split: a test frame's neighbour is never in train.
        group = f"{pair.dataset}/{pair.clip}" if pair.clip is not None else pair.key
        split = extra.pop("split", None) or pair.split or hash_split(group, cfg.split)
        planned.append(PlannedPair(pair, split, daynight, source, tuple(sorted(extra.items()))))
    unmatched = [
        next(row[name] for name in META_KEYS if row.get(name))
        for row in meta_rows
        if id(row) not in used
    ]
    return planned, unmatched


def hash_split(key: str, fractions: tuple[float, float, float]) -> str:
    """Deterministic split from a hash of the key: same key, same split, every run."""
    # The first 48 bits of the digest as a fraction of 2**48 (its first 12 hex digits).
    position = int.from_bytes(hashlib.sha256(key.encode()).digest()[:6], "big") / 2**48
    for split, bound in zip(shards.SPLITS, _split_bounds(fractions), strict=True):
        if position < bound:
            return split
    return shards.SPLITS[-1]


@cache
def _split_bounds(fractions: tuple[float, float, float]) -> tuple[float, ...]:
    total = sum(fractions)
    return tuple(itertools.accumulate(fraction / total for fraction in fractions))


def drop_duplicate_keys(planned: list[PlannedPair]) -> tuple[list[PlannedPair], list[Reject]]:
    seen: dict[str, PlannedPair] = {}
    rejects = []
    for pair in planned:
        first = seen.setdefault(pair.source.key, pair)
        if first is not pair:
            reason = f"duplicate key: same dataset and relative path as {first.source.rgb}"
            src = pair.source
            rejects.append(Reject(src.dataset, reason, src.key, src.rgb, src.tir))
    return list(seen.values()), rejects


def write_pending(
    out: Path,
    counts: shards.PairCounts,
    pending: list[PlannedPair],
    cfg: IngestConfig,
    reject_rows: list[dict],
) -> int:
    """Convert pending pairs in shard-sized tasks; each task writes its shard, then commits
    it with its index and rejects fragments. Returns the number of pairs added."""
    # A forked worker costs about as much as converting MIN_PAIRS_PER_WORKER pairs (the
    # fork, and the copy-on-write faults of both processes): with workers=0 (all cores)
    # small jobs use fewer, or none.
    workers = cfg.workers or max(1, min(os.cpu_count() or 1, len(pending) // MIN_PAIRS_PER_WORKER))
    # Largest first, so that the last tasks to finish are small and no worker idles long.
    tasks = sorted(plan_tasks(out, pending, cfg.shard_size, workers), key=lambda t: -len(t.pairs))
    added = 0
    options = {
        "verify": cfg.verify,
        "max_pixels": cfg.max_pixels,
        "resize": cfg.resize,
        "meta_columns": sorted({name for p in pending for name, _ in p.extra}),
    }
    # Rejects found before any shard (missing partners, duplicates), committed first.
    shards.write_rejects(out, reject_rows)
    # Pillow loads its format plugins on first use: once here, not in each forked worker.
    Image.preinit()
    video.close_readers()  # no FFmpeg decoder threads in this process when it forks
    # Forked workers share the ingest lock's open file; fork_map reaps them before it
    # returns, so the lock is not let go while one of them may still write a shard.
    with (
        tqdm(total=len(pending), unit="pair", desc="ingest", disable=not pending) as bar,
        parallel.fork_map(write_task, [(t, options) for t in tasks], workers) as results,
    ):
        for rows, rejected in results:
            counts.add(rows)
            reject_rows += rejected
            added += len(rows)
            bar.update(len(rows) + len(rejected))
    return added


def plan_tasks(
    out: Path, pending: list[PlannedPair], shard_size: int, workers: int
) -> Iterator[ShardTask]:
    """Group pending pairs by split into shards numbered after the existing ones."""
    # With several workers, about eight tasks each (so that they finish close together) of
    # at least MIN_PAIRS_PER_TASK pairs: each task costs a shard file to create and rename
    # and a message of rows, which fewer, larger tasks spread over more pairs.
    size = len(pending) if workers == 1 else math.ceil(len(pending) / (8 * workers))
    size = max(1, min(shard_size, max(MIN_PAIRS_PER_TASK, size)))
    for split in sorted({p.split for p in pending}):
        todo = [p for p in pending if p.split == split]
        number = shards.next_shard_number(out, split)
        # Every count-th pair rather than runs of neighbours: each task gets its share of
        # every source (LLVIP's pairs are three times RoadScene's bytes), so that tasks of
        # equal count take equal time.
        count = math.ceil(len(todo) / size)
        # Video frames instead in runs of one clip in frame order: a task then decodes each
        # clip once, forward (frame by frame from the last one it read).
        clips = any(p.source.clip is not None for p in todo)
        if clips:
            todo.sort(key=lambda p: (p.source.clip is None, p.source.rgb.rpartition("#")[0],
                                     p.source.frame or 0))  # fmt: skip
        for offset in range(count):
            path = out / shards.shard_name(split, number + offset)
            members = todo[offset * size : (offset + 1) * size] if clips else todo[offset::count]
            yield ShardTask(path, tuple(members))


def write_task(args: tuple[ShardTask, dict]) -> tuple[list[dict], list[dict]]:
    """Worker: read, check and convert one task's pairs, then write its shard."""
    task, options = args
    rows, rejected = [], []

    def samples() -> Iterator[dict]:
        # Streamed into the tar one pair at a time: holding a whole shard's bytes makes
        # the worker fault in fresh memory for every shard.
        for pair in task.pairs:
            try:
                sample, row = build_sample(pair, task.path.name, options)
            except images.ImageRejected as err:
                src = pair.source
                reject = Reject(src.dataset, str(err), src.key, src.rgb, src.tir)
                rejected.append(reject_row(reject))
                continue
            rows.append(row)
            yield sample

    if not shards.write_shard(task.path, samples()):
        task.path.unlink()  # every pair was rejected
    shard_bytes = shards.file_size(task.path) if rows else 0
    rows = [{**row, "shard_bytes": shard_bytes} for row in rows]
    # The shard is in place before its index fragment, so an index row always points to a
    # complete shard; a shard with no fragment is removed on resume and its pairs redone.
    if rows:
        schema = index_schema(options["meta_columns"])
        shards.write_fragment(task.path.parent, shards.INDEX, task.path.stem, rows, schema)
    if rejected:
        shards.write_rejects(task.path.parent, rejected, fragment=task.path.stem)
    # Only what the parent's counts need travels back, not whole rows.
    return [{name: row[name] for name in shards.COUNTED} for row in rows], rejected


def index_schema(meta_columns: list[str]) -> pa.Schema:
    """One schema for every fragment of a run's index, columns that are null in one shard
    included, so that readers of the folder see one table; metadata columns are text."""
    text = pa.string()
    fields = [
        ("key", text), ("shard", text), ("split", text), ("dataset", text),
        ("daynight", text), ("daynight_source", text), ("width", pa.int64()),
        ("height", pa.int64()), ("rgb_member", text), ("tir_member", text),
        ("tir_bits", pa.int64()), ("rgb_sha256", text), ("tir_sha256", text),
        ("rgb_source_sha256", text), ("tir_source_sha256", text), ("rgb_path", text),
        ("tir_path", text), ("rgb_conversion", text), ("tir_conversion", text),
        ("shard_bytes", pa.int64()),
    ]  # fmt: skip
    known = {name for name, _ in fields}
    return pa.schema(fields + [(name, text) for name in meta_columns if name not in known])


def build_sample(pair: PlannedPair, shard: str, options: dict) -> tuple[dict, dict]:
    """One pair -> (tar sample, index row); raises ImageRejected with the reason."""
    src = pair.source
    rgb = _read_side(src.rgb, "rgb", options)
    tir = _read_side(src.tir, "tir", options)
    if (rgb.width, rgb.height) != (tir.width, tir.height):
        if options["resize"] == "tir":
            tir = images.resize_image(tir, (rgb.width, rgb.height), "tir")
        elif options["resize"] == "rgb":
            rgb = images.resize_image(rgb, (tir.width, tir.height), "rgb")
        else:
            raise images.ImageRejected(
                f"size mismatch: RGB {rgb.width}x{rgb.height} vs TIR {tir.width}x{tir.height} "
                "(registered pairs must match; --resize rgb|tir resizes one side)"
            )
    daynight, daynight_source, sky_luma = pair.daynight, pair.daynight_source, None
    if daynight is None:
        daynight, sky_luma = images.estimate_daynight(rgb.data)
    row = {
        "key": src.key,
        "shard": shard,
        "split": pair.split,
        "dataset": src.dataset,
        "daynight": daynight,
        "daynight_source": daynight_source,
        "width": rgb.width,
        "height": rgb.height,
        "rgb_member": f"rgb.{rgb.ext}",
        "tir_member": f"tir.{tir.ext}",
        "tir_bits": tir.bits,
        "rgb_sha256": rgb.sha256,
        "tir_sha256": tir.sha256,
        "rgb_source_sha256": rgb.source_sha256,
        "tir_source_sha256": tir.source_sha256,
        "rgb_path": src.rgb,
        "tir_path": src.tir,
        "rgb_conversion": rgb.conversion,
        "tir_conversion": tir.conversion,
        **dict(pair.extra),
    }
    record = {k: v for k, v in row.items() if k != "shard"}
    if sky_luma is not None:
        record["daynight_sky_luma"] = round(sky_luma, 2)
    if src.annotation:
        try:
            record["annotations"] = layouts.read_annotation(src.annotation)
        except (OSError, ValueError, SyntaxError) as err:
            raise images.ImageRejected(f"unreadable annotation {src.annotation}: {err}") from err
    sample = {
        "__key__": src.key,
        row["rgb_member"]: rgb.data,
        row["tir_member"]: tir.data,
        "json": json.dumps(record, ensure_ascii=False).encode(),
    }
    return sample, row


def compute_fingerprint(cfg: IngestConfig, inputs: list[dict]) -> str:
    options = {k: v for k, v in to_dict(cfg).items() if k in OPTIONS_IN_FINGERPRINT}
    meta = Path(cfg.meta).read_bytes() if cfg.meta else b""
    payload = json.dumps({"inputs": inputs, "options": options}, sort_keys=True).encode()
    return hashlib.sha256(payload + hashlib.sha256(meta).digest()).hexdigest()


def build_manifest(
    cfg: IngestConfig,
    inputs: list[dict],
    fingerprint: str,
    meta_unmatched: list[str],
    status: str,
) -> dict[str, Any]:
    return {
        "tool": "tirsynth",
        "version": __version__,
        "stage": "ingest",
        "status": status,
        "fingerprint": fingerprint,
        "inputs": inputs,
        "meta": str(Path(cfg.meta).resolve()) if cfg.meta else None,
        "meta_unmatched": meta_unmatched,
        "options": to_dict(cfg),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def reject_row(reject: Reject) -> dict[str, Any]:
    return {
        "key": reject.key,
        "dataset": reject.dataset,
        "rgb_path": reject.rgb,
        "tir_path": reject.tir,
        "reason": reject.reason,
    }


def _read_side(path: str, role: str, options: dict) -> images.StoredImage:
    try:
        if video.parse_frame_path(path) is not None:
            return video.read_frame(path, role)
        return images.read_image(
            path, role, verify=options["verify"], max_pixels=options["max_pixels"]
        )
    except images.ImageRejected as err:
        raise images.ImageRejected(f"{role.upper()} {err}") from err
