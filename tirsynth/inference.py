"""The trained generator applied to whole images of any size, shared by generate and evaluate.

An image is scaled so that its long side has the checkpoint's working scale
(`DataConfig.working_long_side`), padded by reflection to the model's S x S square (the long
side rounded up to a multiple of 2**depth), translated whole (the U-Net is fully
convolutional; squares larger than a tile run in overlapping tiles blended without seams),
cropped back to the scaled content and resized to its exact size.
"""

from __future__ import annotations

import io
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from tirsynth import images, metrics, shards
from tirsynth.checkpoint import BUILTIN, find_best_checkpoint, load_generator
from tirsynth.config import BUILTIN_NAME


def resolve_checkpoint(path: str | None, runs: str | Path = "runs") -> Path:
    """`path` ("builtin": the built-in model), or the newest best.pt under `runs/`, or the
    built-in model (printed)."""
    if path and str(path) != BUILTIN_NAME:
        return Path(path)
    if path:
        print(f"using the built-in model ({BUILTIN.name})")
        return BUILTIN
    found = find_best_checkpoint(runs)
    if found is not None:
        print(f"using checkpoint {found} (the newest best.pt under ./{runs}/)")
        return found
    if BUILTIN.is_file():
        print(
            f"using the built-in model ({BUILTIN.name}: the paper's sparse U-Net at half "
            f'width, trained on RoadScene + LLVIP; README, "Built-in model"): no --checkpoint '
            f"given and no best.pt under ./{runs}/"
        )
        return BUILTIN
    raise FileNotFoundError(
        f"no checkpoint given, no best.pt under ./{runs}/ and no built-in model; train one "
        "with `tirsynth train --config configs/sparse.yaml --data DATA --out runs/NAME`, or "
        "pass --checkpoint PATH"
    )


def canvas_side(long_side: int, depth: int) -> int:
    """The model-side square for frames of `long_side`: a multiple of 2**depth."""
    step = 2**depth
    return max(step, -(-long_side // step) * step)


class Translator:
    """The generator as a Ray Data actor: loads the checkpoint once, translates batches.

    `__call__` maps {"pixels": (B, S, S, 3) uint8, ...} to the same batch plus
    "tir": (B, S, S) uint8. Rows that failed to decode hold blank pixels; postprocessing
    turns them into rejects.

    Args:
        checkpoint: a training checkpoint or safetensors weights; with `shipped`, only its
            file name.
        precision: auto | fp32 | bf16 | fp16 (see `resolve_precision`).
        device: default CUDA when present, else the CPU.
        threads: CPU threads for the model (0: leave torch's setting).
        shipped: the checkpoint's bytes, or a Ray object reference to them, for actors on
            machines that do not have the file.
    """

    def __init__(
        self,
        checkpoint: str,
        precision: str = "auto",
        device: str | None = None,
        threads: int = 0,
        shipped: Any = None,
        tile: int = 0,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if shipped is None:
            self.generator, _ = load_generator(checkpoint, self.device)
        else:
            if not isinstance(shipped, bytes):
                import ray

                shipped = ray.get(shipped)
            with tempfile.TemporaryDirectory(prefix="tirsynth-checkpoint-") as folder:
                local = Path(folder) / Path(checkpoint).name  # the suffix says its format
                local.write_bytes(shipped)
                self.generator, _ = load_generator(local, self.device)
        self.generator.to(memory_format=torch.channels_last)
        self.tile = tile
        self.precision = resolve_precision(precision, self.device)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        def autocast():
            return torch.autocast(self.device.type, dtype=self.dtype, enabled=bool(self.dtype))

        started = time.perf_counter()
        tir = translate_squares(self.generator, batch["pixels"], autocast, self.tile)
        # Each image's share of the model call (the result is on the CPU: work is done).
        seconds = (time.perf_counter() - started) / max(len(tir), 1)
        return {**batch, "tir": tir, "model_seconds": np.full(len(tir), seconds)}


@torch.no_grad()
def translate_squares(
    generator: nn.Module,
    pixels: np.ndarray,
    autocast: Callable[[], Any] = nullcontext,
    tile: int = 0,
) -> np.ndarray:
    """(B, S, S, 3) uint8 RGB squares -> (B, S, S) uint8 TIR, on the generator's device;
    squares larger than `tile` (when set) in overlapping tiles (`translate_tiled`)."""
    device = next(generator.parameters()).device
    rgb = torch.from_numpy(np.array(pixels, dtype=np.uint8))  # writable copy
    rgb = rgb.to(device).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, S, S)
    rgb = rgb.contiguous(memory_format=torch.channels_last)
    with autocast():
        if tile and rgb.shape[-1] > tile:
            fake = translate_tiled(generator, rgb, tile)
        else:
            fake = generator(rgb).float()  # (B, C, S, S) in [-1, 1]
    return metrics.to_gray_uint8(fake).to(torch.uint8).cpu().numpy()


def translate_tiled(generator: nn.Module, rgb: torch.Tensor, tile: int) -> torch.Tensor:
    """G on (B, 3, S, S) in `tile` x `tile` windows overlapping by a quarter of a tile, each
    output weighted by a ramp that falls towards its window's edges, where a convolution
    sees padding instead of the frame: no seam, and memory bounded by the tile."""
    side = rgb.shape[-1]
    overlap = tile // 4
    starts = [*range(0, side - tile, tile - overlap), side - tile]
    ramp = torch.ones(tile, device=rgb.device)
    edge = torch.linspace(0, 1, overlap + 2, device=rgb.device)[1:-1]
    ramp[:overlap], ramp[tile - overlap :] = edge, edge.flip(0)
    weight = ramp[:, None] * ramp[None, :]
    out = norm = None
    for top in starts:
        for left in starts:
            window = rgb[..., top : top + tile, left : left + tile]
            fake = generator(window).float() * weight
            if out is None:
                out = fake.new_zeros((*fake.shape[:2], side, side))
                norm = fake.new_zeros((side, side))
            out[..., top : top + tile, left : left + tile] += fake
            norm[top : top + tile, left : left + tile] += weight
    return out / norm


def translate_images(
    images: list[Image.Image],
    size: int,
    squares: Callable[[np.ndarray], np.ndarray],
    long_side: int | None = None,
) -> list[np.ndarray]:
    """Whole RGB images of any size -> (H, W) uint8 TIR at each one's size: scaled to
    `long_side` (default `size`), padded into the model's `size` square, translated with
    `squares` ((B, S, S, 3) -> (B, S, S)), mapped back."""
    fitted = [fit_to_square(image, size, long_side) for image in images]
    outputs = squares(np.stack([pixels for pixels, _ in fitted]))
    return [
        map_back(output, content, image.size)
        for output, (_, content), image in zip(outputs, fitted, images, strict=True)
    ]


def iter_pairs(data: Path, rows: list[dict]) -> Iterator[dict[str, Any]]:
    """Decoded pairs of index `rows` of a pair-shard folder, shard by shard: key, dataset,
    daynight, rgb (PIL, as displayed), rgb_pixels and real (8-bit TIR, (H, W) uint8)."""
    wanted = {r["key"]: r for r in rows}
    for shard in sorted({r["shard"] for r in rows}):
        for sample in shards.read_shard(Path(data) / shard):
            row = wanted.get(sample["__key__"])
            if row is None:
                continue
            rgb_bytes = next(v for k, v in sample.items() if k.startswith("rgb."))
            tir_bytes = next(v for k, v in sample.items() if k.startswith("tir."))
            rgb = decode_rgb(rgb_bytes, max_pixels=1 << 31)
            yield {
                "key": row["key"],
                "dataset": row["dataset"],
                "daynight": row["daynight"],
                "rgb": rgb,
                "rgb_pixels": np.asarray(rgb),
                "real": shards.decode_tir_8bit(tir_bytes),
            }


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 where the hardware runs it natively (CUDA with bf16, CPUs with AVX-512
    BF16 or AMX), else fp32. fp16 needs CUDA."""
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs CUDA; use bf16 or fp32 on the CPU")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.backends.mkldnn.is_available() and _cpu_has_bf16() else "fp32"


def fit_to_square(
    image: Image.Image, size: int, long_side: int | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Scale so the long side is `long_side` (default: `size`, which it must not exceed)
    keeping the aspect ratio, then reflect-pad to `size` x `size`.

    Returns:
        ((size, size, 3) array, or (size, size) for a one-band image, of the image's pixel
        type; (content width, content height)).
    """
    scale = min(long_side or size, size) / max(image.size)
    content = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    pixels = np.asarray(image.resize(content, Image.Resampling.BICUBIC))
    pad = ((0, size - content[1]), (0, size - content[0]), (0, 0))[: pixels.ndim]
    return np.pad(pixels, pad, mode="reflect" if min(content) > 1 else "edge"), content


def map_back(tir: np.ndarray, content: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """(S, S) output -> the scaled content -> (height, width) of the input, uint8."""
    cropped = Image.fromarray(np.ascontiguousarray(tir[: content[1], : content[0]]))
    if cropped.size != size:
        cropped = cropped.resize(size, Image.Resampling.BICUBIC)
    return np.asarray(cropped)


def structure_score(input_gray: torch.Tensor, output_gray: torch.Tensor) -> float:
    """SSIM between Sobel-magnitude maps of two (1, H, W) 0..255 images: 1 = same edges.

    Magnitudes are clipped at a quarter of the 0..255 range per pixel step, so strong edges
    count as edges whatever their contrast or polarity (TIR often inverts RGB contrast).
    """
    from tirsynth.losses import gradient_map

    maps = [gradient_map(g[:, None].double() / 255)[:, 0] for g in (input_gray, output_gray)]
    scaled = [(m.clamp(max=0.25) / 0.25 * 255) for m in maps]
    if min(scaled[0].shape[-2:]) < 11:  # SSIM's 11x11 window does not fit
        return float(1 - (scaled[0] - scaled[1]).abs().mean().item() / 255)
    return metrics.ssim(scaled[0], scaled[1]).item()


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def decode_rgb(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise images.ImageRejected("empty file (0 bytes)")
    image = images.open_image(data, max_pixels)
    images.load_pixels(image)
    if images.exif_orientation(image) != 1:
        image = ImageOps.exif_transpose(image)  # labels refer to the image as displayed
    return images.normalise_mode(image, "rgb")


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
