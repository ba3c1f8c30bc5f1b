"""Pair shards -> a streaming torch dataset of (RGB, TIR) tensors for training and evaluation.

Each epoch's samples are cut into contiguous, equal parts, one per (rank, DataLoader worker),
so every sample is seen exactly once per epoch and rank sizes differ by at most one sample
(or not at all with `even_ranks=True`). A part opens only the shards it overlaps.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import random
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from tirsynth import shards
from tirsynth.inference import fit_to_square

VAL_FRACTION = 0.1  # of train, carved out as val when a dataset publishes no val split


class PairDataset(IterableDataset):
    """Streams `{"rgb": (3, S, S), "tir": (1, S, S), "key", "dataset", "daynight"}` samples.

    Args:
        root: a pair-shard folder written by `tirsynth ingest`.
        split: "train", "val" or "test".
        image_size: side S of the square output.
        augment: pix2pix augmentation in the geometry of inference: fit into a `load_size`
            square keeping the aspect ratio, reflect-pad it, random S crop, random
            horizontal flip, the same for RGB and TIR. Otherwise fit into S x S exactly as
            `generate` and `evaluate` do.
        load_size: side of the square before the random crop (pix2pix: 286 for S=256).
        long_side: the working scale: with `augment`, each frame is resized so its long
            side has this many pixels (`load_size / image_size` times more, pix2pix's
            jitter, at random per sample) and cut to a random S crop, instead of being
            squeezed whole into the load square; objects keep the size in pixels that
            inference gives them.
        shuffle: shuffle shard order and samples within a buffer, per epoch.
        seed: base seed; with `set_epoch`, order and augmentation are reproducible.
        rank, world_size: distributed position; default from torch.distributed if initialised.
        even_ranks: drop up to world_size-1 samples so every rank gets the same count, which
            keeps DDP collectives in step.
        shuffle_buffer: samples held for in-part shuffling.
        keys: only these keys of the split (e.g. a carved val split); None: all of them.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        image_size: int = 256,
        augment: bool = False,
        load_size: int | None = None,
        long_side: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        even_ranks: bool = False,
        shuffle_buffer: int = 64,
        keys: Collection[str] | None = None,
    ):
        super().__init__()
        self.root = Path(root)
        rows = [r for r in shards.read_index(self.root) if r["split"] == split]
        if keys is not None:
            keys = set(keys)
            rows = [r for r in rows if r["key"] in keys]
        if not rows:
            raise ValueError(f"{root}: no samples in split {split!r}")
        # Index rows are written shard by shard in tar order; keep that order per shard.
        self.shard_keys: dict[str, list[str]] = {}
        for row in rows:
            self.shard_keys.setdefault(row["shard"], []).append(row["key"])
        self.split = split
        self.image_size = image_size
        self.load_size = load_size or round(image_size * 286 / 256)
        self.long_side = long_side
        self.augment = augment
        self.shuffle = shuffle
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.even_ranks = even_ranks
        self.shuffle_buffer = shuffle_buffer
        # Shared memory: DataLoader workers that persist across epochs see set_epoch too.
        self._epoch = multiprocessing.Value("q", 0, lock=False)

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

    def __len__(self) -> int:
        start, stop = self._rank_range()
        return stop - start

    def batch_count(self, batch_size: int, loader_workers: int = 0) -> int:
        """Full batches per epoch on this rank from a DataLoader with `drop_last=True`.

        Each DataLoader worker batches its own part, so partial batches are per worker.
        """
        bounds = _part_bounds(*self._rank_range(), max(loader_workers, 1))
        return sum((b - a) // batch_size for a, b in zip(bounds[:-1], bounds[1:], strict=True))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        order = self._epoch_order()
        start, stop = self._rank_range()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        bounds = _part_bounds(start, stop, workers)
        part = order[bounds[worker] : bounds[worker + 1]]
        wanted = {key for _, key in part}
        needed = list(dict.fromkeys(shard for shard, _ in part))
        rng = random.Random(f"{self.seed}-{self.epoch}-{start}-{worker}")
        samples = (self._transform(s) for s in self._read(needed) if s["__key__"] in wanted)
        yield from _buffer_shuffle(samples, self.shuffle_buffer, rng) if self.shuffle else samples

    def _epoch_order(self) -> list[tuple[str, str]]:
        shard_names = sorted(self.shard_keys)
        if self.shuffle:
            random.Random(f"{self.seed}-{self.epoch}").shuffle(shard_names)
        return [(shard, key) for shard in shard_names for key in self.shard_keys[shard]]

    def _rank_range(self) -> tuple[int, int]:
        rank, world = self._distributed_position()
        total = sum(len(keys) for keys in self.shard_keys.values())
        if self.even_ranks:
            per_rank = total // world
            return rank * per_rank, (rank + 1) * per_rank
        bounds = np.linspace(0, total, world + 1).round().astype(int)
        return int(bounds[rank]), int(bounds[rank + 1])

    def _distributed_position(self) -> tuple[int, int]:
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _read(self, shard_names: list[str]) -> Iterator[dict[str, Any]]:
        for name in shard_names:
            yield from shards.read_shard(self.root / name)

    def _transform(self, sample: dict[str, Any]) -> dict[str, Any]:
        record = json.loads(sample["json"])
        rgb_member = next(k for k in sample if k.startswith("rgb."))
        tir_member = next(k for k in sample if k.startswith("tir."))
        rgb = Image.fromarray(shards.decode_rgb(sample[rgb_member]))
        tir_pixels = shards.decode_tir(sample[tir_member])
        tir_scale = 65535.0 if tir_pixels.dtype == np.uint16 else 255.0
        # Float mode keeps 16-bit TIR exact through resizing.
        tir = Image.fromarray(tir_pixels.astype(np.float32) / tir_scale)
        if self.augment:
            rgb_pixels, tir_pixels = self._augment(rgb, tir, sample["__key__"])
        else:
            rgb_pixels, _ = fit_to_square(rgb, self.image_size)
            tir_pixels, _ = fit_to_square(tir, self.image_size)
        rgb_tensor = torch.from_numpy(rgb_pixels.astype(np.float32) / 127.5 - 1.0)
        tir_tensor = torch.from_numpy(np.clip(tir_pixels, 0, 1).astype(np.float32) * 2 - 1)
        return {
            "rgb": rgb_tensor.permute(2, 0, 1).contiguous(),  # (3, S, S) in [-1, 1]
            "tir": tir_tensor.unsqueeze(0),  # (1, S, S) in [-1, 1]
            "key": sample["__key__"],
            "dataset": record["dataset"],
            "daynight": record["daynight"],
        }

    def _augment(self, rgb: Image.Image, tir: Image.Image, key: str):
        # Seeded by key and epoch: the same sample gets the same crop however it is sharded.
        digest = hashlib.sha256(f"{self.seed}-{self.epoch}-{key}".encode()).digest()
        rng = random.Random(digest)
        load, size = self.load_size, self.image_size
        if self.long_side:
            rgb_pixels, tir_pixels = self._at_working_scale(rgb, tir, rng)
        else:
            rgb_pixels, _ = fit_to_square(rgb, load)  # (load, load, 3) uint8
            tir_pixels, _ = fit_to_square(tir, load)  # (load, load) float
        rows, columns = tir_pixels.shape
        left, top = rng.randint(0, columns - size), rng.randint(0, rows - size)
        rgb_pixels = rgb_pixels[top : top + size, left : left + size]
        tir_pixels = tir_pixels[top : top + size, left : left + size]
        if rng.random() < 0.5:
            rgb_pixels, tir_pixels = rgb_pixels[:, ::-1], tir_pixels[:, ::-1]
        return np.ascontiguousarray(rgb_pixels), np.ascontiguousarray(tir_pixels)

    def _at_working_scale(self, rgb: Image.Image, tir: Image.Image, rng: random.Random):
        """Both frames resized so their long side is the working scale, times a random
        jitter up to load/size, and reflect-padded where a side is shorter than the crop."""
        jitter = 1 + rng.random() * (self.load_size / self.image_size - 1)
        scale = self.long_side * jitter / max(rgb.size)
        shape = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        frames = [np.asarray(image.resize(shape, Image.Resampling.BICUBIC)) for image in (rgb, tir)]
        short = [max(0, self.image_size - shape[1]), max(0, self.image_size - shape[0])]
        if any(short):
            mode = "reflect" if min(shape) > 1 else "edge"
            frames = [
                np.pad(f, ((0, short[0]), (0, short[1]), (0, 0))[: f.ndim], mode=mode)
                for f in frames
            ]
        return frames


def carve_val_keys(root: str | Path, split: str = "train") -> list[str]:
    """A deterministic tenth of `split`'s keys (at least one) to validate on when the data
    has no val split (LLVIP and KAIST publish only train and test): the keys whose sha256
    comes first, so the choice depends only on the keys."""
    keys = [r["key"] for r in shards.read_index(Path(root)) if r["split"] == split]
    count = max(1, round(len(keys) * VAL_FRACTION)) if len(keys) > 1 else 0
    return sorted(keys, key=lambda k: hashlib.sha256(k.encode()).hexdigest())[:count]


def _part_bounds(start: int, stop: int, parts: int) -> list[int]:
    return [int(b) for b in np.linspace(start, stop, parts + 1).round()]


def _buffer_shuffle(samples, size: int, rng: random.Random):
    buffer = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= size:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer
