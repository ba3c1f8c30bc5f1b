"""RGB corpus in; TIR shards, index.parquet, rejects.parquet, COCO json and report.json out.

A Ray Data pipeline, streaming so memory stays bounded: decode and fit each image to the
model's square as CPU tasks, translate in an actor pool (one replica per GPU when there
are GPUs), then map back to the input's size, encode and score as CPU tasks. The driver
writes finished samples to shards, committing each shard and its index rows atomically,
so a killed run resumes by skipping the keys already in the index.

Size handling: an image is scaled to fit the model's S x S square (S: the checkpoint's
training crop, 256 for the paper) keeping its aspect ratio, padded by reflection to the
square, translated, cropped back to the scaled content and resized bicubically to the
input's exact width and height.
"""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from tirsynth import __version__, cluster, images, inference, metrics, shards
from tirsynth.checkpoint import (
    checkpoint_config,
    load_checkpoint,
)
from tirsynth.config import GenerateConfig, to_dict
from tirsynth.corpus import COCO_PREFIX, Corpus, InputImage, discover_corpus, output_relpath
from tirsynth.report import write_report

SHARD_PREFIX = "tir"
LOCK = ".generate.lock"
REPORT = "report.json"
REJECT_COLUMNS = ("key", "path", "reason")
READ_ATTEMPTS = 3  # reads of an input before a transient error becomes a reject
RETRYABLE = " (retryable)"  # in a reject's reason: --retry-rejects tries it again


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
    train_cfg = checkpoint_config(state)
    size = cfg.size or train_cfg.data.image_size
    if size % 2**train_cfg.model.depth:
        raise ValueError(f"size {size} must be a multiple of 2**depth = {2**train_cfg.model.depth}")
    corpus = discover_corpus(cfg.input, cfg.input_kind, cfg.split)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    options = output_options(cfg, checkpoint, size)
    fingerprint = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()
    started = time.time()
    with shards.exclusive_lock(out, LOCK, "generate"):
        _refuse_changed_options(out, options, cfg.overwrite)
        extra = (REPORT, cluster.LOG_NAME, *(COCO_PREFIX + name for name in corpus.coco_files))
        index = shards.prepare_output(
            out, fingerprint, cfg.overwrite, (SHARD_PREFIX,), "generate", extra
        )
        previous_rejects = shards.read_rejects(out)
        if cfg.retry_rejects:  # try the rejects again, read errors first among them
            previous_rejects = []
        done = {r["key"] for r in index} | {r["key"] for r in previous_rejects}
        rejects = previous_rejects + [r for r in corpus.rejects if r["key"] not in done]
        pending = [image for image in corpus.images if image.key not in done]
        manifest = _manifest(cfg, checkpoint, size, fingerprint, corpus, "incomplete")
        manifest["output_options"] = options  # what a resume must agree on
        shards.write_json(out / shards.MANIFEST, manifest)
        writer = ShardWriter(out, index, rejects, cfg.shard_size)
        batches, pipeline_seconds = [], 0.0
        if pending:
            batches, pipeline_seconds = _run_pipeline(
                cfg, corpus, pending, checkpoint, size, state, writer, progress
            )
        writer.close()
        if corpus.coco_files:
            write_coco(out, corpus, writer.index)
        report = build_report(
            cfg, checkpoint, corpus, writer, batches, time.time() - started, pipeline_seconds
        )
        shards.write_json(out / REPORT, report)
        write_report(out)
        shards.write_json(out / shards.MANIFEST, {**manifest, "status": "complete"})
    return GenerateResult(out, checkpoint, writer.added, len(writer.index), writer.rejects, report)


def preprocess_batch(
    batch: dict[str, np.ndarray], size: int, root: str, max_pixels: int, keep_rgb: bool
) -> dict[str, np.ndarray]:
    """Read and decode each input, fit it to `size` x `size` (see the module docstring).

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
                pixels, (content_w, content_h) = inference.fit_to_square(image, size)
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
    out["pixels"] = np.stack(columns["pixels"])
    for name in ("width", "height", "content_width", "content_height"):
        out[name] = np.array(columns[name], dtype=np.int64)
    return out


def postprocess_batch(
    batch: dict[str, np.ndarray],
    intensity_hist: list[float],
    lbp_hist: list[float],
    min_structure: float | None,
) -> dict[str, np.ndarray]:
    """Map each output back to its input's size, encode it as PNG and score it.

    Returns:
        key, tir_png (bytes), width, height, rgb, metrics (JSON), error (including low
        structure).
    """
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
    return {name: np.array(values, dtype=object) for name, values in columns.items()}


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


class ShardWriter:
    """Writes generated samples to `tir-NNNNNN.tar` shards on the driver.

    A shard is renamed into place when full, then its rows are committed to index.parquet
    and the rejects to rejects.parquet, each atomically: a kill loses at most the samples
    of the open shard, which the next run regenerates.
    """

    def __init__(self, out: Path, index: list[dict], rejects: list[dict], shard_size: int):
        self.out, self.index, self.rejects = out, list(index), list(rejects)
        self.shard_size = shard_size
        self.buffer: list[tuple[dict, dict]] = []  # (sample, index row)
        self.number = shards.next_shard_number(out, SHARD_PREFIX)
        self.added = 0
        self._commit()  # persists rejects found before generation

    def add(self, sample: dict[str, bytes], row: dict[str, Any]) -> None:
        self.buffer.append((sample, row))
        if len(self.buffer) >= self.shard_size:
            self.flush()

    def reject(self, row: dict[str, Any]) -> None:
        self.rejects.append(row)

    def flush(self) -> None:
        if self.buffer:
            name = f"{SHARD_PREFIX}-{self.number:06d}.tar"
            shards.write_shard(self.out / name, (sample for sample, _ in self.buffer))
            size = shards.file_size(self.out / name)
            self.index += [{**row, "shard": name, "shard_bytes": size} for _, row in self.buffer]
            self.added += len(self.buffer)
            self.number += 1
            self.buffer = []
        self._commit()

    def close(self) -> None:
        self.flush()

    def _commit(self) -> None:
        if self.index:
            shards.write_table(self.out / shards.INDEX, self.index)
        if self.rejects:
            shards.write_rejects(self.out, self.rejects, REJECT_COLUMNS)


def write_coco(out: Path, corpus: Corpus, index: list[dict]) -> list[Path]:
    """COCO input: each instances json again, its images pointing at the TIR outputs
    (`export` paths, with the shard and key), annotations unchanged; images that were
    rejected are left out with their annotations, so no label points at a missing image."""
    by_key = {row["key"]: row for row in index}
    key_of = {}  # (json name, image id) -> key
    for image in corpus.images:
        coco = json.loads(image.labels)["coco"]
        key_of[coco["file"], coco["image"]["id"]] = image.key
    written = []
    for name, coco in corpus.coco_files.items():
        kept_images = []
        for entry in coco["images"]:
            row = by_key.get(key_of.get((name, entry["id"]), ""))
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
        annotations = [a for a in coco.get("annotations", []) if a["image_id"] in kept_ids]
        path = out / f"{COCO_PREFIX}{name}"
        shards.write_json(path, {**coco, "images": kept_images, "annotations": annotations})
        written.append(path)
    return written


def build_report(
    cfg, checkpoint, corpus, writer, batches, seconds, pipeline_seconds
) -> dict[str, Any]:
    names = [n for n in metrics.QUALITY_FIELDS if any(n in row for row in writer.index)]
    overall = {n: _mean([row[n] for row in writer.index if row.get(n) is not None]) for n in names}
    return {
        "stage": "generate",
        "command": shlex.join(sys.argv),
        "tirsynth": __version__,
        "checkpoint": str(checkpoint),
        "input": str(cfg.input),
        "input_kind": corpus.kind,
        "options": to_dict(cfg),
        "outputs": len(writer.index),
        "generated_this_run": writer.added,
        "seconds": seconds,
        "pipeline_seconds": pipeline_seconds,  # without starting Ray and listing the input
        "images_per_s": writer.added / pipeline_seconds if pipeline_seconds else 0.0,
        "steady_images_per_s": _steady_rate(batches),
        "overall": overall,
        "batches": batches,
        "rejects": len(writer.rejects),
        "rejects_by_reason": dict(shards.rejects_by_reason(writer.rejects)),
    }


def _run_pipeline(
    cfg, corpus, pending, checkpoint, size, state, writer, progress
) -> tuple[list[dict], float]:
    import ray
    import ray.data

    with cluster.ray_session(cfg.address, writer.out / cluster.LOG_NAME, cfg.verbose) as console:
        started = time.perf_counter()
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # ours counts images, not blocks
        gpus = int(ray.cluster_resources().get("GPU", 0))
        replicas = cfg.workers or max(gpus, 1)
        # Ray gives each actor one thread per CPU it reserves. On the CPU the model is the
        # bottleneck and the CPU tasks mostly wait for it, so each replica reserves one CPU
        # (leaving the rest to decoding and scoring) but runs on its share of all of them.
        threads = 0 if gpus else max(1, int(ray.cluster_resources().get("CPU", 1)) // replicas)
        rows = [{"key": i.key, "path": i.path, "shard": i.shard} for i in pending]
        stats = state["tir_stats"]
        dataset = (
            ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // cfg.batch_size))
            .map_batches(
                preprocess_batch,
                batch_size=cfg.batch_size,
                fn_kwargs={
                    "size": size,
                    "root": str(corpus.root),
                    "max_pixels": cfg.max_pixels,
                    "keep_rgb": cfg.keep_rgb,
                },
            )
            .map_batches(
                inference.Translator,
                batch_size=cfg.batch_size,
                fn_constructor_kwargs={
                    "checkpoint": str(checkpoint.resolve()),
                    "precision": cfg.precision,
                    "threads": threads,
                },
                compute=ray.data.ActorPoolStrategy(size=replicas),
                num_gpus=1 if gpus else 0,  # Ray Data restarts a crashed actor, retries its task
            )
            .map_batches(
                postprocess_batch,
                batch_size=cfg.batch_size,
                fn_kwargs={
                    "intensity_hist": stats["intensity_hist"].tolist(),
                    "lbp_hist": stats["lbp_hist"].tolist(),
                    "min_structure": cfg.min_structure,
                },
            )
        )
        by_key = {image.key: image for image in pending}
        batches = []
        bar = tqdm(
            total=len(pending), disable=not progress, unit="img", desc="generate", file=console
        )
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            batches.append(_write_batch(batch, by_key, corpus, writer, len(batches)))
            batches[-1]["seconds"] = time.perf_counter() - started  # when it was written
            bar.update(len(batch["key"]))
        bar.close()
        return batches, time.perf_counter() - started


def _write_batch(batch, by_key, corpus, writer, number) -> dict[str, Any]:
    scored = []
    for i, key in enumerate(batch["key"]):
        image: InputImage = by_key[key]
        if batch["error"][i]:
            writer.reject(
                {"key": key, "path": image.path or image.shard, "reason": str(batch["error"][i])}
            )
            continue
        scores = json.loads(batch["metrics"][i])
        labels = json.loads(image.labels)
        tir_png = batch["tir_png"][i]
        width, height = int(batch["width"][i]), int(batch["height"][i])
        record = {
            "key": key,
            "source": image.path or f"{image.shard}:{key}",
            "relpath": image.relpath,
            "width": width,
            "height": height,
            "labels": labels,
            "metrics": scores,
        }
        sample = {"__key__": key, "tir.png": tir_png, "json": json.dumps(record).encode()}
        if batch["rgb"][i]:
            sample[f"rgb.{_image_extension(batch['rgb'][i])}"] = batch["rgb"][i]
        row = {
            "key": key,
            "relpath": image.relpath,
            "source": record["source"],
            "width": width,
            "height": height,
            "input_kind": corpus.kind,
            **scores,
        }
        writer.add(sample, row)
        scored.append(scores)
    names = sorted({n for s in scored for n in s})
    return {
        "batch": number,
        "images": len(scored),
        "rejected": len(batch["key"]) - len(scored),
        **{n: _mean([s[n] for s in scored if n in s]) for n in names},
    }


def _read_sources(keys, paths, shard_names, root) -> dict[str, tuple[bytes, bytes, str]]:
    """key -> (RGB bytes, real TIR bytes or b'', error or '')."""
    sources = {}
    wanted_by_shard: dict[str, set[str]] = {}
    for key, path, shard in zip(keys, paths, shard_names, strict=True):
        if shard:
            wanted_by_shard.setdefault(shard, set()).add(key)
            continue
        try:
            sources[key] = (read_with_retries(Path(path)), b"", "")
        except OSError as err:
            retryable = RETRYABLE if _is_transient(err) else ""
            sources[key] = (b"", b"", f"unreadable file{retryable}: {err.strerror or err}")
    for shard, wanted in wanted_by_shard.items():
        for sample in shards.read_shard(Path(root) / shard):
            if sample["__key__"] in wanted:
                rgb = next(v for k, v in sample.items() if k.startswith("rgb."))
                tir = next(v for k, v in sample.items() if k.startswith("tir."))
                sources[sample["__key__"]] = (rgb, tir, "")
        for key in wanted - sources.keys():
            sources[key] = (b"", b"", f"sample missing from pair shard {shard}")
    return sources


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


def output_options(cfg: GenerateConfig, checkpoint: Path, size: int) -> dict[str, Any]:
    """What decides the outputs: a resumed run must agree on all of it (the fingerprint)."""
    return {
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


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None
