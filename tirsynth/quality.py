"""Generator quality on pair shards: validation metrics, sample grids, real-TIR statistics.

Used by training (validation each epoch) and by the stages that score generated images.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from tirsynth import metrics
from tirsynth.data import PairDataset
from tirsynth.shards import atomic_output


@torch.no_grad()
def validate(
    gen: nn.Module,
    dataset: PairDataset,
    device: torch.device,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    max_samples: int = 0,
    batch_size: int = 8,
) -> dict[str, Any]:
    """SSIM, PSNR and LBP of G on `dataset`, overall, by day/night and by dataset.

    Returns:
        {"ssim", "psnr", "lbp_real", "lbp_fake", "samples",
         "by_daynight": {name: {...}}, "by_dataset": {name: {...}}}
    """
    per_image: dict[str, list[float]] = {}
    tags: dict[str, list[str]] = {"daynight": [], "dataset": []}
    was_training = gen.training
    gen.eval()
    for batch in DataLoader(dataset, batch_size=batch_size):
        fake = generate_batch(gen, batch["rgb"], device, autocast)
        values = metrics.image_metrics(batch["tir"], fake.cpu())
        for name, tensor in values.items():
            per_image.setdefault(name, []).extend(tensor.tolist())
        for field, values_of_field in tags.items():
            values_of_field.extend(batch[field])
        if max_samples and len(tags["dataset"]) >= max_samples:
            break
    gen.train(was_training)
    count = min(len(tags["dataset"]), max_samples) if max_samples else len(tags["dataset"])
    result: dict[str, Any] = _means(per_image, range(count))
    result["samples"] = count
    for field, groups in tags.items():
        result[f"by_{field}"] = {
            group: {**_means(per_image, idx), "samples": len(idx)}
            for group in sorted(set(groups[:count]))
            if (idx := [i for i in range(count) if groups[i] == group])
        }
    return result


def generate_batch(
    gen: nn.Module, rgb: torch.Tensor, device: torch.device, autocast=contextlib.nullcontext
) -> torch.Tensor:
    """G(rgb) as float32 on `device`: (B, 3, S, S) in [-1, 1] -> (B, C, S, S) in [-1, 1]."""
    with autocast():
        return gen(rgb.to(device)).float()


@torch.no_grad()
def write_sample_grid(
    gen: nn.Module,
    dataset: PairDataset,
    device: torch.device,
    autocast: Callable[[], Any],
    rows: int,
    path: Path,
) -> Path:
    """A PNG grid, one row per sample: RGB | real TIR | generated TIR."""
    from torchvision.utils import make_grid, save_image

    batch = next(iter(DataLoader(dataset, batch_size=rows)))
    was_training = gen.training
    gen.eval()
    fake = generate_batch(gen, batch["rgb"], device, autocast).cpu()
    gen.train(was_training)

    def as_rgb(t):  # (B, 1|3, S, S) -> (B, 3, S, S)
        return t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t

    tiles = torch.stack([batch["rgb"], as_rgb(batch["tir"]), as_rgb(fake)], dim=1)  # (B, 3, ...)
    grid = make_grid(tiles.flatten(0, 1), nrow=3, padding=2, value_range=(-1, 1), normalize=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, durable=False) as handle:
        save_image(grid, handle, format="png")
    return path


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


def _means(per_image: dict[str, list[float]], indices) -> dict[str, float]:
    indices = list(indices)
    return {
        name: sum(values[i] for i in indices) / len(indices) for name, values in per_image.items()
    }


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
