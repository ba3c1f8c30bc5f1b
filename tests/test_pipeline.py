import json
import os
from pathlib import Path

import pytest

from tirsynth import pipeline

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def stage_log(capsys) -> str:
    return capsys.readouterr().out


def test_demo_pipeline_runs_then_skips_what_is_complete(tmp_path, capsys, ray_session, monkeypatch):
    monkeypatch.chdir(PIPELINES.parent)  # the demo names files relative to the checkout
    variables = {"out": str(tmp_path / "demo"), "steps": 3}
    outputs = pipeline.run(PIPELINES / "demo.yaml", variables, progress=False)
    assert list(outputs) == ["data", "sparse", "generated", "evaluation", "overview"]
    assert (outputs["overview"] / "report.html").exists()
    evaluation = json.loads((outputs["evaluation"] / "report.json").read_text())
    assert evaluation["samples"] == 3 and {"sparse", "builtin"} <= set(evaluation["results"])
    assert json.loads((outputs["sparse"] / "report.json").read_text())["step"] == 3
    assert "running train" in stage_log(capsys)

    # What a checkout, an editor or a copy does: new modification times, the same bytes.
    for touched in ("configs/sparse.yaml", "tirsynth/sample/roadscene-daynight.csv"):
        os.utime(PIPELINES.parent / touched)
    for fragment in (outputs["data"] / "index.parquet").iterdir():
        os.utime(fragment)
    pipeline.run(PIPELINES / "demo.yaml", variables, progress=False)
    log = stage_log(capsys)
    assert log.count("up to date, skipped") == 5 and "running" not in log

    checkpoints = sorted((outputs["sparse"] / "checkpoints").iterdir())
    again = pipeline.run(PIPELINES / "demo.yaml", {**variables, "steps": 4}, progress=False)
    log = stage_log(capsys)
    assert "[data] up to date" in log and "[sparse] running train" in log
    assert "[sparse] its options changed since the last run: running into" in log
    assert "[evaluation] running evaluate" in log  # downstream of the changed stage
    assert again["sparse"] == outputs["sparse"].with_name("sparse-2")
    assert json.loads((again["sparse"] / "report.json").read_text())["step"] == 4
    # The earlier run is kept whole: a pipeline never deletes a trained model.
    assert sorted((outputs["sparse"] / "checkpoints").iterdir()) == checkpoints
    assert json.loads((outputs["sparse"] / "report.json").read_text())["step"] == 3


def test_paper_pipeline_with_a_tiny_budget(tmp_path, learnable_shards, ray_session, monkeypatch):
    monkeypatch.chdir(PIPELINES.parent)
    variables = {
        "out": str(tmp_path / "paper"),
        "data": str(learnable_shards),
        "steps": 2,
        "split": "val",
        "precision": "fp32",
        "extra": ["model.ngf=4", "model.ndf=4", "data.loader_workers=0", "train.batch_size=4"],
    }
    outputs = pipeline.run(PIPELINES / "paper.yaml", variables, progress=False)
    report = json.loads((outputs["comparison"] / "report.json").read_text())
    models = {m["name"]: m for m in report["models"] if m["kind"] == "checkpoint"}
    assert set(models) == {
        "sparse",
        "skips_low",
        "skips_high",
        "pix2pix_dense",
        "pix2pix_intensity",
        "pix2pix_gradient",
    }
    assert models["sparse"]["skips"] == [1, 3, 5, 7]
    assert models["skips_low"]["skips"] == [1, 3] and models["skips_high"]["skips"] == [5, 7]
    assert models["pix2pix_dense"]["skips"] == [1, 2, 3, 4, 5, 6, 7]
    assert models["pix2pix_intensity"]["loss"]["gradient"] == 0
    assert models["pix2pix_gradient"]["loss"]["intensity"] == 0
    assert all(m["step"] == 2 for m in models.values())
    assert report["paper"]["table4"] and all(report["curves"][name] for name in models)
    page = (outputs["comparison"] / "report.html").read_text()
    assert "numbers beside ours" in page and "Figures 6 and 7" in page


def test_pipeline_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - fly: {}\n")
    with pytest.raises(ValueError, match="each stage is one of"):
        pipeline.run(bad)
    bad.write_text("vars: {a: 1}\nstages:\n  - report: {name: r}\n")
    with pytest.raises(ValueError, match="--var b is not one of its vars"):
        pipeline.run(bad, {"b": 2})
    bad.write_text("stages:\n  - train: {config: '${nope}'}\n")
    with pytest.raises(ValueError, match=r"\$\{nope\} is not defined"):
        pipeline.run(bad)


def test_every_stage_is_checked_before_the_first_runs_and_a_failure_is_recorded(
    tmp_path, monkeypatch
):
    from conftest import SAMPLE

    monkeypatch.chdir(PIPELINES.parent)
    sample = SAMPLE / "roadscene"
    typo = tmp_path / "typo.yaml"
    typo.write_text(
        f"out: {tmp_path / 'run'}\nstages:\n"
        f"  - ingest: {{name: data, sources: ['{sample}']}}\n"
        "  - generate: {name: gen, input: data, checkpoint: builtin, shard_sise: 4}\n"
    )
    with pytest.raises(ValueError, match=r"stage 2 \(gen\): unknown config key 'shard_sise'"):
        pipeline.run(typo, progress=False)
    assert not (tmp_path / "run").exists()  # the first stage did not run

    failing = tmp_path / "failing.yaml"
    failing.write_text(
        f"out: {tmp_path / 'run2'}\nstages:\n"
        f"  - ingest: {{name: data, sources: ['{tmp_path / 'no-such-dataset'}']}}\n"
    )
    with pytest.raises(Exception, match="no-such-dataset"):
        pipeline.run(failing, progress=False)
    state = json.loads((tmp_path / "run2" / "pipeline.json").read_text())
    assert state["data"]["status"] == "failed" and "no-such-dataset" in state["data"]["error"]


def test_a_train_stage_from_an_earlier_one_goes_on_from_its_last_step(
    tmp_path, learnable_shards, monkeypatch
):
    """Two phases, as the built-in model's recipe: crops, then whole frames with the weight
    average restarted, the second starting where the first stopped."""
    import torch

    from tirsynth.checkpoint import load_checkpoint

    monkeypatch.chdir(PIPELINES.parent)
    phased = tmp_path / "phased.yaml"
    phased.write_text(
        f"out: {tmp_path / 'run'}\nvars: {{crop_steps: 2}}\nstages:\n"
        f"  - train: {{name: crops, config: configs/tiny.yaml, data: '{learnable_shards}',\n"
        "      set: ['train.max_steps=${crop_steps}', train.ema_power=3, train.precision=fp32]}\n"
        f"  - train: {{name: whole, from: crops, config: configs/tiny.yaml,"
        f" data: '{learnable_shards}',\n"
        "      set: [train.max_steps=5, train.ema_power=3, train.precision=fp32,"
        " data.image_size=64, data.load_size=64, 'train.average_from=${crop_steps}']}\n"
    )
    outputs = pipeline.run(phased, progress=False)
    crops = load_checkpoint(outputs["crops"] / "checkpoints" / "latest.pt")
    whole = load_checkpoint(outputs["whole"] / "checkpoints" / "latest.pt")
    assert crops["step"] == 2 and whole["step"] == 5
    assert whole["config"]["data"]["image_size"] == 64
    logged = [json.loads(line)["step"] for line in (outputs["whole"] / "stats.jsonl").open()]
    assert min(logged) == 3 and max(logged) == 5  # it trained steps 3-5 only
    # The second phase moved on from the first's weights and average (that the average
    # restarts at average_from is test_train.test_average_from_restarts_the_average_on_resume).
    name = next(iter(crops["generator"]))
    assert not torch.equal(crops["generator"][name], whole["generator"][name])
    assert not torch.equal(crops["generator_ema"][name], whole["generator_ema"][name])

    pipeline.run(phased, progress=False)  # complete: both skipped, nothing retrained
    assert load_checkpoint(outputs["whole"] / "checkpoints" / "latest.pt")["step"] == 5
    # A longer first phase makes a new first run, and the second goes on from it.
    again = pipeline.run(phased, {"crop_steps": 3}, progress=False)
    assert again["whole"].name == "whole-2"
    assert min(json.loads(line)["step"] for line in (again["whole"] / "stats.jsonl").open()) == 4

    for stages, error in (
        ("from: nothing", "from 'nothing' is not an earlier train stage"),
        ("from: crops, set: [model.ngf=8]", "from 'crops', whose model differs"),
    ):
        bad = tmp_path / "bad.yaml"
        bad.write_text(
            f"out: {tmp_path / 'bad'}\nstages:\n"
            f"  - train: {{name: crops, config: configs/tiny.yaml, data: '{learnable_shards}'}}\n"
            f"  - train: {{name: w, config: configs/tiny.yaml, data: '{learnable_shards}',"
            f" {stages}}}\n"
        )
        with pytest.raises(ValueError, match=error):
            pipeline.run(bad, progress=False)


def test_builtin_pipeline_holds_out_the_quality_benchmarks_test_split(shared_data, tmp_path):
    """The built-in model's recipe trains on the benchmark's train and val pairs and M3SVD
    clip 0113_1714 (its whole-frame phase also on the clear end of smoke clip 0117_1605), and
    holds out its test pairs and clip 1230_1202 (the model card's figures)."""
    from tirsynth import bench_quality, ingest, shards
    from tirsynth.config import IngestConfig, from_dict

    spec = pipeline.load_pipeline(PIPELINES / "builtin.yaml", {"shared": str(shared_data)})
    pipeline.validate(spec)
    splits = {}
    for number in (0, 1):
        kind, options = spec["stages"][number]
        assert kind == "ingest"
        options = {k: v for k, v in options.items() if k != "name"}
        options["meta"] = str(PIPELINES.parent / options["meta"])
        out = tmp_path / str(number)
        # One process: see test_video.test_m3svd_as_published.
        result = ingest.run(from_dict(IngestConfig, {**options, "out": str(out), "workers": 1}))
        assert not result.rejects and not result.meta_unmatched
        splits[number] = {
            (row["dataset"], row.get("clip"), row.get("frame"), Path(row["rgb_path"]).name):
            row["split"] for row in shards.read_index(out)
        }  # fmt: skip
    counts: dict[tuple[str, str], int] = {}
    for (dataset, clip, frame, name), split in splits[0].items():
        if dataset == "m3svd":
            expected = bench_quality.M3SVD_SPLITS[clip]
        else:
            benchmark = bench_quality._split(dataset, Path(name).stem)
            expected = "test" if benchmark == "test" else "train"
        assert split == expected, (dataset, clip, frame, name)
        counts[dataset, split] = counts.get((dataset, split), 0) + 1
    assert counts == {
        ("roadscene", "train"): 137,
        ("roadscene", "test"): 34,
        ("llvip", "train"): 25,
        ("llvip", "test"): 7,
        ("m3svd", "train"): 56,
        ("m3svd", "test"): 21,
        ("m3svd", "smoke"): 41 + 59,
    }
    # Phase 2: the same train and test items, plus 0117_1605's frames 340-406 (every 2nd).
    used = {item: split for item, split in splits[1].items() if split in ("train", "test")}
    clear = {
        ("m3svd", "0117_1605", str(f), f"0117_1605.mp4#frame={f}"): "train"
        for f in range(340, 407, 2)
    }
    kept = {item: split for item, split in splits[0].items() if split != "smoke"}
    assert used == {**kept, **clear}
