import numpy as np
import pytest
from conftest import write_video

from tirsynth import temporal


def test_flicker_ratio_and_temporal_error_of_known_sequences():
    rng = np.random.default_rng(0)
    real = [np.full((8, 8), 100 + 2 * t, np.uint8) for t in range(5)]  # +2 a frame
    same = temporal.temporal_scores(real, real)
    assert same["flicker_ratio"] == 1 and same["temporal_error"] == 0
    still = temporal.temporal_scores([real[0]] * 5, real)
    assert still["flicker_ratio"] == 0 and still["temporal_error"] == pytest.approx(2)
    noisy = [np.clip(r + rng.integers(-6, 7, r.shape), 0, 255).astype(np.uint8) for r in real]
    assert temporal.temporal_scores(noisy, real)["flicker_ratio"] > 1.5
    offset = [r + 10 for r in real]  # a constant bias is no flicker
    assert temporal.temporal_scores(offset, real)["temporal_error"] == 0


def test_bench_temporal_on_a_clip_pair(tmp_path):
    """RGB frame t is grey 10 t, TIR 10 t + 5: luma follows the real change exactly, a
    model that ignores its input does not change at all."""
    write_video(tmp_path / "rgb.mp4", 8)
    write_video(tmp_path / "tir.mp4", 8, offset=5)
    luma = {"luma": lambda images: [np.asarray(i.convert("L")) for i in images]}
    flat = {"flat": lambda images: [np.zeros((48, 64), np.uint8) for _ in images]}
    result = temporal.bench_temporal(
        tmp_path / "rgb.mp4", tmp_path / "tir.mp4", {**luma, **flat}, batch_size=3
    )
    assert result["frames"] == 8 and result["real_change"] == pytest.approx(10, abs=1)
    assert result["models"]["luma"]["flicker_ratio"] == pytest.approx(1, abs=0.1)
    assert result["models"]["luma"]["temporal_error"] < 1.5
    assert result["models"]["flat"]["flicker_ratio"] == 0
