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


def test_steady_frames_still_where_the_input_is_and_unchanged_where_it_moves():
    """Outputs that redraw noise in every frame of a still scene change far less once
    filtered; where the input moves by tau or more the filtered frame is the model's own;
    the first frame is kept as it is."""
    rng = np.random.default_rng(0)
    base = rng.integers(60, 200, (32, 32)).astype(np.float64)
    outputs = [np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
               for _ in range(12)]  # fmt: skip
    still = [np.full((32, 32), 90, np.uint8)] * 12
    steady = temporal.steady_frames(outputs, still, tau=4)
    assert np.array_equal(steady[0], outputs[0])
    change = temporal.temporal_scores(steady, outputs)["flicker_ratio"]
    assert change < 0.5
    assert all(frame.dtype == np.uint8 and frame.shape == (32, 32) for frame in steady)
    moving = [np.full((32, 32), 90 if k % 2 else 150, np.uint8) for k in range(12)]
    assert all(np.array_equal(a, b) for a, b in zip(temporal.steady_frames(outputs, moving, 4),
                                                    outputs, strict=True))  # fmt: skip
    # Half the frame moving: its pixels, away from the blur's reach, follow the model.
    half = [np.where(np.arange(32) < 16, 90, 90 + 60 * (k % 2)).astype(np.uint8)[None].repeat(32, 0)
            for k in range(12)]  # fmt: skip
    mixed = temporal.steady_frames(outputs, half, tau=4)
    assert np.array_equal(mixed[5][:, 24:], outputs[5][:, 24:])
    assert not np.array_equal(mixed[5][:, :8], outputs[5][:, :8])


def test_bench_temporal_scores_the_filtered_outputs_too(tmp_path):
    """A still clip and a translator that redraws noise in every frame: through the filter
    it changes less and its temporal error against the still real TIR falls."""
    write_video(tmp_path / "rgb.mp4", 10, levels=[100] * 10)
    write_video(tmp_path / "tir.mp4", 10, levels=[120] * 10)
    rng = np.random.default_rng(0)
    noisy = {"noisy": lambda images: [rng.integers(90, 150, (48, 64)).astype(np.uint8)
                                      for _ in images]}  # fmt: skip
    result = temporal.bench_temporal(
        tmp_path / "rgb.mp4", tmp_path / "tir.mp4", noisy, temporal_filter=4, filtered=["noisy"]
    )
    plain, steady = result["models"]["noisy"], result["models"]["noisy filtered"]
    assert steady["temporal_error"] < 0.6 * plain["temporal_error"]
    assert steady["output_change"] < 0.6 * plain["output_change"]
