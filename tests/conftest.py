"""Shared fixtures: synthetic paired datasets in each published layout, and the real data."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SAMPLE = Path(__file__).resolve().parents[1] / "tirsynth" / "sample"


def pair_images(seed: int, size=(40, 32)) -> tuple[Image.Image, Image.Image]:
    """A random RGB image and a TIR image derived from it (so the pair is 'registered')."""
    rng = np.random.default_rng(seed)
    width, height = size
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    tir = (255 - rgb.mean(axis=2)).astype(np.uint8)
    return Image.fromarray(rgb), Image.fromarray(tir)


def write_pair(rgb_path: Path, tir_path: Path, seed: int, size=(40, 32), fmt="PNG") -> None:
    rgb, tir = pair_images(seed, size)
    for image, path in ((rgb, rgb_path), (tir, tir_path)):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format=fmt)


@pytest.fixture
def roadscene_dir(tmp_path) -> Path:
    root = tmp_path / "RoadScene"
    for i in range(6):
        write_pair(
            root / "crop_LR_visible" / f"FLIR_{i:05d}.jpg",
            root / "cropinfrared" / f"FLIR_{i:05d}.jpg",
            i,
            fmt="JPEG",
        )
    return root


@pytest.fixture
def llvip_dir(tmp_path) -> Path:
    root = tmp_path / "LLVIP"
    for split, start in (("train", 10000), ("test", 19000)):
        for i in range(3):
            stem = f"{start + i:06d}"
            write_pair(
                root / "visible" / split / f"{stem}.jpg",
                root / "infrared" / split / f"{stem}.jpg",
                start + i,
                fmt="JPEG",
            )
            write_voc(root / "Annotations" / f"{stem}.xml", [("person", (1, 2, 11, 22))])
    return root


@pytest.fixture
def kaist_dir(tmp_path) -> Path:
    root = tmp_path / "kaist-rgbt"
    for set_number in (0, 3, 6, 9):
        folder = root / "images" / f"set{set_number:02d}" / "V000"
        write_pair(
            folder / "visible" / "I00000.jpg",
            folder / "lwir" / "I00000.jpg",
            set_number,
            fmt="JPEG",
        )
        labels = root / "annotations" / f"set{set_number:02d}" / "V000" / "I00000.txt"
        labels.parent.mkdir(parents=True, exist_ok=True)
        labels.write_text("% bbGt version=3\nperson 5 6 7 8 1 0 0 0 0 0 0\n")
    return root


def write_voc(path: Path, objects: list[tuple[str, tuple[int, int, int, int]]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(
        f"<object><name>{name}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for name, (x0, y0, x1, y1) in objects
    )
    path.write_text(f"<annotation>{body}</annotation>")


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "roadscene").is_dir():
        pytest.skip(f"real RoadScene/LLVIP data not found at {SHARED_DATA} (../shared/data)")
    return SHARED_DATA


def smooth_rgb(rng: np.random.Generator, size: int = 40) -> np.ndarray:
    """A smooth random colour image: 5x5 random colours upsampled bicubically."""
    coarse = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))


@pytest.fixture(scope="session")
def learnable_shards(tmp_path_factory) -> Path:
    """48 smooth pairs whose TIR is a fixed function of the RGB (inverted luma), split by key
    hash into train and val, alternately tagged day and night."""
    from tirsynth import ingest
    from tirsynth.config import IngestConfig

    root = tmp_path_factory.mktemp("learnable")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(48):
        rgb = smooth_rgb(rng)
        luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        tir = (255 - luma).round().astype(np.uint8)
        for image, folder in ((rgb, "rgb"), (tir, "tir")):
            (root / folder).mkdir(exist_ok=True)
            Image.fromarray(image).save(root / folder / f"s{i:02d}.png")
        rows.append({"stem": f"s{i:02d}", "daynight": "day" if i % 2 else "night"})
    out = root / "shards"
    ingest.run(
        IngestConfig(
            rgb_dir=str(root / "rgb"),
            tir_dir=str(root / "tir"),
            meta=str(write_csv(root / "meta.csv", rows)),
            out=str(out),
            shard_size=8,
            split=(0.75, 0.25, 0.0),
        )
    )
    return out


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (2 CPUs, a small object store).

    Ray refuses to spill to disk here, as it does for real when the disk is 95% full: a
    test that needs more than the object store fails on every machine, not only on a full one.
    """
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        object_store_memory=200 * 1024**2,
        include_dashboard=False,
        _system_config={"local_fs_capacity_threshold": 0},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_checkpoint(learnable_shards, tmp_path_factory) -> Path:
    """A tiny generator trained for 200 steps on `learnable_shards` (inverted luma)."""
    from tirsynth import train
    from tirsynth.config import TrainConfig, load_config

    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml",
        TrainConfig,
        ["train.max_steps=200", "train.epochs=1000", "train.lr=1e-3", "train.log_every=50"],
    )
    run = tmp_path_factory.mktemp("tiny-run")
    return train.run(cfg, learnable_shards, run, progress=False).best_checkpoint


def write_video(
    path: Path, frames: int, size=(64, 48), offset: int = 0, levels: list[int] | None = None
) -> None:
    """A clip whose frame n is flat grey of level 10 * n + offset, or levels[n] (mpeg4 in
    mp4)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        for n in range(frames):
            level = levels[n] if levels else (10 * n + offset) % 256
            pixels = np.full((size[1], size[0], 3), level, np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
