import json
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


def test_video_adds_m3svd_clips_whole_and_keeps_the_smoke_clips_out(shared_data, tmp_path):
    data = bench_quality.prepare_data(shared_data, tmp_path / "data-video", video=True)
    rows = [r for r in shards.read_index(data) if r["dataset"] == "m3svd"]
    splits = {}
    for row in rows:
        splits.setdefault(row["clip"], set()).add(row["split"])
    assert splits == {clip: {split} for clip, split in bench_quality.M3SVD_SPLITS.items()}
    assert {r["daynight"] for r in rows} == {"day"}
    assert len(rows) == sum(-(-n // 10) for n in (560, 407, 590, 205))  # every 10th frame
