"""Benchmarks that print their figures and the ratio to the relevant limit, measured in one run."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tirsynth import ingest, layouts
from tirsynth.config import IngestConfig

TRIALS = 3


def bench_ingest(
    sources: list[str], meta: str | None, repeat: int = 1, workers: int = 0
) -> Iterator[str]:
    """Ingest pairs/s against the floor (reading and hashing the same files once, one core).

    Each figure is the best of TRIALS runs with a warm page cache, floor and ingest
    alternating so that drift on a shared machine hits both alike.
    """
    yield f"{'corpus':<14}{'pairs':>7}{'floor s':>10}{'ingest s':>10}{'pairs/s':>10}{'ratio':>8}"
    with tempfile.TemporaryDirectory(prefix="tirsynth-bench-") as scratch:
        corpora = [("shared x1", sources, meta)]
        if repeat > 1:
            corpora.append(
                (
                    f"shared x{repeat}",
                    *_repeat_corpus(sources, meta, repeat, Path(scratch) / "corpus"),
                )
            )
        for name, corpus_sources, corpus_meta in corpora:
            files = _source_files(corpus_sources)
            floors, runs = [], []
            for trial in range(TRIALS):
                floors.append(_time(lambda files=files: _read_and_hash(files)))
                out = Path(scratch) / f"out-{name.replace(' ', '')}-{trial}"
                cfg = IngestConfig(
                    sources=tuple(corpus_sources), meta=corpus_meta, out=str(out), workers=workers
                )
                runs.append(_time(lambda cfg=cfg: ingest.run(cfg)))
                pairs = len(ingest.shards.read_index(out))
                shutil.rmtree(out)
            floor, best = min(floors), min(runs)
            yield (
                f"{name:<14}{pairs:>7}{floor:>10.3f}{best:>10.3f}{pairs / best:>10.1f}"
                f"{floor / best:>8.2f}"
            )
    yield (
        f"ratio = floor / ingest time (1.0 = as fast as reading and hashing once); "
        f"{os.cpu_count()} cores"
    )


def _source_files(sources: list[str]) -> list[str]:
    files = []
    for source in sources:
        pairs, _, _ = layouts.discover(source)
        files += [path for pair in pairs for path in (pair.rgb, pair.tir)]
    return files


def _read_and_hash(files: list[str]) -> None:
    for path in files:
        with open(path, "rb") as handle:
            hashlib.sha256(handle.read()).hexdigest()


def _repeat_corpus(
    sources: list[str], meta: str | None, repeat: int, scratch: Path
) -> tuple[list[str], str | None]:
    """Copy each source `repeat` times over, every file under a new stem `{stem}_r{i}`."""
    copies = []
    for source in sources:
        root = Path(source)
        target = scratch / root.name
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            folder = target / path.parent.relative_to(root)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(repeat):
                shutil.copyfile(path, folder / f"{path.stem}_r{i}{path.suffix}")
        copies.append(str(target))
    if meta is None:
        return copies, None
    with open(meta, newline="") as handle:
        rows = list(csv.DictReader(handle))
    meta_copy = scratch / Path(meta).name
    with open(meta_copy, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            for i in range(repeat):
                writer.writerow({**row, "stem": f"{row['stem']}_r{i}"})
    return copies, str(meta_copy)


def _time(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start
