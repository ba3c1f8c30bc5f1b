"""The quality benchmark: train a config on the shared real pairs for a fixed budget, several
seeds, and score it on a fixed test split beside the RGB-luma baselines.

One fixed split of RoadScene + LLVIP (by a hash of dataset and stem: 70% train, 10% val,
20% test, LLVIP included in each) is ingested once under the output folder; with `video`,
M3SVD's registered clips too, every tenth frame, each clip whole in one split
(`M3SVD_SPLITS`). Each seed
trains the config with `train.checkpoint_every` set so that the last `last` snapshots are
kept; each snapshot is scored by `evaluate` (the user's protocol: full size, one channel)
and a seed's figure is their mean, because a GAN's score moves by hundredths between
checkpoints. The table gives the mean over seeds and the spread (max - min) of SSIM, PSNR
and the detail metrics (`quality.DETAIL_METRICS`), which see the blur SSIM forgives.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tirsynth import evaluate, ingest, shards, train
from tirsynth.checkpoint import save_checkpoint
from tirsynth.config import EvaluateConfig, IngestConfig, TrainConfig, load_config, to_dict

SPLIT = (0.7, 0.1, 0.2)
# The fast proxy for screening ideas: 128 px, half width, depth 7 (a 128 side allows 7).
PROXY = ("data.image_size=128", "model.ngf=32", "model.ndf=32", "model.depth=7")
GROUPS = ("overall", "roadscene", "llvip", "m3svd", "day", "night")
# M3SVD's clips, whole: one to train on, one to test (its frames are the `m3svd` column),
# and the two where smoke hides from the RGB camera the people the thermal camera sees,
# which no RGB-to-TIR model can recover (the data's README): ingested as split `smoke`,
# out of both.
M3SVD_SPLITS = {"0113_1714": "train", "1230_1202": "test", "0117_1605": "smoke",
                "0117_1620": "smoke"}  # fmt: skip
METRICS = ("ssim", "psnr", "gmsd", "edge_ratio", "lbp_distance")


@dataclass(frozen=True)
class QualityBench:
    config: str
    overrides: tuple[str, ...] = ()
    shared: str = "../shared/data"  # holds roadscene/, llvip/ and roadscene-daynight.csv
    out: str = "runs/bench-quality"
    seeds: int = 2
    steps: int = 1600
    last: int = 3  # snapshots per seed to average (the last ones, evenly spaced)
    proxy: bool = False
    first_seed: int = 0  # run seeds first_seed .. first_seed + seeds - 1
    video: bool = False  # add M3SVD's clips (`M3SVD_SPLITS`)


def run(bench: QualityBench, progress: bool = True) -> Iterator[str]:
    """Train and score each seed (reusing finished seeds in `out`), then print the table."""
    out = Path(bench.out)
    data = prepare_data(Path(bench.shared), out / ("data-video" if bench.video else "data"),
                        bench.video)  # fmt: skip
    overrides = [*(PROXY if bench.proxy else ()), *bench.overrides]
    cfg = load_config(bench.config, TrainConfig, overrides)
    every = max(1, bench.steps // (bench.last + 1))  # 1600 steps, last 3: 800, 1200, 1600
    cfg = replace(
        cfg,
        train=replace(
            cfg.train, max_steps=bench.steps, epochs=10**6, checkpoint_every=every, val_every=10**6
        ),
    )
    name = Path(bench.config).stem + ("-proxy" if bench.proxy else "")
    per_seed = []
    for seed in range(bench.first_seed, bench.first_seed + bench.seeds):
        seed_cfg = replace(cfg, train=replace(cfg.train, seed=seed))
        run_dir = out / name / f"seed{seed}"
        baselines = {b: per_seed[0][b] for b in evaluate.BASELINES} if per_seed else None
        per_seed.append(train_and_score(seed_cfg, data, run_dir, bench.last, progress, baselines))
        yield f"seed {seed}: " + _one_line(per_seed[-1])
    seeds = f"{bench.first_seed}-{bench.first_seed + bench.seeds - 1}"
    summary = summarize_seeds(per_seed)
    shards.write_json(
        out / name / f"quality-seeds{seeds}.json", {"config": to_dict(cfg), **summary}
    )
    yield from format_table(name, summary, bench.seeds)


def prepare_data(shared: Path, data: Path, video: bool = False) -> Path:
    """The shared pairs as pair shards with the benchmark's fixed split (once)."""
    if (data / shards.INDEX).exists():
        return data
    roadscene, llvip = shared / "roadscene", shared / "llvip"
    for needed in (roadscene, llvip, shared / "roadscene-daynight.csv"):
        if not needed.exists():
            raise FileNotFoundError(f"{needed} is missing: the quality benchmark needs it")
    daynight = {
        r["stem"]: r["daynight"] for r in csv.DictReader(open(shared / "roadscene-daynight.csv"))
    }
    rows = [{"stem": p.stem, "daynight": daynight[p.stem], "split": _split("roadscene", p.stem)}
            for p in sorted((roadscene / "crop_LR_visible").iterdir())]  # fmt: skip
    rows += [{"stem": p.stem, "daynight": "night", "split": _split("llvip", p.stem)}
             for p in sorted((llvip / "visible" / "train").iterdir())]  # fmt: skip
    sources = [str(roadscene), str(llvip)]
    if video:
        rows += _m3svd_rows(shared / "m3svd")
        sources.append(str(shared / "m3svd"))
    data.parent.mkdir(parents=True, exist_ok=True)
    meta = data.parent / ("split-video.csv" if video else "split.csv")
    with meta.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["stem", "clip", "daynight", "split"])
        writer.writeheader()
        writer.writerows(rows)
    ingest.run(IngestConfig(sources=tuple(sources), meta=str(meta), out=str(data)))
    return data


def _m3svd_rows(m3svd: Path) -> list[dict[str, str]]:
    """A split row for each clip (it holds for every frame ingest takes)."""
    if not (m3svd / "visible").is_dir():
        raise FileNotFoundError(f"{m3svd} is missing: the benchmark's --video needs it")
    return [
        {"clip": clip, "daynight": "day", "split": M3SVD_SPLITS.get(clip, "smoke")}
        for clip in sorted(p.stem for p in (m3svd / "visible").glob("*.mp4"))
    ]  # a clip nobody looked at is kept out (smoke)


def train_and_score(
    cfg: TrainConfig,
    data: Path,
    run_dir: Path,
    last: int,
    progress: bool,
    baselines: dict[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """{model: {group: {metric: value}}} for the model (mean of its last snapshots) and the
    luma baselines (scored here unless `baselines` already holds them: they have no seed)."""
    latest = run_dir / train.CHECKPOINTS / train.LATEST
    done = latest.exists() and train.load_checkpoint(latest)["step"] >= cfg.train.max_steps
    if not done:  # a new seed, a killed one, or one asked for more --steps than it ran
        train.run(cfg, data, run_dir, resume=latest.exists(), progress=progress)
    snapshots = sorted((run_dir / train.CHECKPOINTS).glob("step_*.pt"))[-last:]
    scores = run_dir / "scores.json"
    if scores.exists():
        cached = json.loads(scores.read_text())
        scored = cached.pop("snapshots", None)
        if scored == [p.name for p in snapshots] and all(
            m in cached["model"]["overall"] for m in METRICS
        ):
            return cached  # else other snapshots, or a metric added since: score again
    evaluated = {"model": snapshots}
    if cfg.train.ema_power is not None:
        # The same run's G without the average: the paper's model, trained on the same
        # trajectory (the average changes no training step), so it costs no second run.
        evaluated["model-raw"] = [_without_average(p, run_dir / "raw") for p in snapshots]
    paths = [p for group in evaluated.values() for p in group]
    names = [f"{group}-{p.stem}" for group, members in evaluated.items() for p in members]
    result = evaluate.run(
        EvaluateConfig(
            data=str(data),
            out=str(run_dir / "evaluation"),
            checkpoint=str(paths[0]),
            compare=tuple(map(str, paths[1:])),
            names=tuple(names),
            baselines=baselines is None,
        ),
        progress=False,
    ).results
    table = {
        group: _mean_of([_groups(result[f"{group}-{p.stem}"]) for p in members])
        for group, members in evaluated.items()
    }
    for baseline in evaluate.BASELINES:
        table[baseline] = baselines[baseline] if baselines else _groups(result[baseline])
    shards.write_json(scores, {**table, "snapshots": [p.name for p in snapshots]})
    return table


def _without_average(checkpoint: Path, folder: Path) -> Path:
    state = train.load_checkpoint(checkpoint)
    state.pop("generator_ema", None)
    return save_checkpoint(folder / checkpoint.name, state)


def summarize_seeds(per_seed: list[dict]) -> dict[str, Any]:
    """{model: {group: {metric: {"mean", "spread", "values"}}}} over seeds."""
    summary: dict[str, Any] = {}
    for model in per_seed[0]:
        summary[model] = {}
        for group in [g for g in GROUPS if g in per_seed[0][model]]:
            summary[model][group] = {}
            for metric in METRICS:
                values = [seed[model][group][metric] for seed in per_seed]
                summary[model][group][metric] = {
                    "mean": statistics.fmean(values),
                    "spread": max(values) - min(values),
                    "values": values,
                }
    return summary


def format_table(name: str, summary: dict[str, Any], seeds: int) -> Iterator[str]:
    yield f"{name}: mean over {seeds} seed(s) (spread = max - min); test split of the shared data"
    shown = [g for g in GROUPS if g in next(iter(summary.values()))]
    for metric in METRICS:
        yield f"{metric:<16}" + "".join(f"{g:>17}" for g in shown)
        for model, groups in summary.items():
            cells = [groups[g][metric] for g in shown]
            yield f"  {model:<14}" + "".join(
                f"{c['mean']:>10.4f} ({c['spread']:.3f})" for c in cells
            )


def _groups(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    found = {
        "overall": result["overall"],
        **result["by_dataset"],
        **result["by_daynight"],
    }
    return {g: {m: found[g][m] for m in METRICS} for g in GROUPS if g in found}


def _mean_of(tables: list[dict]) -> dict[str, dict[str, float]]:
    return {
        group: {m: statistics.fmean(t[group][m] for t in tables) for m in METRICS}
        for group in tables[0]
    }


def _one_line(table: dict) -> str:
    return ", ".join(
        f"{model} SSIM {groups['overall']['ssim']:.4f}" for model, groups in table.items()
    )


def _split(dataset: str, stem: str) -> str:
    fraction = int(hashlib.sha256(f"{dataset}/{stem}".encode()).hexdigest()[:8], 16) / 2**32
    if fraction < SPLIT[0]:
        return "train"
    return "val" if fraction < SPLIT[0] + SPLIT[1] else "test"


# The detail measures each set against SSIM, and each one's cost (lower is better): GMSD and
# the LBP distance as they are, the edge ratio as its distance from 1 (log: 0.5 as far off
# as 2).
DETAIL_COSTS = {
    "gmsd": lambda value: value,
    "edge_ratio": lambda value: abs(math.log(value)),
    "lbp_distance": lambda value: value,
}


@dataclass(frozen=True)
class FrontierPoint:
    label: str
    scores: dict[str, float]  # ssim and the DETAIL_COSTS measures -> mean over seeds
    spreads: dict[str, float]  # the same measures -> max - min over seeds


def frontier_points(results: list, group: str = "overall") -> list[FrontierPoint]:
    """The points of `bench quality` result files (quality-seeds*.json): each run's model
    and plain G ("raw"), labelled by the run's folder (the `--out` of `bench quality`), and
    RGB luma once."""
    points, luma = [], None
    for path in dict.fromkeys(Path(p).resolve() for p in results):  # each file once
        summary = json.loads(path.read_text())
        run = path.parent.parent.name
        for model, suffix in (("model", ""), ("model-raw", " raw")):
            if model in summary:
                points.append(_point(run + suffix, summary[model], group))
        if luma is None and "rgb-luma" in summary:
            luma = _point("RGB luma", summary["rgb-luma"], group)
    return points + ([luma] if luma else [])


def _point(label: str, groups: dict[str, Any], group: str) -> FrontierPoint:
    if group not in groups:
        raise ValueError(f"{label}: no {group!r} scores (it has {sorted(groups)})")
    measures = ("ssim", *DETAIL_COSTS)
    cells = groups[group]
    return FrontierPoint(
        label, {m: cells[m]["mean"] for m in measures}, {m: cells[m]["spread"] for m in measures}
    )


def dominates(a: FrontierPoint, b: FrontierPoint, detail: str) -> bool:
    """a is at least as good as b on SSIM and on `detail`, and better on one of them."""
    cost = DETAIL_COSTS[detail]
    pairs = [(-a.scores["ssim"], -b.scores["ssim"]),
             (cost(a.scores[detail]), cost(b.scores[detail]))]  # fmt: skip
    return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)


def pareto_front(points: list[FrontierPoint], detail: str) -> list[FrontierPoint]:
    """The points no other beats on both SSIM and `detail`: between these, only the choice
    of an operating point (SSIM against detail) decides; the others are simply worse."""
    return [p for p in points if not any(dominates(q, p, detail) for q in points)]


def frontier(results: list, out: str | Path, group: str = "overall") -> Iterator[str]:
    """A table of the runs' points, best SSIM first, each marked with the SSIM-detail
    fronts it is on (g: GMSD, e: edge ratio, l: LBP distance), and `out`: SSIM against
    each detail measure, the fronts in red and labelled."""
    points = frontier_points(results, group)
    fronts = {detail: pareto_front(points, detail) for detail in DETAIL_COSTS}
    measures = ("ssim", *DETAIL_COSTS)
    yield (f"{group}: {len(points)} points; on the SSIM-detail front for g: GMSD, "
           "e: edge ratio (distance from 1), l: LBP distance; spread in brackets")  # fmt: skip
    yield f"  {'':<32}" + "".join(f"{m:>19}" for m in measures) + "  front"
    for point in sorted(points, key=lambda p: -p.scores["ssim"]):
        cells = "".join(f"{point.scores[m]:>11.3f} ({point.spreads[m]:.3f})" for m in measures)
        marks = "".join(d[0] if point in front else "." for d, front in fronts.items())
        yield f"  {point.label:<32}{cells}  {marks}"
    plot_frontier(points, fronts, Path(out), group)
    yield f"wrote {out}"


def plot_frontier(
    points: list[FrontierPoint], fronts: dict[str, list[FrontierPoint]], out: Path, group: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(fronts), figsize=(6 * len(fronts), 5.5), dpi=100)
    for ax, (detail, front) in zip(axes, fronts.items(), strict=True):
        for point in points:
            luma = point.label == "RGB luma"
            ax.errorbar(
                point.scores["ssim"], point.scores[detail],
                xerr=point.spreads["ssim"] / 2, yerr=point.spreads[detail] / 2,
                fmt="*" if luma else "o", color="tab:red" if point in front else "tab:gray",
                ms=10 if luma else 5, elinewidth=0.6,
            )  # fmt: skip
            if point in front:  # the others are in the table; their labels would crowd
                ax.annotate(point.label, (point.scores["ssim"], point.scores[detail]),
                            fontsize=7, xytext=(3, 2), textcoords="offset points")  # fmt: skip
        line = sorted(front, key=lambda p: p.scores["ssim"])
        ax.plot([p.scores["ssim"] for p in line], [p.scores[detail] for p in line],
                color="tab:red", lw=0.8, alpha=0.6)  # fmt: skip
        if detail == "edge_ratio":
            ax.axhline(1.0, color="tab:green", lw=1, ls="--", label="as sharp as the real TIR")
            ax.legend(fontsize=8, loc="upper right")
        better = "closer to 1" if detail == "edge_ratio" else "lower is better"
        ax.set(xlabel="SSIM (higher is better)", ylabel=f"{detail} ({better})",
               title=f"{group}: SSIM against {detail}")  # fmt: skip
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    out.parent.mkdir(parents=True, exist_ok=True)
    with shards.atomic_output(out) as handle:
        handle.write(buffer.getvalue())
