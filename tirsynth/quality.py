"""Generator quality on pair shards: validation metrics, sample grids, real-TIR statistics.

Used by training (validation each epoch) and by the stages that score generated images.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from tirsynth import inference, metrics
from tirsynth.data import PairDataset
from tirsynth.shards import atomic_output

# Per image at its own size, against its real TIR. SSIM and PSNR reward a blurred mean, so
# detail is measured too: GMSD (gradient magnitude similarity deviation, Xue et al. 2014;
# lower is better), the edge ratio (mean Sobel magnitude of the output over the real TIR's:
# 1 is as sharp, below is blurrier) and the LBP-histogram distance (total variation, 0..1,
# between the texture codes of output and real). Mean LBP is kept for the paper's tables:
# flat regions raise it, so it is no measure of detail.
METRICS = ("ssim", "psnr", "gmsd", "edge_ratio", "lbp_distance", "lbp_real", "lbp_fake")
DETAIL_METRICS = ("gmsd", "edge_ratio", "lbp_distance")


def validate(
    gen: nn.Module,
    pairs: Iterable[dict[str, Any]],
    size: int,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    max_samples: int = 0,
    batch_size: int = 8,
    long_side: int | None = None,
) -> dict[str, Any]:
    """SSIM, PSNR and LBP of G on decoded `pairs` (`inference.iter_pairs`), overall, by
    day/night and by dataset: each image translated at its full size exactly as `generate`
    and `evaluate` do, so the best checkpoint is chosen under the protocol users get.

    Returns:
        {each of METRICS, "samples",
         "by_daynight": {name: {...}}, "by_dataset": {name: {...}}}
    """
    rows = []
    for batch in batched(pairs, batch_size, max_samples):
        outputs = translate_pairs(gen, batch, size, autocast, long_side)
        scores = score_all([pair["real"] for pair in batch], outputs)
        rows += [{**s, **_tags(pair)} for s, pair in zip(scores, batch, strict=True)]
    result: dict[str, Any] = {**_means(rows), "samples": len(rows)}
    for field in ("daynight", "dataset"):
        result[f"by_{field}"] = {
            group: {**_means(members), "samples": len(members)}
            for group in sorted({r[field] for r in rows})
            if (members := [r for r in rows if r[field] == group])
        }
    return result


def translate_pairs(
    gen: nn.Module,
    pairs: list[dict[str, Any]],
    size: int,
    autocast=contextlib.nullcontext,
    long_side: int | None = None,
) -> list[np.ndarray]:
    """G in eval mode on the pairs' RGB images at their full size, (H, W) uint8 each: each
    frame scaled to `long_side` in a `size` square, as `generate` does."""
    was_training = gen.training
    gen.eval()
    outputs = inference.translate_images(
        [pair["rgb"] for pair in pairs],
        size,
        lambda pixels: inference.translate_squares(gen, pixels, autocast),
        long_side,
    )
    gen.train(was_training)
    return outputs


def score(real: np.ndarray, output: np.ndarray) -> dict[str, float]:
    """Each of METRICS for one output against its real TIR, both (H, W) uint8.

    scikit-image itself on whole images (the protocol `metrics` matches on tensors): its
    compiled LBP and scipy's filters are several times faster here than the tensor versions,
    which evaluation at full size (1280 x 1024 for LLVIP) would spend most of its time in.
    """
    from skimage.feature import local_binary_pattern
    from skimage.metrics import structural_similarity

    ssim = structural_similarity(
        real, output, data_range=255, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False,
    )  # fmt: skip
    reference = torch.from_numpy(real.astype(np.float64))[None]
    test = torch.from_numpy(output.astype(np.float64))[None]
    codes_real = local_binary_pattern(real, 8, 1, method="default")
    codes_fake = local_binary_pattern(output, 8, 1, method="default")
    return {
        "ssim": float(ssim),
        "psnr": metrics.psnr(reference, test).item(),
        **detail_scores(real, output),
        "lbp_distance": _histogram_distance(codes_real, codes_fake),
        "lbp_real": float(codes_real.mean()),
        "lbp_fake": float(codes_fake.mean()),
    }


def score_all(reals: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> list[dict]:
    """`score` of each output against its real TIR, in order, on one thread per core:
    scikit-image's LBP and SSIM filters and torch release the GIL, and at full size scoring
    costs more than the generator's forward pass."""
    workers = min(len(outputs), len(os.sched_getaffinity(0)))
    if workers <= 1:
        return [score(real, output) for real, output in zip(reals, outputs, strict=True)]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(score, reals, outputs))


def detail_scores(real: np.ndarray, output: np.ndarray) -> dict[str, float]:
    """GMSD (piq's, on [0, 1] images: it halves them first, as Xue et al.) and the edge
    ratio of two (H, W) uint8 images."""
    import piq

    from tirsynth.losses import gradient_map

    pair = torch.from_numpy(np.stack([real, output]).astype(np.float32) / 255)[:, None]
    gmsd = piq.gmsd(pair[1:], pair[:1], data_range=1.0).item() if min(real.shape) >= 4 else 0.0
    energy = gradient_map(pair.double(), eps=0).mean(dim=(1, 2, 3))
    ratio = (energy[1] / energy[0]).item() if energy[0] > 0 else float("nan")
    return {"gmsd": gmsd, "edge_ratio": ratio}


def _histogram_distance(codes_a: np.ndarray, codes_b: np.ndarray) -> float:
    """Total variation distance between the 256-bin histograms of two LBP code maps."""
    a = np.bincount(codes_a.astype(np.int64).ravel(), minlength=256) / codes_a.size
    b = np.bincount(codes_b.astype(np.int64).ravel(), minlength=256) / codes_b.size
    return float(np.abs(a - b).sum() / 2)


def write_sample_grid(
    gen: nn.Module,
    pairs: Iterable[dict[str, Any]],
    size: int,
    autocast: Callable[[], Any],
    rows: int,
    path: Path,
    long_side: int | None = None,
) -> Path:
    """A PNG grid, one row per pair at full size: RGB | real TIR | generated TIR."""
    chosen = list(itertools.islice(pairs, rows))
    outputs = translate_pairs(gen, chosen, size, autocast, long_side)
    grid = [[p["rgb_pixels"], p["real"], out] for p, out in zip(chosen, outputs, strict=True)]
    return write_image_grid(grid, path)


def real_tir_statistics(data: Path, image_size: int, batch_size: int = 16) -> dict[str, Any]:
    """Intensity and LBP histograms (256 bins each) over the train split's TIR images."""
    dataset = PairDataset(data, "train", image_size=image_size)
    intensity_sum = torch.zeros(256, dtype=torch.float64)
    lbp_sum = torch.zeros(256, dtype=torch.float64)
    images = 0
    for batch in DataLoader(dataset, batch_size=batch_size):
        gray = metrics.to_gray_uint8(batch["tir"])
        intensity_sum += metrics.intensity_histogram(gray).sum(dim=0)
        lbp_sum += metrics.lbp_histogram(metrics.lbp(gray)).sum(dim=0)
        images += len(gray)
    return {
        "intensity_hist": intensity_sum / images,
        "lbp_hist": lbp_sum / images,
        "images": images,
        "image_size": image_size,
    }


def _means(rows: list[dict[str, Any]]) -> dict[str, float]:
    if not rows:
        return {}
    means = {}
    for name in METRICS:
        finite = [r[name] for r in rows if np.isfinite(r[name])]
        means[name] = sum(finite) / len(finite) if finite else float("nan")
    return means


def _tags(pair: dict[str, Any]) -> dict[str, str]:
    return {"dataset": pair["dataset"], "daynight": pair["daynight"]}


def batched(items: Iterable, size: int, limit: int = 0) -> Iterator[list]:
    items = itertools.islice(items, limit or None)
    while batch := list(itertools.islice(items, size)):
        yield batch


def with_zoomed_crops(
    rows: list[list[np.ndarray]], reference: int = 1, side: int = 96, zoom: int = 3
) -> list[list[np.ndarray]]:
    """Each row followed by a row of the same `side` x `side` window cut from each of its
    images and enlarged `zoom` times, pixel for pixel (nearest), so a reader sees detail:
    the window where image `reference` (the real TIR) has the most edge energy."""
    zoomed = []
    for row in rows:
        top, left = busiest_window(row[reference], side)
        crops = []
        for pixels in row:
            crop = pixels[top : top + side, left : left + side]
            crops.append(np.repeat(np.repeat(crop, zoom, axis=0), zoom, axis=1))
        zoomed += [row, crops]
    return zoomed


def busiest_window(pixels: np.ndarray, side: int) -> tuple[int, int]:
    """(top, left) of the `side` x `side` window with the largest gradient energy."""
    gray = pixels.astype(np.float64) if pixels.ndim == 2 else pixels.astype(np.float64).mean(2)
    rows, columns = gray.shape
    side = min(side, rows, columns)
    energy = np.abs(np.diff(gray, axis=0, prepend=gray[:1])) + np.abs(
        np.diff(gray, axis=1, prepend=gray[:, :1])
    )
    summed = np.pad(energy.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    windows = (
        summed[side:, side:]
        - summed[:-side, side:]
        - summed[side:, :-side]
        + summed[:-side, :-side]
    )
    top, left = np.unravel_index(int(np.argmax(windows)), windows.shape)
    return int(top), int(left)


def write_image_grid(
    rows: list[list[np.ndarray]], path: Path, height: int | None = 160, max_height: int = 480
) -> Path:
    """A PNG with one row per sample and one column per image (uint8, gray or RGB).

    Each image is scaled to `height` keeping its aspect ratio; with `height` None, a row
    keeps its first image's own height (native resolution) up to `max_height`. Shorter rows
    are padded white.
    """
    scaled_rows = []
    for row in rows:
        cells = []
        row_height = height or min(row[0].shape[0], max_height)
        for pixels in row:
            image = Image.fromarray(pixels).convert("RGB")
            width = max(1, round(image.width * row_height / image.height))
            if image.size != (width, row_height):
                image = image.resize((width, row_height), Image.Resampling.BICUBIC)
            cells.append(image)
        scaled_rows.append(cells)
    gap = 4
    width = max(sum(c.width for c in cells) + gap * (len(cells) - 1) for cells in scaled_rows)
    heights = [cells[0].height for cells in scaled_rows]
    grid = Image.new("RGB", (width, sum(heights) + gap * (len(rows) - 1)), "white")
    y = 0
    for cells, row_height in zip(scaled_rows, heights, strict=True):
        x = 0
        for cell in cells:
            grid.paste(cell, (x, y))
            x += cell.width + gap
        y += row_height + gap
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, durable=False) as handle:
        grid.save(handle, format="PNG")
    return path
