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
