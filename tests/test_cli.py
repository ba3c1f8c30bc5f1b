import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import SAMPLE
from PIL import Image

from tirsynth.checkpoint import BUILTIN
from tirsynth.cli import cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


COMMANDS = [
    [],
    ["ingest"],
    ["info"],
    ["model"],
    ["train"],
    ["generate"],
    ["export"],
    ["bench"],
    ["bench", "ingest"],
    ["bench", "train"],
    ["bench", "generate"],
]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command):
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_every_command_has_a_summary_and_an_example_and_stages_come_in_order():
    from tirsynth.cli import cli as group

    runner = CliRunner()
    commands = [[name] for name in group.commands if name not in ("bench", "pipeline")]
    commands += [["bench", name] for name in group.commands["bench"].commands]
    commands += [["bench"], ["pipeline"], ["pipeline", "run"]]
    for command in commands:
        text = runner.invoke(cli, [*command, "--help"]).output
        assert "Example:" in text and f"tirsynth {' '.join(command)}" in text, command
    lines = runner.invoke(cli, ["--help"]).output.split("Commands:")[1].splitlines()
    listed = [line.split()[0] for line in lines if line.startswith("  ") and line.strip()]
    stages = ["ingest", "train", "generate", "export", "evaluate", "report"]
    assert [name for name in listed if name in stages] == stages


def test_bench_markdown_appends_figures_with_their_provenance(tmp_path):
    table = tmp_path / "docs" / "bench.md"
    for _ in range(2):
        result = CliRunner().invoke(
            cli,
            ["bench", "--markdown", str(table), "ingest", str(SAMPLE / "roadscene"),
             "--repeat", "1", "--scratch", str(tmp_path / "scratch")],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
    text = table.read_text()
    assert text.count("### bench ingest") == 2
    for field in ("- command: `", "- commit: `", "- date: 20",
                  "- machine: "):  # fmt: skip
        assert field in text
    assert "cores" in text.split("- machine: ")[1].splitlines()[0]
    assert "x1" in text  # the printed table, verbatim


def test_bench_ingest_prints_pairs_per_second_and_the_ratio_to_the_floor(tmp_path):
    result = CliRunner().invoke(
        cli,
        ["bench", "ingest", str(SAMPLE / "roadscene"), "--repeat", "2", "--scratch", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    rows = {}
    for line in result.stdout.splitlines():  # without the progress bars on stderr
        if line.split()[:1] in (["x1"], ["x2"]):
            name, pairs, floor, ingest_s, pairs_per_s, ratio, peak = line.split()
            rows[name] = (int(pairs), float(floor), float(ingest_s), float(ratio), float(peak))
    assert [rows[n][0] for n in ("x1", "x2")] == [8, 16]
    for _, floor, ingest_s, ratio, peak in rows.values():
        assert ingest_s > 0 and abs(ratio - floor / ingest_s) < 0.02
        assert 20 < peak < 4000  # MiB: this process and its workers, sampled
    memory_ratio = next(line for line in result.stdout.splitlines() if "peak memory ratio" in line)
    assert abs(float(memory_ratio.split()[-3]) - rows["x2"][4] / rows["x1"][4]) < 0.02
    assert list(tmp_path.iterdir()) == []  # the scratch folder is cleaned up


def test_ingest_and_info_on_the_built_in_sample(tmp_path):
    runner = CliRunner()
    out = tmp_path / "data"
    result = runner.invoke(
        cli,
        [
            "ingest",
            str(SAMPLE / "roadscene"),
            "--meta",
            str(SAMPLE / "roadscene-daynight.csv"),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "now holds 8 pairs" in result.output
    info = runner.invoke(cli, ["info", str(out), "--json"])
    summary = json.loads(info.output)
    assert summary["pairs"] == 8 and summary["by_daynight"] == {"day": 4, "night": 4}
    text = runner.invoke(cli, ["info", str(out)]).output
    assert "roadscene/night" in text


def test_dry_run_prints_resolved_options(tmp_path):
    result = CliRunner().invoke(
        cli,
        [
            "ingest",
            str(SAMPLE / "roadscene"),
            "--out",
            str(tmp_path),
            "--split",
            "0.7,0.2,0.1",
            "--set",
            "shard_size=5",
            "--dry-run",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "shard_size: 5" in result.output and "- 0.7" in result.output
    assert not any(tmp_path.iterdir())


def test_exit_codes_for_nothing_ingested_and_strict(tmp_path):
    runner = CliRunner()
    (tmp_path / "rgb").mkdir()
    (tmp_path / "tir").mkdir()
    (tmp_path / "rgb" / "a.jpg").write_bytes(b"")
    (tmp_path / "tir" / "a.jpg").write_bytes(b"")
    empty = runner.invoke(
        cli,
        [
            "ingest",
            "--rgb",
            str(tmp_path / "rgb"),
            "--tir",
            str(tmp_path / "tir"),
            "--out",
            str(tmp_path / "o1"),
        ],
    )
    assert empty.exit_code == 1 and "RGB empty file" in empty.output
    (tmp_path / "rgb" / "b.jpg").write_bytes(
        (SAMPLE / "roadscene/crop_LR_visible/FLIR_00006.jpg").read_bytes()
    )
    (tmp_path / "tir" / "b.jpg").write_bytes(
        (SAMPLE / "roadscene/cropinfrared/FLIR_00006.jpg").read_bytes()
    )
    args = ["ingest", "--rgb", str(tmp_path / "rgb"), "--tir", str(tmp_path / "tir")]
    assert runner.invoke(cli, [*args, "--out", str(tmp_path / "o2")]).exit_code == 0
    assert runner.invoke(cli, [*args, "--out", str(tmp_path / "o3"), "--strict"]).exit_code == 1


def test_user_errors_are_clean_messages(tmp_path):
    result = CliRunner().invoke(cli, ["ingest", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "cannot detect the layout" in result.output
    assert "Traceback" not in result.output


def test_bench_generate_scale_limit_runs_the_pipeline_stages_in_one_process(tmp_path):
    from tirsynth import bench

    source = bench._small_image_corpus(tmp_path / "in", 10)
    checkpoint = bench._random_checkpoint(tmp_path, "tiny.yaml")
    images, seconds = bench._same_work_in_one_process(
        source, checkpoint, tmp_path / "work", 7, 2, 4
    )
    assert images == 8 and seconds > 0  # two CPU batches of 4, each written in shards of 2
    assert not (tmp_path / "work").exists()


def test_bench_train_prints_sparse_and_dense_side_by_side():
    result = CliRunner().invoke(
        cli,
        [
            "bench",
            "train",
            "--config",
            str(CONFIGS / "sparse.yaml"),
            "--set",
            "model.ngf=4",
            "--set",
            "model.ndf=4",
            "--set",
            "data.image_size=256",
            "--steps",
            "1",
            "--precision",
            "fp32",
            "--precision",
            "bf16",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "sparse/dense" in result.output
    row = next(line for line in result.output.splitlines() if line.startswith("bf16 "))
    sparse, dense, ratio = map(float, row.split()[1:])
    assert sparse > 0 and dense > 0 and abs(ratio - sparse / dense) < 0.01


def test_generate_export_and_bench_generate(tmp_path, tiny_checkpoint, ray_session):
    source = SAMPLE / "roadscene" / "crop_LR_visible"
    out, folder = tmp_path / "out", tmp_path / "folder"
    args = [
        "generate",
        "--input",
        str(source),
        "--out",
        str(out),
        "--checkpoint",
        str(tiny_checkpoint),
        "--batch-size",
        "4",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "generated 8 images" in result.output and "structure" in result.output
    again = CliRunner().invoke(cli, args)
    assert "generated 0 images (8 in" in again.output
    other = CliRunner().invoke(cli, [*args[:-2], "--long-side", "64"])
    assert other.exit_code == 1 and "--overwrite" in other.output
    exported = CliRunner().invoke(cli, ["export", str(out), "--to", str(folder)])
    assert exported.exit_code == 0 and sorted(p.stem for p in folder.iterdir()) == sorted(
        p.stem for p in source.iterdir()
    )
    bench = CliRunner().invoke(
        cli,
        [
            "bench",
            "generate",
            "--input",
            str(source),
            "--checkpoint",
            str(tiny_checkpoint),
            "--limit",
            "4",
            "--batch-size",
            "2",
        ],
    )
    assert bench.exit_code == 0, bench.output
    assert "ratio to bare forward" in bench.output and "peak memory" in bench.output
    assert "generate, cold" in bench.output and "generate, warm" in bench.output
    # --limit's subset is real files in a folder of their own (a link out would be a reject)
    assert bench.output.count("over 4 images") == 2 and "the model busy" in bench.output


def test_evaluate_command(tmp_path, learnable_shards, tiny_checkpoint):
    out = tmp_path / "ev"
    result = CliRunner().invoke(
        cli,
        [
            "evaluate",
            "--data",
            str(learnable_shards),
            "--split",
            "val",
            "--checkpoint",
            str(tiny_checkpoint),
            "--name",
            "tiny",
            "--no-baselines",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].startswith("tiny") and "rgb-luma" not in result.output
    assert f"report: {out / 'report.html'}" in result.output
    missing = CliRunner().invoke(
        cli,
        [
            "evaluate",
            "--data",
            str(learnable_shards),
            "--split",
            "test",
            "--checkpoint",
            str(tiny_checkpoint),
            "--out",
            str(out),
        ],
    )
    assert missing.exit_code == 1 and "no samples in split 'test'" in missing.output


def test_generate_and_evaluate_use_the_builtin_model_in_an_empty_folder(
    tmp_path, monkeypatch, ray_session
):
    """A fresh install: no --checkpoint, no ./runs: the built-in model, said so, one TIR
    image per input at the input's size."""
    from PIL import Image

    from tirsynth import shards

    inputs = tmp_path / "rgb"
    inputs.mkdir()
    for name in ("FLIR_03801.jpg", "FLIR_06506.jpg"):
        (inputs / name).write_bytes((SAMPLE / "roadscene" / "crop_LR_visible" / name).read_bytes())
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["generate", "--input", "rgb", "--out", "X"])
    assert result.exit_code == 0, result.output
    assert "using the built-in model" in result.output and "generated 2 images" in result.output
    rows = shards.read_index(tmp_path / "X")
    for row in rows:
        with Image.open(inputs / row["relpath"]) as source:
            assert (row["width"], row["height"]) == source.size
    ingested = CliRunner().invoke(
        cli, ["ingest", str(SAMPLE / "roadscene"), "--out", "pairs", "--split", "0,0,1"]
    )
    assert ingested.exit_code == 0, ingested.output
    evaluated = CliRunner().invoke(cli, ["evaluate", "--data", "pairs", "--out", "evaluation"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "using the built-in model" in evaluated.output


def test_builtin_names_the_shipped_model_while_runs_holds_a_trained_one(
    tmp_path, monkeypatch, ray_session, tiny_checkpoint
):
    """After `make demo` ./runs holds a rough model, which a bare generate would take:
    --checkpoint builtin (and --compare builtin) asks for the shipped one by name."""
    trained = tmp_path / "runs" / "demo" / "checkpoints" / "best.pt"
    trained.parent.mkdir(parents=True)
    trained.write_bytes(tiny_checkpoint.read_bytes())
    inputs = tmp_path / "rgb"
    inputs.mkdir()
    (inputs / "a.jpg").write_bytes(
        (SAMPLE / "roadscene" / "crop_LR_visible" / "FLIR_03801.jpg").read_bytes()
    )
    monkeypatch.chdir(tmp_path)
    bare = CliRunner().invoke(cli, ["generate", "--input", "rgb", "--out", "bare"])
    assert bare.exit_code == 0 and "runs/demo/checkpoints/best.pt" in bare.output
    named = CliRunner().invoke(
        cli, ["generate", "--input", "rgb", "--out", "named", "--checkpoint", "builtin"]
    )
    assert named.exit_code == 0, named.output
    assert "using the built-in model" in named.output and "runs/demo" not in named.output
    pairs = CliRunner().invoke(
        cli, ["ingest", str(SAMPLE / "roadscene"), "--out", "pairs", "--split", "0,0,1"]
    )
    assert pairs.exit_code == 0, pairs.output
    compared = CliRunner().invoke(
        cli,
        [
            "evaluate",
            "--data",
            "pairs",
            "--out",
            "ev",
            "--no-baselines",
            "--compare",
            "builtin",
            "--name",
            "demo",
            "--name",
            "shipped",
        ],
    )
    assert compared.exit_code == 0, compared.output
    assert {
        m["name"]: m["checkpoint"]
        for m in json.loads((tmp_path / "ev" / "report.json").read_text())["models"]
    } == {"demo": str(trained), "shipped": str(BUILTIN)}
    missing = CliRunner().invoke(
        cli, ["generate", "--input", "rgb", "--out", "x", "--checkpoint", "nope.pt"]
    )
    assert missing.exit_code != 0 and "nope.pt" in missing.output


def test_io_faults_are_one_line_also_from_inside_ray_tasks(tmp_path, ray_session):
    import errno

    import click
    import ray
    import ray.data

    from tirsynth.cli import user_errors

    @ray.remote
    def write_on_a_full_disk():
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/tir-1.tar")

    with pytest.raises(click.ClickException) as caught, user_errors():
        ray.get(write_on_a_full_disk.remote())
    message = caught.value.message
    assert message.startswith("No space left on device: /data/out/tir-1.tar.")
    assert "same command finishes the job" in message and "\n" not in message

    def read_only_folder(batch):  # a Ray Data task: its error reaches the driver as text
        raise PermissionError(errno.EROFS, "Read-only file system", "/data/out/index.parquet")

    with pytest.raises(click.ClickException) as caught, user_errors():
        list(ray.data.range(2).map_batches(read_only_folder).iter_rows())
    assert caught.value.message.startswith("Read-only file system: /data/out/index.parquet.")
    with pytest.raises(RuntimeError), user_errors():  # not an I/O fault: left as it is
        raise RuntimeError("a bug")


def test_an_output_below_a_regular_file_is_one_line(tmp_path, tiny_checkpoint, ray_session):
    (tmp_path / "file").write_text("x")
    below = str(tmp_path / "file" / "sub")
    source = tmp_path / "in"
    source.mkdir()
    Image.new("RGB", (20, 10)).save(source / "a.png")
    runner = CliRunner()
    for args in (
        ["generate", "--input", str(source), "--out", below, "--checkpoint", str(tiny_checkpoint)],
        ["ingest", str(source), "--out", below],
    ):
        result = runner.invoke(cli, args)
        assert result.exit_code == 1, result.output
        assert "Not a directory" in result.output and "Traceback" not in result.output, args
        assert len(result.output.strip().splitlines()) == 1


def test_bench_temporal_reports_every_checkpoint_even_with_one_file_name(tmp_path, tiny_checkpoint):
    """Two runs' step_N.pt are two models: each gets its own line, named by its run."""
    import shutil

    from conftest import write_video

    write_video(tmp_path / "rgb.mp4", 4)
    write_video(tmp_path / "tir.mp4", 4, offset=5)
    paths = []
    for run in ("runA", "runB"):
        (tmp_path / run / "checkpoints").mkdir(parents=True)
        paths.append(shutil.copy(tiny_checkpoint, tmp_path / run / "checkpoints" / "step_9.pt"))
    args = ["bench", "temporal", str(tmp_path / "rgb.mp4"), str(tmp_path / "tir.mp4")]
    result = CliRunner().invoke(cli, [*args, "--checkpoint", paths[0], "--checkpoint", paths[1]])
    assert result.exit_code == 0, result.output
    lines = [line.split(":")[0] for line in result.output.splitlines() if "flicker ratio" in line]
    assert lines == ["runA", "runB", "rgb-luma"], result.output
    steady = CliRunner().invoke(cli, [*args, "--checkpoint", paths[0], "--temporal-filter", "4"])
    assert steady.exit_code == 0, steady.output
    lines = [line.split(":")[0] for line in steady.output.splitlines() if "flicker ratio" in line]
    assert lines == ["runA", "rgb-luma", "runA filtered"], steady.output
