"""RGB corpus in; TIR shards, index.parquet, rejects.parquet, COCO json and report.json out.

A Ray Data pipeline, streaming so memory stays bounded. The corpus is listed once into
Parquet row groups (`corpus.write_listing`), each read by the task that decodes it; decode
and fit each image to the model's square as CPU tasks, translate in an actor pool (one
replica per GPU when there are GPUs), then map back to the input's size, encode and score
as CPU tasks. The workers write finished samples to shards themselves, each shard
committed by its own fragment of index.parquet (a folder of fragments, so a commit costs
the same at any corpus size); the driver only counts. A killed run resumes by skipping
the keys already in the index.

Size handling: an image is scaled so its long side is the checkpoint's working scale
(`data.long_side`; the training crop, 256, for checkpoints without one) or `--long-side`,
padded by reflection to the model's S x S square (that side rounded up to a multiple of
2**depth), translated (in overlapping tiles above `--tile`), cropped back to the scaled
content and resized bicubically to the input's exact width and height.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import resource
import shlex
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image
from tqdm import tqdm

from tirsynth import __version__, cluster, images, inference, metrics, shards, temporal, video
from tirsynth.checkpoint import (
    WEIGHTS_SUFFIX,
    check_generator_weights,
    checkpoint_config,
    load_checkpoint,
    weights_bytes,
)
from tirsynth.config import GenerateConfig, to_dict
from tirsynth.containment import target_inside
from tirsynth.corpus import (
    COCO_PREFIX,
    Corpus,
    Listing,
    coco_image_path,
    discover_corpus,
    output_relpath,
    read_listing_group,
    write_listing,
)
from tirsynth.report import (
    REPORT_HTML,
    TEMPORAL_PLOTS,
    temporal_by_sequence,
    write_report_or_warn,
)
from tirsynth.sequences import SEQUENCE_FILES
from tirsynth.shards import atomic_output

SHARD_PREFIX = "tir"
LOCK = ".generate.lock"
LISTING = ".listing.tmp"  # what this run still has to do; a rerun lists again
REPORT = "report.json"
# relpath, sequence and frame: for the frames of a sequence, which `export` fills.
REJECT_COLUMNS = ("key", "path", "reason", "relpath", "sequence", "frame")
TEMPORAL_FIELDS = ("output_change", "input_change")  # see `add_temporal_changes`
READ_ATTEMPTS = 3  # reads of an input before a transient error becomes a reject
RETRYABLE = " (retryable)"  # in a reject's reason: --retry-rejects tries it again
CPU_BATCH, GPU_BATCH = 8, 64  # default images per model call without and with a GPU
PREPROCESS_COPIES = 4  # an image's bytes a decoding task holds, in model-side squares
WORKER_BYTES = 512 << 20  # a Ray worker process with our imports, before any data
STAGES, BATCHES_IN_FLIGHT = 4, 2  # of the pipeline; see `streaming_budget`
MIN_STREAMING_BUDGET = 32 << 20
# Ray Data blocks that one run of the pipeline creates at most: the driver's memory grows
# with the blocks of a run (Ray's bookkeeping of each task and block), so a larger corpus
# runs as several pipelines over windows of the listing, one after another.
WINDOW_BLOCKS = 16384
# Input columns each stage hands on untouched, for the worker that writes the shard.
PASSED_THROUGH = ("relpath", "labels", "source", "input_path", "sequence", "frame",
                  "model_seconds")  # fmt: skip


@dataclass(frozen=True)
class GenerateResult:
    out: Path
    checkpoint: Path
    generated: int  # this run
    total: int  # in `out` after this run
    rejects: list[dict[str, Any]]
    report: dict[str, Any]


def run(cfg: GenerateConfig, progress: bool = True) -> GenerateResult:
    """Translate every image of `cfg.input` and write TIR shards to `cfg.out`.

    Args:
        cfg: the generate options.
        progress: show a progress bar.

    Returns:
        What was written, the rejects and the report.
    """
    checkpoint = inference.resolve_checkpoint(cfg.checkpoint)
    state = load_checkpoint(checkpoint)
    check_generator_weights(state, checkpoint)  # here, not in every actor after Ray starts
    train_cfg = checkpoint_config(state)
    # What the run needs of the checkpoint: the generator's weights alone, at full
    # precision, for the actors (on a cluster the checkpoint's path exists only on this
    # machine, and the training state around them would take several times the room),
    # and the real-TIR statistics that outputs are scored against.
    weights, tir_stats = weights_bytes(state, torch.float32), state["tir_stats"]
    del state
    size, long_side, tile = model_geometry(cfg, train_cfg)
    # Absolute: Ray workers do not share this process's working directory.
    corpus = discover_corpus(str(Path(cfg.input).resolve()), cfg.input_kind, cfg.split)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    options = output_options(cfg, checkpoint, size, long_side)
    fingerprint = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()
    started = time.time()
    with shards.exclusive_lock(out, LOCK, "generate"):
        _refuse_changed_options(out, options, cfg.overwrite)
        coco_copies = (COCO_PREFIX + name for name in corpus.coco_files)
        extra = (REPORT, cluster.LOG_NAME, SEQUENCE_FILES, *coco_copies)
        index = shards.prepare_output(
            out, fingerprint, cfg.overwrite, (SHARD_PREFIX,), "generate", extra
        )
        if cfg.retry_rejects:  # their inputs are pending again; a kill leaves them pending
            for fragment in shards.fragments(out / shards.REJECTS):
                fragment.unlink()
        copy_sequence_files(corpus, out)
        totals = RunTotals()
        totals.add_table(index)
        listing = _list_pending(out, corpus, index["key"].combine_chunks(), cfg.cpu_batch)
        del index  # the totals and the listing are all this run needs of it
        manifest = _manifest(cfg, checkpoint, size, fingerprint, corpus, "incomplete")
        manifest["long_side"] = long_side
        manifest["output_options"] = options  # what a resume must agree on
        shards.write_json(out / shards.MANIFEST, manifest)
        pipeline_seconds = 0.0
        if listing.images:
            pipeline_seconds = _run_pipeline(
                cfg, corpus, listing, checkpoint, (size, long_side, tile), weights, tir_stats,
                totals, progress,
            )  # fmt: skip
        shutil.rmtree(listing.folder)
        if corpus.coco_files:
            write_coco(out, corpus, shards.read_index(out, ["key", "relpath", "shard"]))
        rejects = shards.read_rejects(out)
        if not listing.images and (out / REPORT).is_file():
            # Nothing was left to do (a rerun, or the second of two concurrent runs): the
            # run that did the work keeps its report, throughput and series included.
            report = json.loads((out / REPORT).read_text())
            if not (out / REPORT_HTML).is_file():
                write_report_or_warn(out)
        else:
            report = build_report(
                cfg, checkpoint, corpus, totals, rejects, time.time() - started, pipeline_seconds
            )
            shards.write_json(out / REPORT, report)
            write_report_or_warn(out)
        shards.write_json(out / shards.MANIFEST, {**manifest, "status": "complete"})
    return GenerateResult(out, checkpoint, totals.added, totals.outputs, rejects, report)


def model_geometry(cfg: GenerateConfig, train_cfg) -> tuple[int, int, int]:
    """(model-side square, a frame's long side in it, tile) for a run: the long side is the
    checkpoint's working scale unless `--long-side` says otherwise."""
    long_side = cfg.long_side or train_cfg.data.working_long_side
    depth = train_cfg.model.depth
    return (
        inference.canvas_side(long_side, depth),
        long_side,
        inference.canvas_side(cfg.tile, depth),
    )


def _list_pending(out: Path, corpus: Corpus, generated: pa.Array, cpu_batch: int) -> Listing:
    """The listing of the images neither generated nor rejected yet; the listing's own
    rejects (not an image, a missing file), found again each run, written as before."""
    rejected = shards.read_arrow(out / shards.REJECTS, ["key"])["key"]
    done = pa.chunked_array([generated, *rejected.chunks], pa.string()).combine_chunks()
    # Absolute: Ray workers do not share this process's working directory.
    listing = write_listing(corpus, (out / LISTING).resolve(), done, cpu_batch)
    keys = pa.array([r["key"] for r in listing.rejects], pa.string())
    stored = pc.is_in(keys, generated).to_pylist()
    unstored = [r for r, s in zip(listing.rejects, stored, strict=True) if not s]
    shards.write_rejects(out, unstored, REJECT_COLUMNS)
    return listing


def preprocess_batch(
    batch: dict[str, np.ndarray],
    size: int,
    root: str,
    max_pixels: int,
    keep_rgb: bool,
    long_side: int | None = None,
) -> dict[str, np.ndarray]:
    """Read and decode each input, scale its long side to `long_side` (default `size`) and
    pad it to `size` x `size` (see the module docstring).

    Returns:
        key, pixels (B, S, S, 3) uint8, width, height, content_width, content_height,
        error ('' when fine), rgb (source bytes when keep_rgb), real (the pair's TIR bytes).
    """
    keys = list(batch["key"])
    sources = _read_sources(keys, list(batch["path"]), list(batch["shard"]), root)
    columns: dict[str, list] = {
        name: []
        for name in (
            "key",
            "pixels",
            "width",
            "height",
            "content_width",
            "content_height",
            "error",
            "rgb",
            "real",
        )
    }
    for key in keys:
        rgb_bytes, real_bytes, error = sources[key]
        pixels = np.zeros((size, size, 3), np.uint8)
        width = height = content_w = content_h = 0
        if not error:
            try:
                image = inference.decode_rgb(rgb_bytes, max_pixels)
                width, height = image.size
                pixels, (content_w, content_h) = inference.fit_to_square(image, size, long_side)
            except images.ImageRejected as err:
                error = str(err)
            except Exception as err:  # a codec bug must cost one image, not the run
                error = failure_reason(err)
        row = (
            key,
            pixels,
            width,
            height,
            content_w,
            content_h,
            error,
            rgb_bytes if keep_rgb and not error else b"",
            real_bytes or b"",
        )
        for name, value in zip(columns, row, strict=True):
            columns[name].append(value)
    out = {name: np.array(values, dtype=object) for name, values in columns.items()}
    out.update({name: batch[name] for name in PASSED_THROUGH if name in batch})
    out["pixels"] = np.stack(columns["pixels"])
    for name in ("width", "height", "content_width", "content_height"):
        out[name] = np.array(columns[name], dtype=np.int64)
    return out


def postprocess_batch(
    batch: dict[str, np.ndarray],
    intensity_hist: list[float],
    lbp_hist: list[float],
    min_structure: float | None,
    temporal_filter: float | None = None,
) -> dict[str, np.ndarray]:
    """Map each output back to its input's size, encode it as PNG and score it; with
    `temporal_filter` (tau, grey levels), sequences' frames first go through
    `steady_sequences`.

    Returns:
        key, tir_png (bytes), width, height, rgb, metrics (JSON), error (including low
        structure).
    """
    if temporal_filter:
        batch = steady_sequences(batch, temporal_filter)
    real_stats = (torch.tensor(intensity_hist), torch.tensor(lbp_hist))
    names = ("key", "tir_png", "width", "height", "rgb", "metrics", "error")
    columns: dict[str, list] = {name: [] for name in names}
    for i, key in enumerate(batch["key"]):
        error, png, scores = str(batch["error"][i]), b"", {}
        if not error:
            try:
                png, scores, error = _finish_output(batch, i, real_stats, min_structure)
            except Exception as err:  # one image's failure becomes its reject row
                png, scores, error = b"", {}, failure_reason(err)
        row = (
            key,
            png,
            batch["width"][i],
            batch["height"][i],
            batch["rgb"][i],
            json.dumps(scores),
            error,
        )
        for name, value in zip(columns, row, strict=True):
            columns[name].append(value)
    add_temporal_changes(batch, columns["metrics"], columns["error"])
    finished = {name: np.array(values, dtype=object) for name, values in columns.items()}
    return {**finished, **{name: batch[name] for name in PASSED_THROUGH if name in batch}}


def steady_sequences(batch: dict[str, np.ndarray], tau: float) -> dict[str, np.ndarray]:
    """`temporal.steady_frames` over each run of consecutive frames of a sequence in the
    batch, at the model's scale, before the outputs are mapped back. A CPU batch holds
    consecutive frames of the listing; the filter starts afresh at its first frame, and
    after a missing or failed frame or a change of frame size.

    Returns:
        The batch with its filtered outputs (`tir`).
    """
    order = sorted(
        (sequence, frame, i)
        for i in range(len(batch["key"]))
        for sequence, frame in [_sequence_frame(batch, i)]
        if sequence is not None and frame is not None and not batch["error"][i]
    )
    runs: list[list[int]] = []
    for n, (sequence, frame, i) in enumerate(order):
        before = order[n - 1] if n else None
        if (
            before
            and before[:2] == (sequence, frame - 1)
            and _content(batch, i) == _content(batch, before[2])
        ):
            runs[-1].append(i)
        else:
            runs.append([i])
    tir = np.array(batch["tir"])  # writable: Ray may hand the batch over read-only
    for run in (r for r in runs if len(r) > 1):
        width, height = _content(batch, run[0])
        crop = np.s_[:height, :width]
        lumas = [np.asarray(batch["pixels"][i][crop], np.float32) @ metrics.LUMA for i in run]
        steady = temporal.steady_frames([tir[i][crop] for i in run], lumas, tau)
        for i, frame in zip(run, steady, strict=True):
            tir[i][crop] = frame
    return {**batch, "tir": tir}


def _content(batch, i) -> tuple[int, int]:
    return int(batch["content_width"][i]), int(batch["content_height"][i])


def add_temporal_changes(batch, scores: list[str], errors: list[str]) -> None:
    """For each frame whose previous frame of the same sequence is in the batch: the mean
    absolute change from that frame, of the output (`output_change`) and of the input's
    luma (`input_change`), at the model's scale, in grey levels. The report sums them per
    sequence into its flicker ratio (`tirsynth.temporal`); a frame whose predecessor went
    to another batch is left out, which drops one step in a CPU batch."""
    frames = {}
    for i in range(len(batch["key"])):
        sequence, frame = _sequence_frame(batch, i)
        if sequence is not None and frame is not None and not errors[i]:
            frames[(sequence, frame)] = i
    for (sequence, frame), i in frames.items():
        j = frames.get((sequence, frame - 1))
        content = (int(batch["content_width"][i]), int(batch["content_height"][i]))
        if j is None or content != (
            int(batch["content_width"][j]),
            int(batch["content_height"][j]),
        ):
            continue
        width, height = content
        crop = np.s_[:height, :width]
        output_change = np.abs(batch["tir"][i][crop].astype(np.float64)
                               - batch["tir"][j][crop].astype(np.float64)).mean()  # fmt: skip
        luma = [np.asarray(batch["pixels"][k][crop], np.float64) @ metrics.LUMA for k in (i, j)]
        updated = json.loads(scores[i])
        updated.update(output_change=float(output_change),
                       input_change=float(np.abs(luma[0] - luma[1]).mean()))  # fmt: skip
        scores[i] = json.dumps(updated)


def _finish_output(batch, i, real_stats, min_structure) -> tuple[bytes, dict, str]:
    """(PNG, scores, error) of output i: mapped back to its input's size and scored."""
    content = (int(batch["content_width"][i]), int(batch["content_height"][i]))
    size = (int(batch["width"][i]), int(batch["height"][i]))
    tir = inference.map_back(batch["tir"][i], content, size)
    scores = score_output(
        batch["pixels"][i], batch["tir"][i], tir, content, batch["real"][i], real_stats
    )
    if min_structure is not None and scores["structure"] < min_structure:
        return (
            b"",
            scores,
            f"structure below --min-structure {min_structure}: {scores['structure']:.4f}",
        )
    return inference.encode_png(tir), scores, ""


def failure_reason(err: BaseException) -> str:
    return f"failed: {type(err).__name__}: {err}"


def score_output(pixels, tir_square, tir, content, real_bytes, real_stats) -> dict[str, float]:
    """Per-image quality (SPEC "Quality metrics").

    Always: structure (SSIM of the output's and the input's Sobel gradient maps, at the
    model's scale) and the distance of the output's intensity and LBP histograms from the
    checkpoint's real-TIR statistics. With a real TIR: SSIM, PSNR and LBP against it, at the
    input's size.
    """
    width, height = content
    rgb = torch.from_numpy(np.array(pixels[:height, :width])).permute(2, 0, 1)
    fake = torch.from_numpy(np.array(tir_square[:height, :width])).double()
    input_gray = metrics.to_gray_uint8(rgb[None].double() / 127.5 - 1)  # (1, h, w)
    scores = {
        "structure": inference.structure_score(input_gray, fake[None]),
        "intensity_distance": metrics.histogram_distance(
            metrics.intensity_histogram(torch.from_numpy(np.array(tir))[None]), real_stats[0]
        ).item(),
        "lbp_distance": metrics.histogram_distance(
            metrics.lbp_histogram(metrics.lbp(fake[None])), real_stats[1]
        ).item(),
    }
    if real_bytes:
        real = torch.from_numpy(shards.decode_tir_8bit(real_bytes).astype(np.float64))
        if tuple(real.shape) == tir.shape:
            output = torch.from_numpy(np.array(tir)).double()[None]
            scores["ssim"] = metrics.ssim(real[None], output).item()
            scores["psnr"] = metrics.psnr(real[None], output).item()
            scores["lbp_real"] = metrics.lbp(real[None]).double().mean().item()
            scores["lbp_fake"] = metrics.lbp(output).double().mean().item()
    return scores


INDEX_SCHEMA = pa.schema(
    [("key", pa.string()), ("relpath", pa.string()), ("source", pa.string()),
     ("width", pa.int64()), ("height", pa.int64()), ("input_kind", pa.string()),
     ("sequence", pa.string()), ("frame", pa.int64()),
     ("shard", pa.string()), ("shard_bytes", pa.int64()), ("node", pa.string())]
    + [(name, pa.float64()) for name in (*metrics.QUALITY_FIELDS, *TEMPORAL_FIELDS)]
)  # fmt: skip


def write_shard_batch(batch: dict[str, np.ndarray], out: str, input_kind: str) -> dict:
    """A Ray task's last step: one shard of finished outputs, written by the worker.

    The tar is renamed into place first, then its index fragment (the commit), then the
    fragment of its rejects: a kill leaves either a committed shard or inputs that the next
    run does again (a tar without its fragment is removed then). The shard is named after
    its keys, so a retried task writes the same file again rather than a second copy.

    Returns:
        One summary row for the driver: shard, images, rejected, the sum and count of each
        quality metric, and the rejects by reason.
    """
    folder = Path(out)
    keys = [str(k) for k in batch["key"]]
    name = f"{SHARD_PREFIX}-{hashlib.sha1(chr(10).join(sorted(keys)).encode()).hexdigest()[:16]}"
    samples, rows, rejects = [], [], []
    for i in range(len(keys)):
        if batch["error"][i]:
            rejects.append(_reject_record(batch, i))
            continue
        sample, row = _output_sample(batch, i, input_kind)
        samples.append(sample)
        rows.append(row)
    if samples:
        shard = folder / f"{name}.tar"
        shards.write_shard(shard, samples)
        shard_bytes = shards.file_size(shard)
        node = _ray_node_id()  # which machine of a cluster wrote it
        rows = [{**row, "shard": shard.name, "shard_bytes": shard_bytes, "node": node}
                for row in rows]  # fmt: skip
        shards.write_fragment(folder, shards.INDEX, name, rows, INDEX_SCHEMA)
    if rejects:
        shards.write_rejects(folder, rejects, REJECT_COLUMNS, fragment=name)
    summary = {"shard": name, "images": len(rows), "rejected": len(rejects), **metric_sums(rows)}
    summary["model_seconds"] = float(np.sum(batch.get("model_seconds", 0.0)))
    summary["reasons"] = json.dumps(dict(shards.rejects_by_reason(rejects)))
    return {k: np.array([v]) for k, v in summary.items()}


def metric_sums(rows: list[dict[str, Any]]) -> dict[str, float | int]:
    """`<metric>_sum` and `<metric>_count` of each quality metric over index rows (a metric
    is missing from a row, or null there, when the output has no value for it)."""
    sums: dict[str, float | int] = {}
    for field in metrics.QUALITY_FIELDS:
        values = [row[field] for row in rows if row.get(field) is not None]
        sums[f"{field}_sum"], sums[f"{field}_count"] = float(sum(values)), len(values)
    return sums


def _ray_node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _reject_record(batch, i) -> dict[str, str | None]:
    sequence, frame = _sequence_frame(batch, i)
    return {
        "key": str(batch["key"][i]),
        "path": str(batch["input_path"][i]),
        "reason": str(batch["error"][i]),
        "relpath": str(batch["relpath"][i]),
        "sequence": sequence,
        "frame": None if frame is None else str(frame),
    }


def _sequence_frame(batch, i) -> tuple[str | None, int | None]:
    """(sequence, frame) of item i, None for an image outside any sequence (Ray Data
    hands an all-null column on as NaN or None)."""
    sequence = batch["sequence"][i] if "sequence" in batch else None
    if not isinstance(sequence, str):
        return None, None
    frame = batch["frame"][i]
    return sequence, None if frame is None or frame != frame else int(frame)


def _output_sample(batch, i, input_kind) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tar sample, index row) of output i of a finished batch."""
    key = str(batch["key"][i])
    scores = json.loads(batch["metrics"][i])
    width, height = int(batch["width"][i]), int(batch["height"][i])
    sequence, frame = _sequence_frame(batch, i)
    record = {
        "key": key,
        "source": str(batch["source"][i]),
        "relpath": str(batch["relpath"][i]),
        "width": width,
        "height": height,
        "labels": json.loads(batch["labels"][i]),
        "metrics": scores,
    }
    if sequence is not None:
        record.update(sequence=sequence, frame=frame)
    sample = {"__key__": key, "tir.png": batch["tir_png"][i], "json": json.dumps(record).encode()}
    if batch["rgb"][i]:
        sample[f"rgb.{_image_extension(batch['rgb'][i])}"] = batch["rgb"][i]
    row = {
        "key": key,
        "relpath": record["relpath"],
        "source": record["source"],
        "width": width,
        "height": height,
        "input_kind": input_kind,
        "sequence": sequence,
        "frame": frame,
        **scores,
    }
    return sample, row


class RunTotals:
    """What the driver keeps of a run: counts, running sums of each quality metric, and a
    series of means over runs of `width` consecutive shards for the report's plot. When the
    series would pass MAX_POINTS, neighbouring points merge and `width` doubles, so every
    point but the last covers the same number of shards and memory is flat in the
    corpus."""

    MAX_POINTS = 512

    def __init__(self) -> None:
        self.outputs = self.added = self.rejected = 0
        self.model_seconds = 0.0  # the model's own time, summed over its calls
        self.replicas = 1  # of the model, in this run's pipeline
        self.sums: dict[str, float] = dict.fromkeys(metrics.QUALITY_FIELDS, 0.0)
        self.counts: dict[str, int] = dict.fromkeys(metrics.QUALITY_FIELDS, 0)
        self.reasons: Counter = Counter()
        self.points: list[dict[str, Any]] = []  # shards, images, rejected, seconds, sums...
        self.width = 1  # shards a point covers

    def add_table(self, index: pa.Table) -> None:
        """The index (as Arrow) that an earlier run wrote into this folder."""
        self.outputs += len(index)
        for field in set(metrics.QUALITY_FIELDS) & set(index.column_names):
            self.sums[field] += pc.sum(index[field]).as_py() or 0.0
            self.counts[field] += len(index) - index[field].null_count

    def add_shard(self, summary: dict[str, Any], seconds: float) -> None:
        """A shard a worker wrote in this run (`write_shard_batch`'s summary row)."""
        images, rejected = int(summary["images"]), int(summary["rejected"])
        self.outputs += images
        self.added += images
        self.rejected += rejected
        self.reasons.update(json.loads(summary["reasons"]))
        self.model_seconds += float(summary.get("model_seconds", 0.0))
        point = {"shards": 1, "images": images, "rejected": rejected, "seconds": seconds}
        for field in metrics.QUALITY_FIELDS:
            total, count = float(summary[f"{field}_sum"]), int(summary[f"{field}_count"])
            self.sums[field] += total
            self.counts[field] += count
            point[f"{field}_sum"], point[f"{field}_count"] = total, count
        if self.points and self.points[-1]["shards"] < self.width:
            self.points[-1] = _merge(self.points[-1], point)
        else:
            self.points.append(point)
        if len(self.points) > self.MAX_POINTS:
            self.points = [_merge(*self.points[i : i + 2]) for i in range(0, len(self.points), 2)]
            self.width *= 2

    def means(self) -> dict[str, float]:
        return {f: self.sums[f] / self.counts[f] for f in self.sums if self.counts[f]}

    def series(self) -> list[dict[str, Any]]:
        """The report's per-batch records: the images in each point and their mean metrics."""
        records = []
        for number, point in enumerate(self.points):
            record = {k: point[k] for k in ("shards", "images", "rejected", "seconds")}
            record["batch"] = number
            for field in metrics.QUALITY_FIELDS:
                if point[f"{field}_count"]:
                    record[field] = point[f"{field}_sum"] / point[f"{field}_count"]
            records.append(record)
        return records


def _merge(first: dict[str, Any], second: dict[str, Any] | None = None) -> dict[str, Any]:
    if second is None:
        return first
    merged = {k: first[k] + second[k] for k in first if k != "seconds"}
    merged["seconds"] = second["seconds"]  # when the later one was written
    return merged


def write_coco(out: Path, corpus: Corpus, index: list[dict]) -> list[Path]:
    """COCO input: each instances json again, its images pointing at the TIR outputs
    (`export` paths, with the shard and key), annotations unchanged; images that were
    rejected are left out with their annotations, so no label points at a missing image."""
    by_relpath = {row["relpath"]: row for row in index}
    written = []
    for name, coco_path in corpus.coco_files.items():
        coco = json.loads(coco_path.read_text())
        kept_images = []
        for entry in coco["images"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
                continue  # listed as a reject
            path, relpath = coco_image_path(corpus.root, name, entry)
            row = by_relpath.get(relpath) if path is not None else None
            if row is not None:
                kept_images.append(
                    {
                        **entry,
                        "file_name": output_relpath(row["relpath"]),
                        "tirsynth_key": row["key"],
                        "tirsynth_shard": row["shard"],
                    }
                )
        kept_ids = {entry["id"] for entry in kept_images}
        annotations = [
            a for a in coco.get("annotations", [])
            if isinstance(a, dict) and a.get("image_id") in kept_ids
        ]  # fmt: skip
        path = out / f"{COCO_PREFIX}{name}"
        shards.write_json(path, {**coco, "images": kept_images, "annotations": annotations})
        written.append(path)
    return written


def build_report(
    cfg, checkpoint, corpus, totals: RunTotals, rejects, seconds, pipeline_seconds
) -> dict[str, Any]:
    batches = totals.series()
    return {
        "stage": "generate",
        "command": shlex.join(sys.argv),
        "tirsynth": __version__,
        "checkpoint": str(checkpoint),
        "input": str(cfg.input),
        "input_kind": corpus.kind,
        "options": to_dict(cfg),
        "outputs": totals.outputs,
        "generated_this_run": totals.added,
        "seconds": seconds,
        "pipeline_seconds": pipeline_seconds,  # without starting Ray and listing the input
        "images_per_s": totals.added / pipeline_seconds if pipeline_seconds else 0.0,
        # The generator's own time per image, and its share of the pipeline's time (per
        # replica): near 1 the model sets the pace, well below it the CPU stages do.
        "model_seconds_per_image": totals.model_seconds / totals.added if totals.added else None,
        "model_share": (
            totals.model_seconds / (pipeline_seconds * totals.replicas)
            if pipeline_seconds
            else None
        ),
        "steady_images_per_s": _steady_rate(batches),
        "overall": totals.means(),
        "batches": batches,  # per shard, merged in pairs past RunTotals.MAX_POINTS
        "rejects": len(rejects),
        "rejects_by_reason": dict(shards.rejects_by_reason(rejects)),
        "temporal": temporal_summary(Path(cfg.out)),
        # This process only (Ray's workers are not its children): what must stay flat.
        "driver_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def temporal_summary(out: Path) -> dict[str, Any] | None:
    """Sequences only: their count, the flicker ratio against the input over all of them
    (mean output change over mean input change, per frame step) and the sequences that
    flicker most (`report.temporal_by_sequence`)."""
    by_sequence = temporal_by_sequence(out)
    if not by_sequence:
        return None
    steps = sum(r["steps"] for r in by_sequence)
    output = sum(r["output_change"] * r["steps"] for r in by_sequence) / steps
    inputs = sum(r["input_change"] * r["steps"] for r in by_sequence) / steps
    return {
        "sequences": len(by_sequence),
        "frame_steps": steps,
        "output_change": output,
        "input_change": inputs,
        "flicker_ratio": output / inputs if inputs else None,
        "most_flicker": by_sequence[:TEMPORAL_PLOTS],
    }


def _run_pipeline(
    cfg, corpus, listing: Listing, checkpoint, geometry, weights, tir_stats, totals, progress
):
    """Run the Ray Data pipeline over the listing's images; returns its seconds.

    Args:
        weights: the generator as `checkpoint.weights_bytes`, shipped to the actors.
        tir_stats: the checkpoint's real-TIR statistics.
    """
    import ray
    import ray.data

    out, size = Path(cfg.out), geometry[0]
    with cluster.ray_session(cfg.address, out / cluster.LOG_NAME, cfg.verbose) as console:
        started = time.perf_counter()
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # ours counts images, not blocks
        gpus = int(ray.cluster_resources().get("GPU", 0))
        # Ray Data runs first the stage that holds the least object store memory, and
        # reading and decoding hold little: with the whole object store as its budget it
        # would decode the entire corpus before the shard writer got a CPU, and commit
        # nothing until then. A budget of a few batches per CPU and stage keeps it
        # streaming (a stage over its share waits), so shards are committed all along.
        cpus = int(ray.cluster_resources().get("CPU", 1))
        context.execution_options.resource_limits = ray.data.ExecutionResources(
            object_store_memory=streaming_budget(cpus, cfg.cpu_batch, size)
        )
        replicas = totals.replicas = cfg.workers or max(gpus, 1)
        model_batch = cfg.batch_size or (GPU_BATCH if gpus else CPU_BATCH)
        # Ray gives each actor one thread per CPU it reserves. On the CPU the model is the
        # bottleneck and the CPU tasks mostly wait for it, so each replica reserves one CPU
        # (leaving the rest to decoding and scoring) but runs on its share of its node's.
        threads = 0 if gpus else _threads_per_replica(ray.nodes(), replicas)
        shipped = ray.put(weights)  # through the object store, to every node's actors
        cpu_tasks = ray.data.TaskPoolStrategy(size=cfg.concurrency or None)
        stages = stage_options(cfg, corpus, listing, geometry, tir_stats)

        def window(first_group: int, groups: int):
            # One row per row group of the listing, which the first task reads itself: the
            # driver never holds the corpus's rows.
            return (
                ray.data.range(groups, override_num_blocks=groups)
                .map_batches(
                    preprocess_group,
                    batch_size=1,
                    compute=cpu_tasks,
                    # What a task's worker holds: a Python with numpy, torch and PIL
                    # loaded, and its batch's decoded images and fitted squares. Declaring
                    # it also keeps these tasks apart from the model's actors (Ray Data
                    # fuses a task stage into the actor stage after it when their resources
                    # are equal, as they are without a GPU): decoding runs beside the
                    # model, not in turn with it.
                    memory=WORKER_BYTES + cfg.cpu_batch * size * size * 3 * PREPROCESS_COPIES,
                    fn_kwargs={**stages.preprocess, "first_group": first_group},
                )
                .map_batches(
                    inference.Translator,
                    batch_size=model_batch,
                    fn_constructor_kwargs={
                        **stages.translate,
                        "checkpoint": checkpoint.with_suffix(WEIGHTS_SUFFIX).name,
                        "threads": threads,
                        "shipped": shipped,
                    },
                    # Ray Data restarts a crashed actor and retries its task.
                    compute=ray.data.ActorPoolStrategy(size=replicas),
                    num_gpus=1 if gpus else 0,
                )
                .map_batches(
                    postprocess_batch,
                    batch_size=cfg.cpu_batch,
                    compute=cpu_tasks,
                    fn_kwargs=stages.postprocess,
                )
                .map_batches(
                    write_shard_batch,
                    batch_size=cfg.shard_size,
                    compute=cpu_tasks,
                    fn_kwargs=stages.write,
                )
            )

        bar = tqdm(
            total=listing.images, disable=not progress, unit="img", desc="generate", file=console
        )
        # Each window starts its own actors: a reload of the model per window, which
        # WINDOW_BLOCKS keeps rare (tens of thousands of images apart).
        step = window_groups(cfg.cpu_batch, model_batch, cfg.shard_size)
        for first_group in range(0, listing.groups, step):
            dataset = window(first_group, min(step, listing.groups - first_group))
            for summary in dataset.iter_rows():
                totals.add_shard(summary, time.perf_counter() - started)
                bar.update(int(summary["images"]) + int(summary["rejected"]))
        bar.close()
        return time.perf_counter() - started


@dataclass(frozen=True)
class StageOptions:
    """The keyword arguments of each stage of the pipeline (the model's, less where its
    weights come from and its threads, which depend on where it runs)."""

    preprocess: dict[str, Any]  # of preprocess_group
    translate: dict[str, Any]  # of inference.Translator
    postprocess: dict[str, Any]  # of postprocess_batch
    write: dict[str, Any]  # of write_shard_batch


def stage_options(cfg: GenerateConfig, corpus: Corpus, listing: Listing, geometry, stats):
    """What each stage is given, for the pipeline and for a run of the same stages in one
    process (the limit that `bench generate-scale` compares the pipeline with).

    Args:
        geometry: (model-side square, frame long side, tile), from `model_geometry`.
        stats: the checkpoint's real-TIR statistics (its "tir_stats").
    """
    size, long_side, tile = geometry
    return StageOptions(
        preprocess={
            "listing": str(listing.folder),
            "file_groups": listing.file_groups,
            "size": size,
            "long_side": long_side,
            "root": str(corpus.root),
            "max_pixels": cfg.max_pixels,
            "keep_rgb": cfg.keep_rgb,
        },
        translate={"precision": cfg.precision, "tile": tile},
        postprocess={
            "intensity_hist": stats["intensity_hist"].tolist(),
            "lbp_hist": stats["lbp_hist"].tolist(),
            "min_structure": cfg.min_structure,
            "temporal_filter": cfg.temporal_filter,
        },
        write={"out": str(Path(cfg.out).resolve()), "input_kind": corpus.kind},
    )


def preprocess_group(
    batch: dict[str, np.ndarray], listing: str, file_groups: int, first_group: int = 0, **options
):
    """The first task of the pipeline: read row group `first_group + batch["id"][0]` of the
    listing, then `preprocess_batch` its images."""
    rows = read_listing_group(listing, file_groups, first_group + int(batch["id"][0]))
    columns = {name: np.array(values, dtype=object) for name, values in rows.items()}
    return preprocess_batch(columns, **options)


def window_groups(cpu_batch: int, model_batch: int, shard_size: int) -> int:
    """Listing row groups in one window of the pipeline: WINDOW_BLOCKS over the blocks a
    group makes (its read, its decoded batch, its model batches, its scored batch and
    its shards' summaries)."""
    blocks = 3 + math.ceil(cpu_batch / model_batch) + math.ceil(cpu_batch / shard_size)
    return max(1, WINDOW_BLOCKS // blocks)


def streaming_budget(cpus: int, cpu_batch: int, size: int) -> int:
    """Bytes of object store that the pipeline's blocks may hold at once: BATCHES_IN_FLIGHT
    CPU batches per CPU per stage, a batch's images counted as model-side squares (RGB in,
    TIR out, with their encoded bytes alongside), at least MIN_STREAMING_BUDGET."""
    batch_bytes = cpu_batch * size * size * 3 * 2
    return max(MIN_STREAMING_BUDGET, STAGES * BATCHES_IN_FLIGHT * cpus * batch_bytes)


def _threads_per_replica(nodes: list[dict], replicas: int) -> int:
    """CPU threads for each model replica: its share of the smallest node's CPUs, with the
    replicas spread evenly over the nodes (not the cluster's CPUs over the replicas, which
    would oversubscribe every node of a multi-node cluster)."""
    alive = [node for node in nodes if node.get("Alive")]
    cpus = min((int(node["Resources"].get("CPU", 1)) for node in alive), default=1)
    per_node = math.ceil(replicas / max(1, len(alive)))
    return max(1, cpus // per_node)


def _read_sources(keys, paths, shard_names, root) -> dict[str, tuple[bytes, bytes, str]]:
    """key -> (RGB bytes, real TIR bytes or b'', error or '')."""
    sources = {}
    wanted_by_shard: dict[str, set[str]] = {}
    for key, path, shard in zip(keys, paths, shard_names, strict=True):
        if shard:
            wanted_by_shard.setdefault(shard, set()).add(key)
            continue
        if video.parse_frame_path(path) is not None:
            sources[key] = _read_video_frame(path)
            continue
        try:
            sources[key] = (read_with_retries(Path(path)), b"", "")
        except OSError as err:
            retryable = RETRYABLE if _is_transient(err) else ""
            sources[key] = (b"", b"", f"unreadable file{retryable}: {err.strerror or err}")
    for shard, wanted in wanted_by_shard.items():
        for key, sample in shards.read_samples(Path(root) / shard, wanted).items():
            rgb = next(v for k, v in sample.items() if k.startswith("rgb."))
            tir = next(v for k, v in sample.items() if k.startswith("tir."))
            sources[key] = (rgb, tir, "")
        for key in wanted - sources.keys():
            sources[key] = (b"", b"", f"sample missing from pair shard {shard}")
    return sources


def _read_video_frame(path: str) -> tuple[bytes, bytes, str]:
    try:
        return video.read_frame(path, "rgb").data, b"", ""
    except images.ImageRejected as err:
        return b"", b"", str(err)
    except OSError as err:
        return b"", b"", f"unreadable video: {err.strerror or err}"
    except Exception as err:  # a codec bug must cost one frame, not the run
        return b"", b"", failure_reason(err)


def copy_sequence_files(corpus: Corpus, out: Path) -> None:
    """Keep a copy of a tracking layout's label files in `out/sequence_files`, so that
    `export` needs nothing of the input (every run copies them again: they are small)."""
    for item in corpus.sequence_files():
        target = target_inside(out / SEQUENCE_FILES, item.relpath)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(target, durable=False) as handle, open(item.path, "rb") as source:
            shutil.copyfileobj(source, handle)


def read_with_retries(path: Path, attempts: int = READ_ATTEMPTS) -> bytes:
    """The file's bytes; errors that may pass (a flaky network filesystem, a timeout) are
    retried with a short backoff, "not found" and "permission denied" are not."""
    for attempt in range(attempts):
        try:
            return path.read_bytes()
        except OSError as err:
            if not _is_transient(err) or attempt == attempts - 1:
                raise
            time.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")


def _is_transient(err: OSError) -> bool:
    permanent = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
    return not isinstance(err, permanent)


def _image_extension(data: bytes) -> str:
    image_format = Image.open(io.BytesIO(data)).format
    return images.KEPT_FORMATS.get(image_format, (image_format or "bin").lower())


def output_options(
    cfg: GenerateConfig, checkpoint: Path, size: int, long_side: int | None = None
) -> dict[str, Any]:
    """What decides the outputs: a resumed run must agree on all of it (the fingerprint).
    The long side is named only where it differs from the square, and the temporal filter
    only where it is on, so that folders written before either existed resume as they were."""
    scale = {"long_side": long_side} if long_side not in (None, size) else {}
    steady = {"temporal_filter": cfg.temporal_filter} if cfg.temporal_filter else {}
    return {
        **scale,
        **steady,
        "input": str(Path(cfg.input).resolve()),
        "checkpoint": str(checkpoint.resolve()),
        "checkpoint_sha256": shards.file_sha256(checkpoint),
        "size": size,
        "kind": cfg.input_kind,
        "split": cfg.split,
        "min_structure": cfg.min_structure,
        "keep_rgb": cfg.keep_rgb,
        # bf16 and fp32 outputs differ slightly: one run holds one precision.
        "precision": cfg.precision,
    }


def _refuse_changed_options(out: Path, options: dict[str, Any], overwrite: bool) -> None:
    """A resume with options that change outputs stops, naming them, unless --overwrite."""
    before = (shards.read_manifest(out) or {}).get("output_options")
    if overwrite or not before or before == options:
        return
    changed = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in options.items() if before.get(k) != v]
    raise FileExistsError(
        f"{out} holds a generation made with other options ({'; '.join(changed)}); rerun "
        "with the same options to resume it, pass --overwrite to replace it, or choose "
        "another --out"
    )


def _manifest(cfg, checkpoint, size, fingerprint, corpus, status) -> dict[str, Any]:
    return {
        "tool": "tirsynth",
        "version": __version__,
        "stage": "generate",
        "command": shlex.join(sys.argv),
        "status": status,
        "fingerprint": fingerprint,
        "input": str(Path(cfg.input).resolve()),
        "input_kind": corpus.kind,
        "checkpoint": str(checkpoint.resolve()),
        "size": size,
        "options": to_dict(replace(cfg, checkpoint=str(checkpoint))),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _steady_rate(batches: list[dict]) -> float | None:
    """Images/s from the first written batch to the last: throughput once every stage
    has started (workers spawned, the model loaded)."""
    if len(batches) < 2:
        return None
    images = sum(b["images"] + b["rejected"] for b in batches[1:])
    return images / (batches[-1]["seconds"] - batches[0]["seconds"])
