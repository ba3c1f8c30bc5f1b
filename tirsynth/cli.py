"""The `tirsynth` command: one subcommand per stage, each a thin shell over the library."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click

from tirsynth import __version__, shards
from tirsynth.config import (
    BUILTIN_NAME,
    EvaluateConfig,
    GenerateConfig,
    IngestConfig,
    TrainConfig,
    config_yaml,
    load_config,
)


class CheckpointType(click.ParamType):
    """An existing checkpoint file, or "builtin" for the model shipped in the package."""

    name = "FILE|builtin"
    _file = click.Path(exists=True, dir_okay=False)

    def convert(self, value, param, ctx):
        if value == BUILTIN_NAME:
            return value
        return self._file.convert(value, param, ctx)


# Options that several stage commands share.
out_option = click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Output folder."
)

CHECKPOINT = CheckpointType()
checkpoint_option = click.option(
    "--checkpoint",
    type=CHECKPOINT,
    help="Trained checkpoint, or 'builtin' [default: the newest best.pt under ./runs, else "
    "the built-in model].",
)
temporal_filter_option = click.option(
    "--temporal-filter",
    type=click.FloatRange(min=0, min_open=True),
    metavar="TAU",
    help="Sequences: keep the texture still where the input is (a motion-adaptive filter; "
    "pixels whose input changes by TAU grey levels count as moving, e.g. 4) [off].",
)
precision_option = click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    help="auto: bf16 where the hardware has it [auto].",
)
set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Any option, as YAML."
)


class StagesInOrder(click.Group):
    """`tirsynth --help` lists the stages in pipeline order, then the tools."""

    ORDER = ("ingest", "info", "train", "generate", "export", "evaluate", "report",
             "figure", "pipeline", "model", "save-weights", "bench")  # fmt: skip

    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: (self.ORDER.index(n) if n in self.ORDER else 99, n))


@click.group(cls=StagesInOrder, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tirsynth")
def cli() -> None:
    """Turn RGB image corpora into synthetic thermal-infrared datasets with valid labels.

    raw pairs -> ingest -> pair shards -> train -> checkpoint -> generate -> TIR shards
    """


@cli.command()
@click.argument("sources", nargs=-1, type=click.Path(exists=True))
@out_option
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False),
    help="YAML with ingest options (flags given here win).",
)
@click.option(
    "--layout",
    type=click.Choice(["auto", "roadscene", "llvip", "kaist", "folders", "csv"]),
    help="Force the layout of every SRC.",
)
@click.option(
    "--rgb",
    "rgb_dir",
    type=click.Path(exists=True, file_okay=False),
    help="Generic pairs: folder of RGB images ...",
)
@click.option(
    "--tir",
    "tir_dir",
    type=click.Path(exists=True, file_okay=False),
    help="... and folder of TIR images, matched by relative path and stem.",
)
@click.option("--dataset", help="Dataset name for generic layouts (default: folder name).")
@click.option(
    "--meta",
    type=click.Path(exists=True, dir_okay=False),
    help="CSV with a stem, key or clip (a video's every frame) column; its other columns "
    "(e.g. split, daynight) are merged.",
)
@click.option(
    "--daynight",
    type=click.Choice(["layout", "auto", "day", "night"]),
    help="layout: as the dataset says (default); auto: estimate when it does not "
    "say; day/night: set for all. A --meta row always wins.",
)
@click.option(
    "--split",
    help="train,val,test fractions by key hash, for datasets without "
    "their own split [default: 0.8,0.1,0.1].",
)
@click.option("--shard-size", type=click.IntRange(min=1), help="Pairs per shard [256].")
@click.option(
    "--resize",
    type=click.Choice(["none", "rgb", "tir"]),
    help="Resize this side of a size-mismatched pair to the other's size "
    "(default none: reject the pair).",
)
@click.option(
    "--verify",
    type=click.Choice(["fast", "full"]),
    help="fast: check headers and end markers (default); full: decode every pixel.",
)
@click.option("--max-pixels", type=click.IntRange(min=1), help="Decompression-bomb limit.")
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    help="Processes (0: all cores, fewer for small jobs).",
)
@click.option("--overwrite", is_flag=True, default=None, help="Replace a different ingest in OUT.")
@click.option(
    "--strict", is_flag=True, default=None, help="Exit non-zero if anything was rejected."
)
@click.option(
    "--frame-stride",
    type=click.IntRange(min=1),
    help="Paired video: take every Nth frame; a clip's frames share a split [10].",
)
@set_option
@click.option("--dry-run", is_flag=True, help="Print the resolved options and exit.")
def ingest(sources, config_path, overrides, dry_run, **flags) -> None:
    """Paired RGB/TIR datasets (RoadScene, LLVIP, KAIST, M3SVD video, folders, CSV) -> pair
    shards.

    \b
    Example:
      tirsynth ingest ../shared/data/roadscene ../shared/data/llvip --out data/
    """
    from tirsynth import ingest as ingest_stage

    given = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None and k != "split"]
    given += [f"split=[{flags['split']}]"] if flags["split"] else []
    given += [f"sources={json.dumps(list(sources))}"] if sources else []
    cfg = _load(config_path, IngestConfig, given + list(overrides))
    if dry_run:
        click.echo(config_yaml(cfg), nl=False)
        return
    with user_errors(ingest_stage.IngestStopped):
        result = ingest_stage.run(cfg)
    _print_ingest_summary(result)
    if result.pairs == 0 or (cfg.strict and result.rejects):
        sys.exit(1)


@cli.command()
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(root, as_json) -> None:
    """What a folder tirsynth wrote holds: pair shards (counts by split, dataset and
    day/night), TIR shards, a training run, an evaluation or a pipeline's output.

    \b
    Example:
      tirsynth info data/
    """
    from tirsynth import folders

    with user_errors():
        summary = folders.describe(root)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    kind = summary["kind"]
    if kind == "unknown":
        click.echo(summary["message"])
        sys.exit(1)
    if kind == "pair shards":
        click.echo(
            f"{root}: {summary['pairs']} pairs in {summary['shards']} shards "
            f"(status: {summary['status']})"
        )
        sections = (
            ("split", "by_split"),
            ("dataset", "by_dataset"),
            ("day/night", "by_daynight"),
            ("dataset/day-night", "by_dataset_daynight"),
            ("rejects by reason", "rejects_by_reason"),
        )
    elif kind == "TIR shards":
        click.echo(
            f"{root}: TIR shards, {summary['outputs']} generated images in {summary['shards']} "
            f"shards (status: {summary['status']}) from {summary['input_kind']} input "
            f"{summary['input']} with {summary['checkpoint']}; {summary['rejects']} rejects"
            + (f"; {summary['sequences']} sequences" if summary["sequences"] else "")
        )
        sections = (("rejects by reason", "rejects_by_reason"),)
    else:
        click.echo(f"{root}: {kind}")
        for name, value in summary.items():
            if name not in ("kind", "root"):
                click.echo(f"  {name}: {json.dumps(value) if isinstance(value, dict) else value}")
        return
    if summary.get("damaged_shards"):
        damaged = summary["damaged_shards"]
        click.echo(
            f"  damaged: {len(damaged)} shards missing or not the size committed "
            f"({', '.join(damaged[:3])}{', ...' if len(damaged) > 3 else ''}); run the "
            "command that wrote this folder again with the same options to redo them"
        )
    for title, field in sections:
        counts = summary[field]
        if counts:
            click.echo(f"  {title}:")
            for name, count in sorted(counts.items()):
                click.echo(f"    {name:<48} {count:>7}")


@cli.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False),
    help="Training config, e.g. configs/sparse.yaml (with --resume: OUT/config.yaml).",
)
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder.")
@click.option("--resume", is_flag=True, help="Continue OUT from its latest checkpoint.")
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Data-parallel workers; more than 1 runs through Ray Train (DDP).",
)
@click.option("--address", help="Ray cluster to join (with --workers > 1).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="e.g. train.lr=1e-4")
@click.option("--dry-run", is_flag=True, help="Print the resolved config and exit.")
def train(config_path, data, out, resume, workers, address, overrides, dry_run) -> None:
    """Train the sparse GAN (or a baseline) on pair shards; checkpoints go to OUT.

    \b
    Example:
      tirsynth train --config configs/sparse_plus.yaml --data data/ --out runs/sparse
    """
    from pathlib import Path

    from tirsynth import train as train_stage

    if config_path is None and not resume:
        raise click.UsageError("--config is required unless --resume reuses OUT/config.yaml")
    cfg = _load(config_path or Path(out) / "config.yaml", TrainConfig, list(overrides))
    if dry_run:
        click.echo(config_yaml(cfg), nl=False)
        return
    with user_errors(train_stage.TrainingDiverged):
        result = train_stage.run(cfg, data, out, resume=resume, workers=workers, address=address)
    val = result.val
    scores = f"; val SSIM {val['ssim']:.4f}, PSNR {val['psnr']:.2f}" if val else ""
    click.echo(f"trained {result.step} steps ({result.epoch} epochs){scores}")
    click.echo(f"checkpoint: {result.checkpoint}  best: {result.best_checkpoint}")


@cli.command()
@click.option(
    "--input",
    "input_",
    required=True,
    type=click.Path(exists=True),
    help="Folder (images, numbered frames, videos), COCO or YOLO root, MOT / GOT-10k / "
    "LaSOT tree, a video file, a text list of paths, or pair shards.",
)
@out_option
@checkpoint_option
@click.option(
    "--kind",
    "input_kind",
    type=click.Choice(["auto", "folder", "coco", "yolo", "list", "shards", "video", "sequences"]),
    help="Input kind [auto: detected].",
)
@click.option("--split", help="Pair-shard input: only this split.")
@click.option(
    "--batch-size", type=click.IntRange(min=1),
    help="Images per model call [64 with a GPU, else 8].",
)  # fmt: skip
@click.option(
    "--cpu-batch", type=click.IntRange(min=1),
    help="Images per CPU task: decoding, and mapping back, encoding and scoring [32].",
)  # fmt: skip
@click.option(
    "--concurrency", type=click.IntRange(min=0),
    help="CPU tasks at once in each CPU stage [0: as many as Ray schedules].",
)  # fmt: skip
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    help="Model replicas [0: one per GPU, or 1 on the CPU].",
)
@precision_option
@click.option(
    "--long-side",
    type=click.IntRange(min=1),
    help="Scale each frame so its long side has this many pixels for the model [the "
    "checkpoint's working scale].",
)
@click.option(
    "--tile",
    type=click.IntRange(min=1),
    help="Frames whose model-side square is larger run in overlapping tiles [1024].",
)
@click.option("--keep-rgb", is_flag=True, default=None, help="Also store each input RGB.")
@click.option(
    "--min-structure",
    type=click.FloatRange(-1, 1),
    help="Reject outputs whose structure score (an SSIM, -1..1) is below this [no gate].",
)
@temporal_filter_option
@click.option("--shard-size", type=click.IntRange(min=1), help="Samples per shard [256].")
@click.option("--overwrite", is_flag=True, default=None, help="Replace a different run in OUT.")
@click.option(
    "--retry-rejects", is_flag=True, default=None,
    help="On resume, process the earlier rejects again (e.g. read errors marked retryable).",
)  # fmt: skip
@click.option("--address", help="Ray cluster to join [a local one].")
@click.option(
    "--verbose", is_flag=True, default=None, help="Show Ray's own logs [they go to OUT/ray.log]."
)
@set_option
@click.option("--dry-run", is_flag=True, help="Print the resolved options and exit.")
def generate(input_, overrides, dry_run, **flags) -> None:
    """RGB images or sequences (folder, COCO, YOLO, video, MOT, GOT-10k, LaSOT, list, pair
    shards) -> TIR shards with their labels.

    \b
    Example:
      tirsynth generate --input coco/ --out tir/
    """
    from tirsynth import generate as generate_stage

    given = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    cfg = _load(None, GenerateConfig, [f"input={json.dumps(input_)}", *given, *overrides])
    if dry_run:
        click.echo(config_yaml(cfg), nl=False)
        return
    with user_errors():
        result = generate_stage.run(cfg)
    overall = result.report["overall"]
    scores = ", ".join(f"{k} {v:.4f}" for k, v in overall.items() if v is not None)
    click.echo(
        f"generated {result.generated} images ({result.total} in {result.out}); "
        f"{result.report['images_per_s']:.2f} images/s; checkpoint {result.checkpoint}"
    )
    if result.report.get("model_share") is not None and result.generated:
        click.echo(
            f"model: {result.report['model_seconds_per_image'] * 1000:.1f} ms per image, "
            f"busy {result.report['model_share']:.0%} of the pipeline's time"
        )
    click.echo(f"mean quality: {scores}")
    temporal = result.report.get("temporal")
    if temporal and temporal["flicker_ratio"] is not None:
        click.echo(f"{temporal['sequences']} sequences: the output changes "
                   f"{temporal['flicker_ratio']:.2f}x as much as the input from frame to frame "
                   "(per sequence in report.html)")  # fmt: skip
    if result.rejects:
        click.echo(f"{len(result.rejects)} inputs rejected (see {result.out}/rejects.parquet):")
        for reason, count in sorted(result.report["rejects_by_reason"].items()):
            click.echo(f"  {count:>6}  {reason}")


@cli.command("save-weights")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option(
    "--dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"])
)
def save_weights(checkpoint, out, dtype) -> None:
    """A checkpoint's generator (its average, if kept) as OUT.safetensors: for inference
    only, half the size at float16, loadable without pickle; --checkpoint takes it.

    \b
    Example:
      tirsynth save-weights runs/sparse/checkpoints/best.pt sparse.safetensors
    """
    from pathlib import Path

    import torch

    from tirsynth.checkpoint import WEIGHTS_SUFFIX, load_checkpoint
    from tirsynth.checkpoint import save_weights as save

    if not out.endswith(WEIGHTS_SUFFIX):
        raise click.UsageError(f"OUT must end in {WEIGHTS_SUFFIX}")
    path = save(load_checkpoint(checkpoint), Path(out), getattr(torch, dtype))
    click.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


@cli.command()
@click.argument("generated", type=click.Path(exists=True, file_okay=False))
@click.option("--to", required=True, type=click.Path(file_okay=False), help="Target folder.")
@click.option(
    "--video",
    "video_quality",
    metavar="lossless|CRF",
    help="Also write each sequence as one video beside its folder: 'lossless' (FFV1 .mkv) "
    "or an H.264 CRF, 0-51, lower is better (.mp4).",
)
def export(generated, to, video_quality) -> None:
    """Write a generate run's outputs as a folder tree mirroring its input, labels beside.

    \b
    Example:
      tirsynth export runs/tir --to runs/tir-files --video lossless
    """
    from tirsynth import export as export_stage

    quality = _video_quality(video_quality)
    with user_errors():
        result = export_stage.run(generated, to, video_quality=quality)
    click.echo(f"exported {result.images} images to {to}")
    if result.filled_frames:
        click.echo(f"{result.filled_frames} rejected frames of sequences written as a copy of "
                   "their nearest generated frame (see rejects.parquet)")  # fmt: skip
    if result.empty_sequences:
        names = ", ".join(result.empty_sequences[:5])
        click.echo(f"warning: {len(result.empty_sequences)} sequences had no frame generated "
                   f"and were not written: {names}", err=True)  # fmt: skip
    if result.videos:
        click.echo(f"wrote {result.videos} sequence videos")


def _video_quality(text: str | None) -> int | None | bool:
    """--video: False (none), None (lossless) or a CRF."""
    if text is None:
        return False
    if text == "lossless":
        return None
    if text.isdigit() and int(text) <= 51:
        return int(text)
    raise click.BadParameter("'lossless' or a CRF from 0 to 51", param_hint="--video")


@cli.command()
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Pair shards from tirsynth ingest.",
)
@out_option
@checkpoint_option
@click.option(
    "--compare",
    multiple=True,
    type=CHECKPOINT,
    help="More checkpoints ('builtin' too), side by side (repeatable).",
)
@click.option("--name", "names", multiple=True, help="Display names, one per checkpoint.")
@click.option("--split", help="[test]")
@click.option(
    "--no-baselines",
    "baselines",
    flag_value=False,
    default=None,
    help="Skip the RGB-luma and inverted-luma baselines.",
)
@precision_option
@click.option("--paper", is_flag=True, default=None, help="Put the paper's numbers beside ours.")
@set_option
def evaluate(overrides, **flags) -> None:
    """SSIM, PSNR, GMSD, edge ratio and LBP of checkpoints (and baselines) against real
    TIR, by dataset and day/night.

    \b
    Example:
      tirsynth evaluate --data data/ --split test --out runs/eval \\
          --checkpoint runs/sparse/checkpoints/best.pt
    """
    from tirsynth import evaluate as evaluate_stage

    given = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v not in (None, ())]
    cfg = _load(None, EvaluateConfig, [*given, *overrides])
    with user_errors():
        result = evaluate_stage.run(cfg)
    click.echo(f"{'model':<24}{'SSIM':>8}{'PSNR':>8}  by day/night (SSIM)")
    for name, scores in result.results.items():
        overall = scores["overall"]
        groups = ", ".join(f"{g} {v['ssim']:.4f}" for g, v in scores["by_daynight"].items())
        click.echo(f"{name:<24}{overall['ssim']:>8.4f}{overall['psnr']:>8.2f}  {groups}")
    click.echo(f"report: {result.out / 'report.html'}")


@cli.command()
@click.option(
    "--pair",
    "pairs",
    nargs=2,
    multiple=True,
    required=True,
    metavar="RGB TIR",
    help="A registered pair (repeatable); a video frame is `clip.mp4#frame=N`.",
)
@checkpoint_option
@click.option(
    "--compare",
    multiple=True,
    type=CHECKPOINT,
    help="Another model ('builtin' too): one more generated column, after the first (repeatable).",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The PNG to write.")
@click.option("--long-side", type=click.IntRange(min=1), help="Override the working scale.")
def figure(pairs, checkpoint, compare, out, long_side) -> None:
    """RGB | generated TIR | real TIR of registered pairs, each at its own resolution, as
    one PNG (the README's results figure is made so: `make figure`); with --compare, one
    generated column per model.

    \b
    Example:
      tirsynth figure --pair rgb/0001.jpg tir/0001.jpg --out results.png
    """
    from pathlib import Path

    from tirsynth import evaluate as evaluate_stage
    from tirsynth.checkpoint import checkpoint_path
    from tirsynth.inference import resolve_checkpoint

    with user_errors():
        cfg = EvaluateConfig(long_side=long_side)
        others = tuple(map(checkpoint_path, compare))
        path = evaluate_stage.results_figure(
            list(pairs), resolve_checkpoint(checkpoint), Path(out), cfg, others
        )
    click.echo(f"wrote {path}")


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def report(run_dir) -> None:
    """Rebuild RUN_DIR/report.html (a train, generate or evaluate run) from its files.

    \b
    Example:
      tirsynth report runs/sparse
    """
    from tirsynth.report import write_report

    with user_errors():
        click.echo(f"report: {write_report(run_dir)}")


@cli.group()
def pipeline() -> None:
    """Pipelines: stages chained by a file in pipelines/.

    \b
    Example:
      tirsynth pipeline run pipelines/demo.yaml
    """


@pipeline.command("run")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--var",
    "variables",
    multiple=True,
    metavar="NAME=VALUE",
    help="Set one of the file's vars (value as YAML).",
)
def pipeline_run(path, variables) -> None:
    """Run PATH's stages in order, skipping those already complete for the same inputs.

    \b
    Example:
      tirsynth pipeline run pipelines/demo.yaml
    """
    import yaml

    from tirsynth import pipeline as pipeline_module

    values = {}
    for item in variables:
        name, sep, raw = item.partition("=")
        if not sep:
            raise click.UsageError(f"--var {item!r} is not NAME=VALUE")
        values[name.strip()] = yaml.safe_load(raw)
    with user_errors():
        outputs = pipeline_module.run(path, values)
    last = list(outputs.values())[-1]
    final = last if last.suffix == ".html" else last / "report.html"
    click.echo(f"pipeline done; report: {final}")


@cli.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(exists=True, dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="e.g. model.ngf=32")
@click.option("--image-size", default=256, show_default=True, type=click.IntRange(min=2))
def model(config_path, overrides, image_size) -> None:
    """Parameter counts and FLOPs per image of CONFIG's generator and discriminator.

    \b
    Example:
      tirsynth model configs/sparse.yaml --set model.out_channels=3
    """
    import torch

    from tirsynth.models import build_discriminator, build_generator, count_flops, count_parameters

    cfg = _load(config_path, TrainConfig, list(overrides)).model
    generator, discriminator = build_generator(cfg).eval(), build_discriminator(cfg).eval()
    rgb = torch.zeros(1, cfg.in_channels, image_size, image_size)
    tir = torch.zeros(1, cfg.out_channels, image_size, image_size)
    click.echo(f"skips {list(cfg.resolved_skips())} -> layer pairs {generator.skip_pairs()}")
    click.echo(f"generator_parameters {count_parameters(generator)}")
    click.echo(f"discriminator_parameters {count_parameters(discriminator)}")
    click.echo(f"generator_flops_per_image {count_flops(generator, rgb)}")
    click.echo(f"discriminator_flops_per_image {count_flops(discriminator, rgb, tir)}")


@cli.group()
@click.option(
    "--markdown",
    type=click.Path(dir_okay=False),
    help="Also append the figures to this Markdown file, with the command, commit, date "
    "and machine (docs/benchmarks.md collects them).",
)
@click.pass_context
def bench(ctx, markdown) -> None:
    """Benchmarks: each prints its figures and the ratio to its limit.

    \b
    Example:
      tirsynth bench --markdown docs/benchmarks.md generate --limit 64
    """
    ctx.meta["bench_lines"] = []
    ctx.meta["bench_markdown"] = markdown


@bench.result_callback()
@click.pass_context
def _write_bench_markdown(ctx, *_args, **_kwargs) -> None:
    if ctx.meta.get("bench_markdown") and ctx.meta["bench_lines"]:
        from tirsynth import provenance

        title = f"bench {ctx.invoked_subcommand}"
        section = provenance.markdown_section(title, ctx.meta["bench_lines"])
        provenance.append_markdown(ctx.meta["bench_markdown"], section)
        click.echo(f"appended to {ctx.meta['bench_markdown']}")


def bench_echo(line: str) -> None:
    """Print a benchmark's line and keep it for --markdown."""
    click.echo(line)
    click.get_current_context().meta.setdefault("bench_lines", []).append(line)


@bench.command("ingest")
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--meta", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--repeat",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Also measure a corpus this many times larger (copies under other names).",
)
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0))
@click.option(
    "--scratch",
    default="runs",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the ingest outputs (and copies) go, in a temporary folder: the disk ingest "
    "writes to, not /tmp, which can be a different file system.",
)
def bench_ingest(sources, meta, repeat, workers, scratch) -> None:
    """Pairs/s of ingest against the floor: reading and hashing the same files once.

    \b
    Example:
      tirsynth bench ingest ../shared/data/roadscene ../shared/data/llvip --repeat 10
    """
    from tirsynth import bench as bench_module

    lines = bench_module.bench_ingest(list(sources), meta, repeat, workers, scratch)
    for line in lines:
        bench_echo(line)


def bench_config_options(command):
    """--config (default the paper's) and repeatable --set, as the benchmarks take them."""
    command = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")(command)
    return click.option(
        "--config",
        "config_path",
        default="configs/sparse.yaml",
        show_default=True,
        type=click.Path(exists=True, dir_okay=False),
    )(command)


@bench.command("train")
@bench_config_options
@click.option(
    "--precision",
    "precisions",
    multiple=True,
    default=["fp32", "bf16"],
    show_default=True,
    type=click.Choice(["fp32", "bf16", "fp16"]),
)
@click.option("--steps", default=3, show_default=True, type=click.IntRange(min=1))
def bench_train(config_path, overrides, precisions, steps) -> None:
    """Seconds per training step, sparse vs dense generator, for each precision.

    \b
    Example:
      tirsynth bench train --precision bf16
    """
    from tirsynth import bench as bench_module

    cfg = _load(config_path, TrainConfig, list(overrides))
    for line in bench_module.bench_train(cfg, list(precisions), steps):
        bench_echo(line)


@bench.command("quality")
@bench_config_options
@click.option("--seeds", default=2, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--first-seed", default=0, show_default=True, type=click.IntRange(min=0),
    help="Run seeds FIRST..FIRST+SEEDS-1 (parallel processes each take their own).",
)  # fmt: skip
@click.option("--steps", default=1600, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--last", default=3, show_default=True, type=click.IntRange(min=1), help="Snapshots averaged."
)
@click.option("--proxy", is_flag=True, help="128 px, half width: a fast screen for ideas.")
@click.option("--shared", default="../shared/data", show_default=True, type=click.Path())
@click.option("--out", default="runs/bench-quality", show_default=True, type=click.Path())
@click.option(
    "--video", is_flag=True, help="Add M3SVD's clips (one to train, one to test, smoke kept out)."
)
def bench_quality(
    config_path, overrides, seeds, first_seed, steps, last, proxy, shared, out, video
):
    """Train a config on the shared pairs for a fixed budget per seed; print SSIM, PSNR,
    GMSD, edge ratio and LBP-histogram distance at each image's own size on a fixed test
    split (overall, by dataset, day/night) beside the luma baselines.

    \b
    Example:
      tirsynth bench quality --config configs/sparse_plus.yaml --proxy --seeds 2
    """
    from tirsynth import bench_quality as quality_bench

    bench = quality_bench.QualityBench(
        config_path, tuple(overrides), shared, out, seeds, steps, last, proxy, first_seed, video
    )
    with user_errors():
        for line in quality_bench.run(bench):
            bench_echo(line)


@bench.command("frontier")
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--group", default="overall", show_default=True,
    help="Test images to compare on: overall, roadscene, llvip, m3svd, day or night.",
)  # fmt: skip
@click.option("--out", default="frontier.png", show_default=True, type=click.Path())
def bench_frontier(results, group, out) -> None:
    """Compare recipes on the SSIM-detail trade-off: the points of `bench quality` result
    files (RESULTS: each run's quality-seeds*.json), the ones no other beats on every
    measure (SSIM, GMSD, edge ratio, LBP distance) marked, and a plot of SSIM against
    GMSD and the edge ratio.

    \b
    Example:
      tirsynth bench frontier runs/bq/*/sparse_plus-proxy/quality-seeds0-1.json
    """
    from tirsynth import bench_quality as quality_bench

    with user_errors():
        for line in quality_bench.frontier(list(results), out, group):
            bench_echo(line)


@bench.command("generate")
@click.option(
    "--input",
    "source",
    default="../shared/data/roadscene/crop_LR_visible",
    show_default=True,
    type=click.Path(exists=True, file_okay=False),
)
@click.option(
    "--checkpoint",
    type=click.Path(exists=True, dir_okay=False),
    help="[default: a random configs/sparse.yaml generator]",
)
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--precision",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
)
@click.option(
    "--limit",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Use only the first N images (0: all).",
)
@click.option(
    "--long-side",
    type=click.IntRange(min=1),
    help="Frames' long side for the model [the checkpoint's working scale].",
)
@click.option("--cpu-batch", type=click.IntRange(min=1), help="Images per CPU task [generate's].")
def bench_generate(source, checkpoint, batch_size, precision, limit, long_side, cpu_batch) -> None:
    """Generation images/s end to end against the bare generator forward pass.

    \b
    Example:
      tirsynth bench generate --checkpoint tirsynth/builtin/sparse_plus_half.safetensors
    """
    from tirsynth import bench as bench_module

    lines = bench_module.bench_generate(
        source, checkpoint, batch_size, precision, limit, long_side=long_side, cpu_batch=cpu_batch
    )
    for line in lines:
        bench_echo(line)


@bench.command("temporal")
@click.argument("rgb_video", type=click.Path(exists=True, dir_okay=False))
@click.argument("tir_video", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--checkpoint",
    "checkpoints",
    multiple=True,
    type=CHECKPOINT,
    help="Checkpoints to score (repeatable) [the built-in model].",
)
@click.option("--frames", default=0, type=click.IntRange(min=0), help="First N frames (0: all).")
@click.option("--long-side", type=click.IntRange(min=1), help="Override the working scale.")
@precision_option
@temporal_filter_option
def bench_temporal(
    rgb_video, tir_video, checkpoints, frames, long_side, precision, temporal_filter
) -> None:
    """Flicker ratio and temporal error of per-frame generation on a registered RGB/TIR clip
    pair, for each checkpoint and RGB luma (1 = as much frame-to-frame change as the real
    TIR); with --temporal-filter, each checkpoint also through generate's filter.

    \b
    Example:
      tirsynth bench temporal m3svd/visible/0113_1714.mp4 m3svd/infrared/0113_1714.mp4
    """

    from tirsynth import evaluate, temporal
    from tirsynth.checkpoint import BUILTIN, checkpoint_path

    cfg = EvaluateConfig(long_side=long_side, precision=precision or "auto")
    paths = [checkpoint_path(c) for c in checkpoints] or [BUILTIN]
    with user_errors():
        translators = {
            name: evaluate.translator(evaluate.describe_checkpoint(name, path), cfg)
            for name, path in zip(evaluate.checkpoint_names(paths), paths, strict=True)
        }
        models = list(translators)
        translators["rgb-luma"] = evaluate.translator({"kind": "baseline", "name": "rgb-luma"}, cfg)
        result = temporal.bench_temporal(
            rgb_video, tir_video, translators, frames, temporal_filter=temporal_filter,
            filtered=models,
        )  # fmt: skip
    bench_echo(f"frames: {result['frames']}")
    bench_echo(f"real TIR change per frame (grey levels): {result['real_change']:.2f}")
    for name, scores in result["models"].items():
        bench_echo(
            f"{name}: flicker ratio {scores['flicker_ratio']:.3f}, "
            f"temporal error {scores['temporal_error']:.3f}"
        )


@bench.command("generate-scale")
@click.option("--images", default=2000, show_default=True, type=click.IntRange(min=10))
@click.option(
    "--factor", default=10, show_default=True, type=click.IntRange(min=1),
    help="The second run's corpus, in multiples of --images (1: one run only).",
)  # fmt: skip
@click.option("--shard-size", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--cpu-batch", default=32, show_default=True, type=click.IntRange(min=1))
def bench_generate_scale(images, factor, shard_size, batch_size, cpu_batch) -> None:
    """Generate at 1x and FACTORx images: per-image time and driver peak RSS, and ratios.

    \b
    Example:
      tirsynth bench generate-scale --images 2000 --factor 10
    """
    from tirsynth import bench as bench_module

    lines = bench_module.bench_generate_scale(images, factor, shard_size, batch_size, cpu_batch)
    for line in lines:
        bench_echo(line)


def _load(path, cls, overrides):
    with user_errors():
        return load_config(path, cls, overrides)


@contextmanager
def user_errors(*extra: type[Exception]) -> Iterator[None]:
    """Errors a user can act on as one line: bad input, missing or existing files, and any
    I/O fault (a full disk, a read-only or forbidden folder, a file where a folder should
    be), also when it happened inside a Ray task or actor."""
    try:
        yield
    except (ValueError, FileNotFoundError, FileExistsError, *extra) as err:
        raise click.ClickException(str(err)) from err
    except Exception as err:
        fault = io_fault(err)
        if fault is None:
            raise
        raise click.ClickException(fault) from err


REMOTE_OS_ERROR = re.compile(r"\[Errno (\d+)\] ([^\n]*?)(?:: '([^'\n]*)')?$", re.MULTILINE)


def io_fault(error: BaseException) -> str | None:
    """One line for an OSError anywhere in `error`'s chain of causes (Ray wraps a task's
    exception as `cause`), or None when there is none. A Ray Data task's error arrives as
    text only (its UserCodeException loses the cause), so the last `[Errno N]` line of the
    remote traceback stands for it."""
    seen: set[int] = set()
    found: tuple[int, str | None, str | None] | None = None
    first = error
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno is not None:
            found = (error.errno, error.strerror, error.filename)
            break
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    if found is None:
        remote = REMOTE_OS_ERROR.findall(str(first))
        if not remote:
            return None
        number, text, filename = remote[-1]
        found = (int(number), text, filename or None)
    number, text, filename = found
    where = f": {filename}" if filename else ""
    return (
        f"{text or os.strerror(number)}{where}. Nothing committed is lost; once this is "
        "fixed, the same command finishes the job"
    )


def _print_ingest_summary(result) -> None:
    summary = shards.summarize(result.out)
    splits = ", ".join(f"{k} {v}" for k, v in sorted(summary["by_split"].items()))
    daynight = ", ".join(f"{k} {v}" for k, v in sorted(summary["by_daynight"].items()))
    click.echo(
        f"ingested {result.added} new pairs; {result.out} now holds {result.pairs} "
        f"pairs ({splits}; {daynight})"
    )
    if result.rejects:
        click.echo(f"skipped {len(result.rejects)} inputs (see {result.out}/rejects.parquet):")
        for reason, count in shards.rejects_by_reason(result.rejects).most_common():
            click.echo(f"  {count:>6}  {reason}")
    if result.meta_unmatched:
        shown = ", ".join(result.meta_unmatched[:5])
        click.echo(
            f"{len(result.meta_unmatched)} --meta rows matched no sample: {shown}"
            + (" ..." if len(result.meta_unmatched) > 5 else "")
        )


def main() -> None:
    """The console entry point: run the command, flush, and leave without interpreter
    teardown. Arrow's native thread pools can abort the process in static destructors at
    exit ("terminate called without an active exception", apache/arrow#34314) after all
    work is done and written; every output here is already closed and renamed by then."""
    try:
        cli()  # standalone mode: always ends in SystemExit
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
