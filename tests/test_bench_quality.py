import json
from dataclasses import replace
from pathlib import Path

from tirsynth import bench_quality, shards

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_quality_bench_on_the_shared_pairs(shared_data, tmp_path):
    """Two seeds of a tiny model: each scored on the fixed test split (both datasets, day
    and night) as the mean of its last snapshots, beside the luma baselines; a rerun reuses
    finished seeds."""
    bench = bench_quality.QualityBench(
        str(TINY),
        ("train.batch_size=3",),
        shared=str(shared_data),
        out=str(tmp_path / "bq"),
        seeds=2,
        steps=6,
        last=2,
    )
    lines = list(bench_quality.run(bench, progress=False))
    rows = shards.read_index(tmp_path / "bq" / "data")
    test = [r for r in rows if r["split"] == "test"]
    assert {r["dataset"] for r in test} == {"roadscene", "llvip"}
    assert {r["daynight"] for r in test} == {"day", "night"}
    seed0 = tmp_path / "bq" / "tiny" / "seed0"
    # checkpoint_every = 6 // 3 = 2: snapshots at 2, 4, 6; the last two are averaged.
    assert sorted(p.name for p in (seed0 / "checkpoints").glob("step_*.pt"))[-2:] == [
        "step_00000004.pt",
        "step_00000006.pt",
    ]
    per_image = shards.read_table(seed0 / "evaluation" / "evaluation.parquet")
    snapshots = ("model-step_00000004", "model-step_00000006")
    assert {r["model"] for r in per_image} == {*snapshots, "rgb-luma", "inverted-luma"}
    ssim = {m: [r["ssim"] for r in per_image if r["model"] == m] for m in snapshots}
    seed1 = shards.read_table(
        tmp_path / "bq" / "tiny" / "seed1" / "evaluation" / "evaluation.parquet"
    )
    assert "rgb-luma" not in {r["model"] for r in seed1}  # baselines are scored once
    scores = json.loads((seed0 / "scores.json").read_text())
    mean = sum(sum(v) / len(v) for v in ssim.values()) / 2
    assert abs(scores["model"]["overall"]["ssim"] - mean) < 1e-9
    summary = json.loads((tmp_path / "bq" / "tiny" / "quality-seeds0-1.json").read_text())
    cell = summary["rgb-luma"]["llvip"]["ssim"]
    assert cell["spread"] == 0 and len(cell["values"]) == 2  # the baseline has no seed
    assert any(line.startswith("  model") for line in lines)
    assert lines[0].startswith("seed 0:") and lines[1].startswith("seed 1:")
    assert "overall" in "\n".join(lines) and "llvip" in "\n".join(lines)
    again = list(bench_quality.run(bench, progress=False))
    assert again == lines
    # a larger budget in the same folder trains on and scores its own last snapshots,
    # not the cached figures of the shorter run
    list(bench_quality.run(replace(bench, steps=12, seeds=1), progress=False))
    scores = json.loads((seed0 / "scores.json").read_text())
    assert scores["snapshots"] == ["step_00000008.pt", "step_00000012.pt"]
    per_image = shards.read_table(seed0 / "evaluation" / "evaluation.parquet")
    assert {"model-step_00000008", "model-step_00000012"} <= {r["model"] for r in per_image}


def test_video_adds_m3svd_clips_whole_and_keeps_the_smoke_clips_out(shared_data, tmp_path):
    data = bench_quality.prepare_data(shared_data, tmp_path / "data-video", video=True)
    rows = [r for r in shards.read_index(data) if r["dataset"] == "m3svd"]
    splits = {}
    for row in rows:
        splits.setdefault(row["clip"], set()).add(row["split"])
    assert splits == {clip: {split} for clip, split in bench_quality.M3SVD_SPLITS.items()}
    assert {r["daynight"] for r in rows} == {"day"}
    assert len(rows) == sum(-(-n // 10) for n in (560, 407, 590, 205))  # every 10th frame


def _bench_result(folder: Path, models: dict[str, tuple[float, float, float, float]]) -> Path:
    """A quality-seeds*.json as `bench quality` writes it, for `models`: name -> (SSIM,
    GMSD, edge ratio, LBP distance), the same on every group; two seeds 0.01 apart."""

    def cell(value):
        return {"mean": value, "spread": 0.01, "values": [value - 0.005, value + 0.005]}

    summary = {"config": {}}
    for model, (ssim, gmsd, edge, lbp) in models.items():
        scores = {"ssim": ssim, "psnr": 15.0, "gmsd": gmsd, "edge_ratio": edge, "lbp_distance": lbp}
        summary[model] = {
            group: {m: cell(v) for m, v in scores.items()} for group in ("overall", "roadscene")
        }
    path = folder / "sparse_plus-proxy" / "quality-seeds0-1.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(summary))
    return path


def test_frontier_marks_the_recipes_no_other_beats_on_ssim_and_detail(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from tirsynth.cli import cli

    luma = (0.42, 0.23, 0.9, 0.23)
    blurry = _bench_result(tmp_path / "blurry", {"model": (0.50, 0.25, 0.3, 0.30),
                                                  "model-raw": (0.48, 0.26, 0.2, 0.35),
                                                  "rgb-luma": luma})  # fmt: skip
    sharp = _bench_result(tmp_path / "sharp", {"model": (0.45, 0.24, 1.6, 0.20),
                                                "rgb-luma": luma})  # fmt: skip
    points = {p.label: p for p in bench_quality.frontier_points([blurry, sharp, blurry])}
    assert list(points) == ["blurry", "blurry raw", "sharp", "RGB luma"]  # each file once
    # blurry's plain G is worse than its average on SSIM and on every detail measure
    for detail in bench_quality.DETAIL_COSTS:
        front = {p.label for p in bench_quality.pareto_front(list(points.values()), detail)}
        assert "blurry" in front and "blurry raw" not in front, detail
    # an edge ratio of 1.6 is nearer the real TIR's than 0.3, as 1/1.6 would be
    edge_front = bench_quality.pareto_front(list(points.values()), "edge_ratio")
    assert {p.label for p in edge_front} == {"blurry", "sharp", "RGB luma"}
    assert bench_quality.dominates(points["sharp"], points["RGB luma"], "lbp_distance")
    assert not bench_quality.dominates(points["RGB luma"], points["sharp"], "gmsd")

    out = tmp_path / "plots" / "frontier.png"
    result = CliRunner().invoke(
        cli, ["bench", "frontier", str(blurry), str(sharp), "--group", "roadscene",
              "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()[2:-1]
    rows = {line[:34].strip(): line.split()[-1] for line in lines}  # label -> its fronts
    assert rows == {"blurry": "gel", "blurry raw": "...", "sharp": "gel", "RGB luma": "ge."}
    assert [line[:34].strip() for line in lines][:2] == ["blurry", "blurry raw"]  # by SSIM
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 2 * image.height
    missing = CliRunner().invoke(
        cli, ["bench", "frontier", str(blurry), "--group", "m3svd", "--out", str(out)]
    )
    assert missing.exit_code != 0 and "no 'm3svd' scores" in missing.output
