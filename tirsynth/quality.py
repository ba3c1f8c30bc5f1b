"""Generator quality on pair shards: validation metrics, sample grids, real-TIR statistics.

Used by training (validation each epoch) and by the stages that score generated images.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator
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

METRICS = ("ssim", "psnr", "lbp_real", "lbp_fake")


def validate(
    gen: nn.Module,
    pairs: Iterable[dict[str, Any]],
    size: int,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    max_samples: int = 0,
    batch_size: int = 8,
) -> dict[str, Any]:
    """SSIM, PSNR and LBP of G on decoded `pairs` (`inference.iter_pairs`), overall, by
    day/night and by dataset: each image translated at its full size exactly as `generate`
    and `evaluate` do, so the best checkpoint is chosen under the protocol users get.

    Returns:
        {"ssim", "psnr", "lbp_real", "lbp_fake", "samples",
         "by_daynight": {name: {...}}, "by_dataset": {name: {...}}}
    """
    rows = []
    for batch in batched(pairs, batch_size, max_samples):
        outputs = translate_pairs(gen, batch, size, autocast)
        for pair, output in zip(batch, outputs, strict=True):
            rows.append({**score(pair["real"], output), **_tags(pair)})
    result: dict[str, Any] = {**_means(rows), "samples": len(rows)}
    for field in ("daynight", "dataset"):
        result[f"by_{field}"] = {
            group: {**_means(members), "samples": len(members)}
            for group in sorted({r[field] for r in rows})
            if (members := [r for r in rows if r[field] == group])
        }
    return result


def translate_pairs(
    gen: nn.Module, pairs: list[dict[str, Any]], size: int, autocast=contextlib.nullcontext
) -> list[np.ndarray]:
    """G in eval mode on the pairs' RGB images at their full size, (H, W) uint8 each."""
    was_training = gen.training
    gen.eval()
    outputs = inference.translate_images(
        [pair["rgb"] for pair in pairs],
        size,
        lambda pixels: inference.translate_squares(gen, pixels, autocast),
    )
    gen.train(was_training)
    return outputs


def score(real: np.ndarray, output: np.ndarray) -> dict[str, float]:
    """SSIM, PSNR and mean LBP of one output against its real TIR, both (H, W) uint8.

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
    return {
        "ssim": float(ssim),
        "psnr": metrics.psnr(reference, test).item(),
        "lbp_real": float(local_binary_pattern(real, 8, 1, method="default").mean()),
        "lbp_fake": float(local_binary_pattern(output, 8, 1, method="default").mean()),
    }


def write_sample_grid(
    gen: nn.Module,
    pairs: Iterable[dict[str, Any]],
    size: int,
    autocast: Callable[[], Any],
    rows: int,
    path: Path,
) -> Path:
    """A PNG grid, one row per pair at full size: RGB | real TIR | generated TIR."""
    chosen = list(itertools.islice(pairs, rows))
    outputs = translate_pairs(gen, chosen, size, autocast)
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
    return {name: sum(r[name] for r in rows) / len(rows) for name in METRICS if rows}


def _tags(pair: dict[str, Any]) -> dict[str, str]:
    return {"dataset": pair["dataset"], "daynight": pair["daynight"]}


def batched(items: Iterable, size: int, limit: int = 0) -> Iterator[list]:
    items = itertools.islice(items, limit or None)
    while batch := list(itertools.islice(items, size)):
        yield batch


def write_image_grid(rows: list[list[np.ndarray]], path: Path, height: int = 160) -> Path:
    """A PNG with one row per sample and one column per image (uint8, gray or RGB).

    Each image is scaled to `height` keeping its aspect ratio; shorter rows are padded white.
    """
    scaled_rows = []
    for row in rows:
        cells = []
        for pixels in row:
            image = Image.fromarray(pixels).convert("RGB")
            width = max(1, round(image.width * height / image.height))
            cells.append(image.resize((width, height), Image.Resampling.BICUBIC))
        scaled_rows.append(cells)
    gap = 4
    width = max(sum(c.width for c in cells) + gap * (len(cells) - 1) for cells in scaled_rows)
    grid = Image.new("RGB", (width, len(rows) * (height + gap) - gap), "white")
    for r, cells in enumerate(scaled_rows):
        x = 0
        for cell in cells:
            grid.paste(cell, (x, r * (height + gap)))
            x += cell.width + gap
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, durable=False) as handle:
        grid.save(handle, format="PNG")
    return path
