import numpy as np
import pytest

from tirsynth import evaluate, shards
from tirsynth.config import EvaluateConfig


def test_checkpoints_and_baselines_side_by_side(tmp_path, learnable_shards, tiny_checkpoint):
    cfg = EvaluateConfig(
        data=str(learnable_shards),
        out=str(tmp_path / "ev"),
        split="val",
        checkpoint=str(tiny_checkpoint),
        compare=(str(tiny_checkpoint),),
        names=("first", "second"),
        grid_rows=2,
        paper=True,
    )
    result = evaluate.run(cfg, progress=False)
    assert list(result.results) == ["first", "second", "rgb-luma", "inverted-luma"]
    count = len([r for r in shards.read_index(learnable_shards) if r["split"] == "val"])
    rows = shards.read_table(tmp_path / "ev" / "evaluation.parquet")
    assert len(rows) == 4 * count
    # The synthetic TIR is the inverted luma: that baseline is exact, plain luma is not,
    # and the trained model sits close to the truth.
    overall = {name: r["overall"] for name, r in result.results.items()}
    assert overall["inverted-luma"]["ssim"] > 0.99 and overall["inverted-luma"]["psnr"] > 40
    assert overall["rgb-luma"]["ssim"] < 0.5
    assert overall["first"]["ssim"] > 0.5 and overall["first"] == overall["second"]
    assert set(result.results["first"]["by_daynight"]) == {"day", "night"}
    assert sum(g["images"] for g in result.results["first"]["by_daynight"].values()) == count
    grids = result.report["grids"]
    assert set(grids) == {"worst", "best", "random"}
    assert grids["worst"]["columns"] == ["RGB", "real TIR", "first", "second"]
    assert grids["worst"]["ssim"][0] <= grids["best"]["ssim"][0]
    assert (tmp_path / "ev" / "report.html").exists()
    assert tuple(result.report["paper"]["table2"]["sparse {1,3,5,7}"]) == (0.664, 29.0)
    assert result.report["curves"]["first"]  # val records of the checkpoint's training run


def test_missing_split_is_a_clear_error(tmp_path, learnable_shards, tiny_checkpoint):
    cfg = EvaluateConfig(
        data=str(learnable_shards),
        out=str(tmp_path / "ev"),
        split="test",
        checkpoint=str(tiny_checkpoint),
    )
    with pytest.raises(ValueError, match="no samples in split 'test'"):
        evaluate.run(cfg, progress=False)


def test_detail_metrics_see_blur_that_ssim_forgives():
    """On a real TIR frame, a blurred copy keeps a high SSIM but loses edges: its edge ratio
    falls well below 1 and its GMSD rises; a copy is perfect on every metric."""
    from conftest import SAMPLE
    from PIL import Image, ImageFilter

    from tirsynth.quality import score

    path = sorted((SAMPLE / "roadscene" / "cropinfrared").iterdir())[0]
    real_image = Image.open(path).convert("L")
    real = np.asarray(real_image)
    blurred = np.asarray(real_image.filter(ImageFilter.GaussianBlur(2)))
    same, blur = score(real, real.copy()), score(real, blurred)
    assert same["gmsd"] == pytest.approx(0, abs=1e-6) and same["edge_ratio"] == pytest.approx(1)
    assert same["lbp_distance"] == 0 and same["ssim"] == pytest.approx(1)
    assert blur["ssim"] > 0.7 and blur["edge_ratio"] < 0.6
    assert blur["gmsd"] > 0.05 and blur["lbp_distance"] > 0.2
    sharpened = np.asarray(real_image.filter(ImageFilter.UnsharpMask(2, 200, 0)))
    assert score(real, sharpened)["edge_ratio"] > 1.2


def test_a_batch_scored_on_threads_matches_one_by_one_in_order():
    """Images of different sizes and content, scored as a batch: each row is that image's
    own `score`, in the batch's order."""
    from tirsynth.quality import score, score_all

    rng = np.random.default_rng(0)
    shapes = [(60, 80), (33, 47), (80, 64), (41, 41), (70, 90)]
    reals = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in shapes]
    outputs = [np.clip(r.astype(int) + rng.integers(-40, 40, r.shape), 0, 255).astype(np.uint8)
               for r in reals]  # fmt: skip
    expected = [score(real, output) for real, output in zip(reals, outputs, strict=True)]
    assert len({row["ssim"] for row in expected}) == len(shapes)  # the order is visible
    assert score_all(reals, outputs) == expected
    assert score_all([], []) == []


def test_grids_are_native_with_a_zoom_where_the_real_tir_has_detail(tmp_path):
    from PIL import Image

    from tirsynth import quality

    real = np.full((300, 400), 100, np.uint8)
    real[200:230, 50:80] = np.indices((30, 30)).sum(0) % 2 * 255  # a checkerboard
    output = np.full_like(real, 90)
    rgb = np.zeros((300, 400, 3), np.uint8)
    top, left = quality.busiest_window(real, 48)
    assert 200 - 48 < top <= 200 and 50 - 48 < left <= 50
    rows = quality.with_zoomed_crops([[rgb, real, output]], side=48, zoom=3)
    assert [cell.shape[:2] for cell in rows[1]] == [(144, 144)] * 3
    path = quality.write_image_grid(rows, tmp_path / "grid.png", height=None)
    with Image.open(path) as grid:
        assert grid.size == (3 * 400 + 2 * 4, 300 + 144 + 4)  # native, no scaling


def test_video_pairs_get_flicker_ratio_and_temporal_error_per_clip(tmp_path, tiny_checkpoint):
    """Clip frames: RGB level 10 n, TIR 10 n + 5. RGB luma changes as the real TIR does
    (ratio 1, error 0); the inverted luma changes as much, the other way (error 2 x 10 x
    the stride)."""
    from conftest import write_video

    from tirsynth import ingest
    from tirsynth.config import IngestConfig

    clips = tmp_path / "clips"
    for clip, frames in (("a", 9), ("b", 7)):
        write_video(clips / "visible" / f"{clip}.mp4", frames)
        write_video(clips / "infrared" / f"{clip}.mp4", frames, offset=5)
    data = tmp_path / "data"
    ingest.run(IngestConfig(sources=(str(clips),), out=str(data), frame_stride=2,
                            split=(0.0, 0.0, 1.0)))  # fmt: skip
    cfg = EvaluateConfig(data=str(data), out=str(tmp_path / "ev"), split="test",
                         checkpoint=str(tiny_checkpoint), grid_rows=1)  # fmt: skip
    temporal = evaluate.run(cfg, progress=False).report["temporal"]
    assert len(temporal) == 3 and {"rgb-luma", "inverted-luma"} <= set(temporal)
    luma, inverted = temporal["rgb-luma"], temporal["inverted-luma"]
    assert set(luma["clips"]) == {"a", "b"}
    assert luma["clips"]["a"]["frames"] == 5 and luma["clips"]["a"]["stride"] == 2
    assert luma["overall"]["flicker_ratio"] == pytest.approx(1.0, abs=0.1)
    assert luma["overall"]["temporal_error"] < 2
    assert inverted["overall"]["flicker_ratio"] == pytest.approx(1.0, abs=0.1)
    assert inverted["overall"]["temporal_error"] == pytest.approx(40, abs=4)
    assert "Temporal stability on video pairs" in (tmp_path / "ev" / "report.html").read_text()


def test_results_figure_rows_are_rgb_generated_and_real_at_their_own_size(
    tmp_path, tiny_checkpoint
):
    from conftest import SAMPLE, write_video
    from PIL import Image

    from tirsynth.config import EvaluateConfig as Config

    rgb = SAMPLE / "roadscene" / "crop_LR_visible" / "FLIR_03801.jpg"
    tir = SAMPLE / "roadscene" / "cropinfrared" / "FLIR_03801.jpg"
    write_video(tmp_path / "rgb.mp4", 3, size=(96, 64))
    write_video(tmp_path / "tir.mp4", 3, size=(96, 64), offset=5)
    pairs = [(str(rgb), str(tir)), (f"{tmp_path}/rgb.mp4#frame=2", f"{tmp_path}/tir.mp4#frame=2")]
    path = evaluate.results_figure(pairs, tiny_checkpoint, tmp_path / "fig.png", Config())
    with Image.open(rgb) as photo, Image.open(path) as figure:
        height = min(photo.height, 480) + 4 + 64  # two rows at their own height, a 4 px gap
        assert figure.size == (max(3 * photo.width + 8, 3 * 96 + 8), height)
    compared = evaluate.results_figure(pairs[1:], tiny_checkpoint, tmp_path / "two.png",
                                       Config(), compare=(tiny_checkpoint,))  # fmt: skip
    with Image.open(compared) as figure:  # RGB | model | compared model | real TIR
        assert figure.size == (4 * 96 + 12, 64)
        cells = np.asarray(figure.convert("L"))
        assert np.array_equal(cells[:, 100:196], cells[:, 200:296])  # the same model twice
    with pytest.raises(ValueError, match="not a registered pair"):
        evaluate.results_figure([(str(rgb), f"{tmp_path}/tir.mp4#frame=0")], tiny_checkpoint,
                                tmp_path / "bad.png", Config())  # fmt: skip
