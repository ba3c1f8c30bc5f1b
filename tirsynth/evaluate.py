"""Checkpoints and pair shards in; per-image metrics, aggregates, sample grids and a report out.

Each model translates every image of the split at the input's full size, exactly as
`generate` does (fit to the model's square, translate, map back), and is scored against the
real TIR with SSIM, PSNR and LBP. Two trivial baselines show what a model adds: the RGB
luma taken as the TIR, and its inverse.
"""

from __future__ import annotations

import io
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from tirsynth import __version__, inference, metrics, quality, shards, temporal
from tirsynth.checkpoint import checkpoint_config, checkpoint_path, load_checkpoint
from tirsynth.config import EvaluateConfig, to_dict
from tirsynth.report import write_report_or_warn

PER_IMAGE = "evaluation.parquet"
REPORT = "report.json"
METRICS = quality.METRICS
BASELINES = ("rgb-luma", "inverted-luma")
# The paper's results on KAIST (SSIM, PSNR dB): Table 2 (overall) and Table 4 (day/night).
PAPER = {
    "source": "Sparse GANs for Thermal Infrared Image Generation From Optical Image, "
    "Tables 2 and 4 (KAIST)",
    "table2": {
        "skips {1,3}": (0.636, 28.77),
        "skips {5,7}": (0.659, 28.88),
        "sparse {1,3,5,7}": (0.664, 29.00),
    },
    "table4": {
        "pix2pix (dense)": {"day": (0.7480, 29.2238), "night": (0.6918, 28.9935)},
        "pix2pix + L1(I)": {"day": (0.7633, 29.5015), "night": (0.6981, 29.0131)},
        "pix2pix + L1(GRA)": {"day": (0.7968, 29.5069), "night": (0.6991, 29.1939)},
        "sparse (full model)": {"day": (0.8011, 29.5331), "night": (0.7012, 29.1821)},
    },
}


@dataclass(frozen=True)
class EvaluateResult:
    out: Path
    results: dict[str, Any]  # model name -> {"overall", "by_dataset", "by_daynight"}
    report: dict[str, Any]


def run(cfg: EvaluateConfig, progress: bool = True) -> EvaluateResult:
    """Score each checkpoint (and the baselines) on `cfg.split` of `cfg.data`.

    Args:
        cfg: the evaluate options.
        progress: show progress bars.

    Returns:
        The aggregates and the report (also written to `cfg.out`).
    """
    started = time.time()
    data, out = Path(cfg.data), Path(cfg.out)
    rows = [r for r in shards.read_index(data) if r["split"] == cfg.split]
    if not rows:
        raise ValueError(f"{data}: no samples in split {cfg.split!r}")
    checkpoints = [
        inference.resolve_checkpoint(cfg.checkpoint),
        *map(checkpoint_path, cfg.compare),
    ]
    names = list(cfg.names) or checkpoint_names(checkpoints)
    models = [
        describe_checkpoint(name, path) for name, path in zip(names, checkpoints, strict=True)
    ]
    if cfg.baselines:
        models += [{"name": name, "kind": "baseline"} for name in BASELINES]
    per_image, outputs_of, temporal_of = [], {}, {}
    clip_of = {r["key"]: (r["clip"], int(r["frame"])) for r in rows if r.get("clip")}
    for model in models:
        translate = translator(model, cfg)
        outputs_of[model["name"]] = translate
        samples = inference.iter_pairs(data, rows)
        clip_frames: dict[str, list] = {}
        bar = tqdm(total=len(rows), disable=not progress, desc=model["name"], unit="img")
        for batch in quality.batched(samples, cfg.batch_size):
            outputs = translate([s["rgb"] for s in batch])
            scores = quality.score_all([s["real"] for s in batch], outputs)
            for sample, output, scored in zip(batch, outputs, scores, strict=True):
                if sample["key"] in clip_of:
                    clip, frame = clip_of[sample["key"]]
                    clip_frames.setdefault(clip, []).append((frame, output, sample["real"]))
                per_image.append(
                    {
                        "model": model["name"],
                        "key": sample["key"],
                        "dataset": sample["dataset"],
                        "daynight": sample["daynight"],
                        **scored,
                    }
                )
            bar.update(len(batch))
        bar.close()
        if clip_frames:
            temporal_of[model["name"]] = clip_temporal_scores(clip_frames)
    out.mkdir(parents=True, exist_ok=True)
    shards.remove_temporaries(out)  # of a killed evaluation into the same folder
    shards.write_table(out / PER_IMAGE, per_image)
    results = {
        m["name"]: summarize([r for r in per_image if r["model"] == m["name"]]) for m in models
    }
    grids = write_grids(out, data, rows, per_image, models, outputs_of, cfg.grid_rows)
    report = {
        "stage": "evaluate",
        "command": shlex.join(sys.argv),
        "tirsynth": __version__,
        "torch": str(torch.__version__),
        "data": str(data.resolve()),
        "split": cfg.split,
        "samples": len(rows),
        "options": to_dict(cfg),
        "models": models,
        "results": results,
        "grids": grids,
        "curves": {
            m["name"]: training_curve(Path(m["checkpoint"]))
            for m in models
            if m["kind"] == "checkpoint"
        },
        "temporal": temporal_of or None,
        "paper": PAPER if cfg.paper else None,
        "seconds": time.time() - started,
    }
    shards.write_json(out / REPORT, report)
    write_report_or_warn(out)
    return EvaluateResult(out, results, report)


def clip_temporal_scores(clip_frames: dict[str, list[tuple]]) -> dict[str, Any]:
    """Flicker ratio and temporal error (`tirsynth.temporal`) of each clip's outputs
    against its real TIR, between the clip's consecutive ingested frames (its ingest's
    frame stride apart), and over all clips (frame steps weighted alike)."""
    by_clip = {}
    for clip, frames in sorted(clip_frames.items()):
        frames.sort(key=lambda item: item[0])
        scores = temporal.temporal_scores([f[1] for f in frames], [f[2] for f in frames])
        gaps = np.diff([f[0] for f in frames])
        by_clip[clip] = {**scores, "stride": int(np.median(gaps)) if len(gaps) else None}
    steps = {clip: max(s["frames"] - 1, 0) for clip, s in by_clip.items()}
    total = sum(steps.values())
    if not total:
        return {"clips": by_clip, "overall": None}

    def weighted(name: str) -> float:
        return sum(by_clip[c][name] * n for c, n in steps.items() if n) / total

    output, reference = weighted("output_change"), weighted("reference_change")
    overall = {
        "flicker_ratio": output / reference if reference else float("nan"),
        "temporal_error": weighted("temporal_error"),
        "output_change": output,
        "reference_change": reference,
        "frame_steps": total,
    }
    return {"clips": by_clip, "overall": overall}


def summarize(rows: list[dict]) -> dict[str, Any]:
    """Means of each metric: overall, by dataset and by day/night (with counts)."""

    def means(group: list[dict]) -> dict[str, float]:
        finite = {m: [r[m] for r in group if np.isfinite(r[m])] for m in METRICS}
        return {"images": len(group), **{m: float(np.mean(v)) for m, v in finite.items() if v}}

    result: dict[str, Any] = {"overall": means(rows)}
    for field in ("dataset", "daynight"):
        values = sorted({r[field] for r in rows})
        result[f"by_{field}"] = {v: means([r for r in rows if r[field] == v]) for v in values}
    return result


def training_curve(checkpoint: Path) -> list[dict[str, float]]:
    """Validation SSIM and PSNR at the end of each epoch of the checkpoint's training run."""
    stats = checkpoint.parent.parent / "stats.jsonl"
    if not stats.exists():
        return []
    import json

    records = [json.loads(line) for line in stats.read_text().splitlines() if line.strip()]
    return [
        {"epoch": r["epoch"], "step": r["step"], "ssim": r["ssim"], "psnr": r["psnr"]}
        for r in records
        if r["kind"] == "val"
    ]


def write_grids(out, data, rows, per_image, models, outputs_of, count) -> dict[str, Any]:
    """Sample grids, one row per sample: RGB | real TIR | each model's output.

    Samples are chosen by the first model's SSIM: the worst, the best, and at random.
    """
    first = models[0]["name"]
    ranked = sorted((r for r in per_image if r["model"] == first), key=lambda r: r["ssim"])
    keys = [r["key"] for r in ranked]
    chosen = {
        "worst": keys[:count],
        "best": keys[::-1][:count],
        "random": random.Random(0).sample(keys, min(count, len(keys))),
    }
    columns = ["RGB", "real TIR", *(m["name"] for m in models if m["kind"] == "checkpoint")]
    ssim_of = {(r["model"], r["key"]): r["ssim"] for r in per_image}
    grids = {}
    for title, wanted in chosen.items():
        wanted_rows = [r for r in rows if r["key"] in wanted]
        samples = {s["key"]: s for s in inference.iter_pairs(data, wanted_rows)}
        grid_rows = []
        for key in wanted:
            sample = samples[key]
            cells = [sample["rgb_pixels"], sample["real"]]
            cells += [outputs_of[name]([sample["rgb"]])[0] for name in columns[2:]]
            grid_rows.append(cells)
        # Native resolution, each sample with a zoomed window where the real TIR has most
        # detail: blur that a scaled-down grid hides is plain there.
        path = quality.write_image_grid(
            quality.with_zoomed_crops(grid_rows), out / "grids" / f"{title}.png", height=None
        )
        grids[title] = {
            "path": str(path.relative_to(out)),
            "columns": columns,
            "keys": wanted,
            "ssim": [round(ssim_of[first, k], 4) for k in wanted],
        }
    return grids


def translator(model: dict, cfg: EvaluateConfig):
    """A function: list of RGB PIL images -> list of (H, W) uint8 outputs at their size, for
    a `describe_checkpoint` model or a baseline ({"kind": "baseline", "name": ...})."""
    if model["kind"] == "baseline":
        invert = model["name"] == "inverted-luma"

        def baseline(images):
            lumas = [_luma(np.asarray(image)) for image in images]
            return [255 - luma if invert else luma for luma in lumas]

        return baseline
    depth = model["depth"]
    long_side = cfg.long_side or model["long_side"]
    size = inference.canvas_side(long_side, depth)
    generator = inference.Translator(
        model["checkpoint"], cfg.precision, tile=inference.canvas_side(cfg.tile, depth)
    )
    return lambda images: inference.translate_images(
        images, size, lambda pixels: generator({"pixels": pixels})["tir"], long_side
    )


def _luma(rgb: np.ndarray) -> np.ndarray:
    gray = metrics.to_gray_uint8(
        torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None].double() / 127.5 - 1
    )
    return gray[0].numpy().astype(np.uint8)


def describe_checkpoint(name: str, path: Path) -> dict[str, Any]:
    state = load_checkpoint(path)
    cfg = checkpoint_config(state)
    return {
        "name": name,
        "kind": "checkpoint",
        "checkpoint": str(path.resolve()),
        "step": state["step"],
        "epoch": state.get("epoch"),
        "skips": list(cfg.model.resolved_skips()),
        "loss": to_dict(cfg.loss),
        "image_size": cfg.data.image_size,
        "long_side": cfg.data.working_long_side,  # its working scale
        "depth": cfg.model.depth,
        "val": state.get("val", {}),
    }


def checkpoint_names(paths: list[Path]) -> list[str]:
    """A distinct display name per checkpoint: runs/NAME/checkpoints/X.pt -> NAME, else the
    file stem; numbered where two would collide."""
    names = [p.parent.parent.name if p.parent.name == "checkpoints" else p.stem for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{name}-{i}" for i, name in enumerate(names)]


def results_figure(
    pairs: list[tuple[str, str]],
    checkpoint: Path,
    out: Path,
    cfg: EvaluateConfig,
    compare: tuple[Path, ...] = (),
) -> Path:
    """One PNG: a row per registered pair, RGB | generated TIR | real TIR, each at the
    pair's own resolution (rows taller than 480 pixels are scaled down to 480); each model
    of `compare` adds a generated column after the first, in order. A path may name a
    video frame (`clip.mp4#frame=N`, frames counted from 0)."""
    translators = [
        translator(describe_checkpoint(path.stem, path), cfg) for path in (checkpoint, *compare)
    ]
    rows = []
    for rgb_path, tir_path in pairs:
        rgb = _read_image(rgb_path, "rgb").convert("RGB")
        real = np.asarray(_read_image(tir_path, "tir").convert("L"))
        if real.shape != (rgb.height, rgb.width):
            raise ValueError(f"{rgb_path} and {tir_path} differ in size: not a registered pair")
        rows.append([np.asarray(rgb), *(translate([rgb])[0] for translate in translators), real])
    return quality.write_image_grid(rows, out, height=None)


def _read_image(path: str, role: str):
    """An image file, or a video frame (decoded by `video.read_frame`), as PIL."""
    from PIL import Image, ImageOps

    from tirsynth import video

    if video.parse_frame_path(path) is not None:
        return Image.open(io.BytesIO(video.read_frame(path, role).data))
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).copy()
