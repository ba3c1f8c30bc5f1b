"""Temporal stability of generated TIR sequences: does the per-frame model flicker?

For a sequence of outputs O_t with real TIR frames R_t, both (H, W) uint8:

- flicker ratio: mean |O_t - O_{t-1}| over mean |R_t - R_{t-1}|. 1 is as much
  frame-to-frame change as the real TIR has; above 1 the output flickers, below it is
  stiller than the scene.
- temporal error: mean |(O_t - O_{t-1}) - (R_t - R_{t-1})|, in grey levels: change where
  the real TIR has none, or none where it has some.

Without real TIR the input's own change (its luma) stands in for R.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np


def temporal_scores(outputs: Iterable[np.ndarray], references: Iterable[np.ndarray]) -> dict:
    """Flicker ratio and temporal error of a sequence against its reference sequence.

    Returns:
        {"flicker_ratio", "temporal_error", "output_change", "reference_change", "frames"}
    """
    output_change = reference_change = error = 0.0
    frames = 0
    previous = None
    for output, reference in zip(outputs, references, strict=True):
        current = (output.astype(np.float64), reference.astype(np.float64))
        if previous is not None:
            d_out, d_ref = current[0] - previous[0], current[1] - previous[1]
            output_change += np.abs(d_out).mean()
            reference_change += np.abs(d_ref).mean()
            error += np.abs(d_out - d_ref).mean()
        previous = current
        frames += 1
    steps = max(frames - 1, 1)
    return {
        "flicker_ratio": output_change / reference_change if reference_change else float("nan"),
        "temporal_error": error / steps,
        "output_change": output_change / steps,
        "reference_change": reference_change / steps,
        "frames": frames,
    }


# Where the input is still, each filtered frame keeps this share of the model's new frame
# (the rest from the previous filtered frame): about four frames of memory.
STILL_WEIGHT = 0.25


def steady_frames(
    outputs: list[np.ndarray], lumas: list[np.ndarray], tau: float, sigma: float = 2.0
) -> list[np.ndarray]:
    """A motion-adaptive recursive filter over one sequence's consecutive output frames.

    A per-frame model redraws its texture in every frame, also where the scene is still;
    the filter moves each output from the previous filtered frame toward the model's new
    one by STILL_WEIGHT where the input's luma is still, rising to 1 (the new frame as it
    is) where the luma, blurred by `sigma`, changes by `tau` grey levels or more, so moving
    objects leave little trail (less where the input is dark and changes little).

    Args:
        outputs, lumas: the model's outputs and the input's luma, (H, W) each, in frame order.
        tau: grey levels of input change at which a pixel counts as moving.

    Returns:
        The filtered frames, (H, W) uint8; the first is the model's own.
    """
    from skimage.filters import gaussian

    filtered = [outputs[0].astype(np.float32)]
    for k in range(1, len(outputs)):
        change = np.abs(lumas[k].astype(np.float32) - lumas[k - 1].astype(np.float32))
        motion = gaussian(change, sigma=sigma, preserve_range=True)
        weight = STILL_WEIGHT + (1 - STILL_WEIGHT) * np.clip(motion / tau, 0, 1)
        filtered.append(filtered[-1] + weight * (outputs[k].astype(np.float32) - filtered[-1]))
    return [np.clip(np.rint(frame), 0, 255).astype(np.uint8) for frame in filtered]


def paired_frames(rgb_video: Path, tir_video: Path, limit: int = 0) -> Iterator[tuple]:
    """(RGB PIL image, real TIR (H, W) uint8) for each frame of a registered clip pair."""
    from tirsynth import images, video

    count = min(video.frame_count(rgb_video), video.frame_count(tir_video))
    count = min(count, limit) if limit else count
    readers = video.FrameReader(str(rgb_video)), video.FrameReader(str(tir_video))
    try:
        for number in range(count):
            rgb = readers[0].frame(number).convert("RGB")
            tir = np.asarray(readers[1].frame(number).convert("L"))
            yield rgb, tir
    except images.ImageRejected:
        return
    finally:
        for reader in readers:
            reader.close()


def bench_temporal(
    rgb_video: str | Path,
    tir_video: str | Path,
    translators: dict[str, Callable[[list], list[np.ndarray]]],
    limit: int = 0,
    batch_size: int = 8,
    temporal_filter: float | None = None,
    filtered: Collection[str] = (),
) -> dict[str, Any]:
    """Temporal scores of each translator (list of RGB images -> list of (H, W) uint8) on
    a registered clip pair, against its real TIR; `limit` frames at most (0: all). With
    `temporal_filter` (tau), the translators named in `filtered` are also scored through
    `steady_frames` over the whole clip, as "NAME filtered"."""
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in translators}
    reals: list[np.ndarray] = []
    lumas: list[np.ndarray] = []
    batch: list = []

    def flush() -> None:
        for name, translate in translators.items():
            outputs[name] += translate([rgb for rgb, _ in batch])
        reals.extend(tir for _, tir in batch)
        if temporal_filter:
            lumas.extend(np.asarray(rgb.convert("L")) for rgb, _ in batch)
        batch.clear()

    for pair in paired_frames(Path(rgb_video), Path(tir_video), limit):
        batch.append(pair)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    real_change = temporal_scores(reals, reals)["output_change"]
    models = {name: temporal_scores(out, reals) for name, out in outputs.items()}
    for name in filtered if temporal_filter else ():
        steady = steady_frames(outputs[name], lumas, temporal_filter)
        models[f"{name} filtered"] = temporal_scores(steady, reals)
    return {"frames": len(reals), "real_change": real_change, "models": models}
