"""A run folder's report.json (plus its logs, index and grids) in; a self-contained report.html out.

One page per run of train, generate or evaluate: what ran, the metrics tables, plots and
sample grids embedded as data URIs (it opens offline), and the rejects by reason.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tirsynth import metrics, shards, video
from tirsynth.quality import write_image_grid
from tirsynth.shards import atomic_output

REPORT_JSON, REPORT_HTML = "report.json", "report.html"
GRID_ROWS = 4
STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0 1rem}td,th{border:1px solid #ccc;padding:.25rem .6rem;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee}img.small{width:480px;image-rendering:pixelated}
.meta td{text-align:left}.note{color:#666;font-size:.9rem}
figure{margin:1rem 0}figcaption{color:#555;font-size:.9rem}
"""
# Records in the page whether its tables and images rendered, for headless checks.
RENDER_CHECK = """<script>
window.__errors=[];window.addEventListener('error',e=>window.__errors.push(String(e.message||e)));
window.addEventListener('load',()=>{const imgs=[...document.images];
document.body.setAttribute('data-render-check',JSON.stringify({tables:document.querySelectorAll(
'table').length,images:imgs.length,broken:imgs.filter(i=>!(i.complete&&i.naturalWidth>0)).length,
errors:window.__errors}));});
</script>"""


def write_report(run_dir: str | Path) -> Path:
    """Build `run_dir/report.html` from `run_dir/report.json` and the run's other files."""
    run_dir = Path(run_dir)
    path = run_dir / REPORT_JSON
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a tirsynth run folder?")
    report = json.loads(path.read_text())
    renderers = {"train": _train, "generate": _generate, "evaluate": _evaluate}
    if report.get("stage") not in renderers:
        raise ValueError(f"{path}: unknown stage {report.get('stage')!r}")
    title = f"tirsynth {report['stage']}: {run_dir.resolve().name}"
    body = [
        f"<h1>{_e(title)}</h1>",
        _what_ran(report),
        *renderers[report["stage"]](run_dir, report),
    ]
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}{RENDER_CHECK}</body></html>"
    )
    with atomic_output(run_dir / REPORT_HTML, durable=False) as handle:
        handle.write(page.encode())
    return run_dir / REPORT_HTML


def write_report_or_warn(run_dir: str | Path) -> Path | None:
    """`write_report`, for the end of a run whose data are already complete: a failure
    while drawing is printed in one line and the run still finishes (`tirsynth report`
    draws it again later), so no run is ever lost to its report."""
    try:
        return write_report(run_dir)
    except Exception as error:  # noqa: BLE001 - any drawing failure, the data are safe
        print(
            f"warning: could not draw {Path(run_dir) / REPORT_HTML} ({type(error).__name__}: "
            f"{error}); the run's data are complete; `tirsynth report {run_dir}` draws it again",
            file=sys.stderr,
        )
        return None


def write_overview(target: Path, outputs: dict[str, Path]) -> Path:
    """`target` (an HTML file or a folder for report.html): one row per pipeline stage with
    its headline numbers and a link to its own report."""
    target = target / REPORT_HTML if target.suffix != ".html" else target
    target.parent.mkdir(parents=True, exist_ok=True)
    rows, details = [], []
    for name, folder in outputs.items():
        report_json = folder / REPORT_JSON
        report = json.loads(report_json.read_text()) if report_json.exists() else {}
        link = folder / REPORT_HTML
        href = os.path.relpath(link, target.parent) if link.exists() else ""
        anchor = f"<a href='{_e(href)}'>{_e(name)}</a>" if href else _e(name)
        rows.append((anchor, report.get("stage", "ingest"), _headline(folder, report)))
        if report.get("stage") == "evaluate":
            header = ["model", "SSIM", "PSNR", "SSIM day", "SSIM night"]
            table = [
                (
                    m,
                    r["overall"].get("ssim"),
                    r["overall"].get("psnr"),
                    r["by_daynight"].get("day", {}).get("ssim"),
                    r["by_daynight"].get("night", {}).get("ssim"),
                )
                for m, r in report["results"].items()
            ]
            details.append(
                f"<h2>{_e(name)}: {_e(report['split'])} split</h2>" + _table(header, table)
            )
    table = "<table><thead><tr><th>stage</th><th>kind</th><th>result</th></tr></thead><tbody>"
    table += "".join(f"<tr><td>{a}</td><td>{_e(k)}</td><td>{_e(h)}</td></tr>" for a, k, h in rows)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>tirsynth pipeline</title>"
        f"<style>{STYLE}</style></head><body><h1>tirsynth pipeline: {_e(target.parent.name)}"
        f"</h1>{table}</tbody></table>{''.join(details)}{RENDER_CHECK}</body></html>"
    )
    with atomic_output(target, durable=False) as handle:
        handle.write(page.encode())
    return target


def _headline(folder: Path, report: dict) -> str:
    stage = report.get("stage")
    if stage == "train":
        best = report.get("best_ssim")
        best = f", best val SSIM {best:.4f}" if isinstance(best, float) and best > -1 else ""
        return f"{report['step']} steps ({report['epoch']} epochs){best}"
    if stage == "generate":
        return f"{report['outputs']} TIR images, {report['rejects']} rejects"
    if stage == "evaluate":
        first = next(iter(report["results"].items()))
        return f"{first[0]}: SSIM {first[1]['overall']['ssim']:.4f}"
    summary = shards.summarize(folder) if (folder / shards.INDEX).exists() else None
    return f"{summary['pairs']} pairs {summary['by_split']}" if summary else ""


def _what_ran(report: dict) -> str:
    keys = (
        "command",
        "step",
        "epoch",
        "best_ssim",
        "best_checkpoint",
        "workers",
        "checkpoint",
        "data",
        "input",
        "split",
        "tirsynth",
        "torch",
        "seconds",
        "samples_per_s",
        "images_per_s",
        "steady_images_per_s",
    )
    rows = [(k, report[k]) for k in keys if report.get(k) not in (None, "")]
    options = report.get("config") or report.get("options")
    parts = ["<h2>What ran</h2>", _table(["", "value"], rows, cls="meta")]
    if options:
        parts.append(
            f"<details><summary>configuration</summary><pre>{_e(json.dumps(options, indent=2))}"
            "</pre></details>"
        )
    return "".join(parts)


# ---- train -------------------------------------------------------------------------------


def _train(run_dir: Path, report: dict) -> list[str]:
    records = (
        [
            json.loads(line)
            for line in (run_dir / "stats.jsonl").read_text().splitlines()
            if line.strip()
        ]
        if (run_dir / "stats.jsonl").exists()
        else []
    )
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    parts = ["<h2>Validation</h2>"]
    if val:
        header = ["step", "epoch", "SSIM", "PSNR", "GMSD", "edge ratio", "LBP real", "LBP fake",
                  "SSIM day", "SSIM night"]  # fmt: skip
        rows = [
            (
                r["step"],
                f"{r['epoch']:.2f}",
                r["ssim"],
                r["psnr"],
                r.get("gmsd"),
                r.get("edge_ratio"),
                r["lbp_real"],
                r["lbp_fake"],
                r["by_daynight"].get("day", {}).get("ssim"),
                r["by_daynight"].get("night", {}).get("ssim"),
            )
            for r in val
        ]
        parts.append(_table(header, rows))
        last = val[-1]
        groups = [
            (f"{field} {name}", values)
            for field in ("daynight", "dataset")
            for name, values in last.get(f"by_{field}", {}).items()
        ]
        header = ["group", "images", "SSIM", "PSNR", "LBP real", "LBP fake"]
        rows = [
            (g, v["samples"], v["ssim"], v["psnr"], v["lbp_real"], v["lbp_fake"]) for g, v in groups
        ]
        parts += [
            f"<h3>Last validation (step {last['step']}) by day/night and dataset</h3>",
            _table(header, rows),
        ]
        parts.append(
            _figure(
                _plot_lines(
                    {
                        "SSIM": ([r["step"] for r in val], [r["ssim"] for r in val]),
                        **{
                            f"SSIM {g}": (
                                [r["step"] for r in val if g in r["by_daynight"]],
                                [r["by_daynight"][g]["ssim"] for r in val if g in r["by_daynight"]],
                            )
                            for g in ("day", "night")
                        },
                    },
                    "step",
                    "val SSIM",
                ),
                "Validation SSIM over training, overall and by day/night",
            )
        )
        parts.append(
            _figure(
                _plot_lines(
                    {"PSNR": ([r["step"] for r in val], [r["psnr"] for r in val])},
                    "step",
                    "val PSNR (dB)",
                ),
                "Validation PSNR over training",
            )
        )
    else:
        parts.append("<p class='note'>No validation split: no validation records.</p>")
    if train:
        parts.append("<h2>Losses</h2>")
        steps = [r["step"] for r in train]
        g_terms = [k for k in ("g", "g_gan", "g_l1", "g_gradient", "g_intensity") if k in train[0]]
        parts.append(
            _figure(
                _plot_lines(
                    {k: (steps, [r[k] for r in train]) for k in g_terms},
                    "step",
                    "generator loss terms",
                    log=True,
                ),
                "Generator loss and its weighted terms (log scale)",
            )
        )
        parts.append(
            _figure(
                _plot_lines({"D": (steps, [r["d"] for r in train])}, "step", "D loss"),
                "Discriminator loss",
            )
        )
        rate = [r["samples_per_s"] for r in train[1:]] or [train[0]["samples_per_s"]]
        parts.append(f"<p>Throughput: median {np.median(rate):.2f} samples/s.</p>")
    samples = sorted((run_dir / "samples").glob("step_*.png"))
    if samples:
        parts.append("<h2>Sample grids (RGB | real TIR | generated, val split)</h2>")
        for path in [samples[0], samples[-1]] if len(samples) > 1 else samples:
            caption = f"after {path.stem.replace('_', ' ')}"
            parts.append(_figure(_data_uri(path.read_bytes()), caption, cls="small"))
    return parts


# ---- generate ----------------------------------------------------------------------------


def _generate(run_dir: Path, report: dict) -> list[str]:
    # Arrow columns, not rows: the index of a million outputs is a few floats per output.
    index = shards.read_arrow(
        run_dir / shards.INDEX, ["key", "shard", "source", *metrics.QUALITY_FIELDS]
    )
    values = {
        n: index[n].drop_null().to_numpy()
        for n in metrics.QUALITY_FIELDS
        if n in index.column_names and index[n].null_count < len(index)
    }
    parts = [
        "<h2>Quality</h2>",
        f"<p>{report['outputs']} outputs ({report['generated_this_run']} in the last run), "
        f"{report['rejects']} rejects.</p>",
        _table(["metric", "mean", "min", "max"], [(n, *_stats(v)) for n, v in values.items()]),
    ]
    batches = report.get("batches") or []
    if batches:
        series = {
            n: ([b["batch"] for b in batches], [b.get(n) for b in batches])
            for n in values
            if any(b.get(n) is not None for b in batches)
        }
        parts.append(
            _figure(
                _plot_lines(series, "batch", "mean per batch"), "Quality per batch over the run"
            )
        )
    for n, column in values.items():
        parts.append(_figure(_plot_hist({"": column}, n), f"Distribution of {n} per image"))
    parts += _temporal(run_dir)
    parts += _generate_grids(run_dir, report, index)
    parts.append(_rejects(shards.read_rejects(run_dir)))
    return parts


TEMPORAL_PLOTS = 12  # sequences drawn; the table lists every sequence


def temporal_by_sequence(run_dir: Path, steps: pa.Table | None = None) -> list[dict[str, Any]]:
    """Per sequence of a generate run: frames, the mean frame-to-frame change of the output
    and of the input's luma (grey levels, model scale), and their ratio (the flicker ratio
    against the input: 1 changes as much as the input does). Most flickering first.
    `steps`: `temporal_steps(run_dir)`, when the caller has read it already."""
    index = temporal_steps(run_dir) if steps is None else steps
    if not len(index):
        return []
    table = index.group_by("sequence").aggregate(
        [("frame", "count"), ("output_change", "mean"), ("input_change", "mean")]
    )
    rows = []
    for row in table.to_pylist():
        output, inputs = row["output_change_mean"], row["input_change_mean"]
        rows.append({
            "sequence": row["sequence"],
            "steps": row["frame_count"],
            "output_change": output,
            "input_change": inputs,
            "flicker_ratio": output / inputs if inputs else None,
        })  # fmt: skip
    return sorted(rows, key=lambda r: -(r["flicker_ratio"] or 0.0))


def temporal_steps(run_dir: Path) -> pa.Table:
    """The index rows of a generate run that measured a frame-to-frame change: sequence,
    frame, output_change, input_change (no rows for a run without sequences)."""
    columns = ["sequence", "frame", "output_change", "input_change"]
    index = shards.read_arrow(run_dir / shards.INDEX, columns)
    if not set(columns) <= set(index.column_names):
        return pa.table({name: pa.array([], pa.float64()) for name in columns})
    return index.filter(pc.is_valid(index["output_change"]))


def _temporal(run_dir: Path) -> list[str]:
    index = temporal_steps(run_dir)
    sequences = temporal_by_sequence(run_dir, index)
    if not sequences:
        return []
    parts = [
        "<h2>Temporal stability</h2>",
        "<p>Per sequence, the mean absolute change from one frame to the next, of the output "
        "and of the input's luma, at the model's scale (grey levels). The flicker ratio is "
        "the first over the second: above 1 the output changes more than its input, which a "
        "tracker trained on it learns as noise.</p>",
        _table(
            ["sequence", "frame steps", "output change", "input change", "flicker ratio"],
            [
                (
                    r["sequence"],
                    r["steps"],
                    r["output_change"],
                    r["input_change"],
                    r["flicker_ratio"],
                )
                for r in sequences
            ],
        ),  # fmt: skip
    ]
    for row in sequences[:TEMPORAL_PLOTS]:
        rows = index.filter(pc.equal(index["sequence"], row["sequence"])).sort_by("frame")
        frames = rows["frame"].to_pylist()
        series = {
            "output": (frames, rows["output_change"].to_pylist()),
            "input luma": (frames, rows["input_change"].to_pylist()),
        }
        caption = f"{row['sequence']}: change from the previous frame"
        parts.append(_figure(_plot_lines(series, "frame", "mean |change|"), caption))
    if len(sequences) > TEMPORAL_PLOTS:
        parts.append(f"<p>Plots for the {TEMPORAL_PLOTS} sequences that flicker most.</p>")
    return parts


def _generate_grids(run_dir: Path, report: dict, index: pa.Table) -> list[str]:
    if not len(index):
        return []
    rank_by = (
        "ssim"
        if "ssim" in index.column_names and index["ssim"].null_count < len(index)
        else "structure"
    )
    scores = pa.table({"s": pc.fill_null(index[rank_by], 0.0)})
    order = {
        "worst": pc.select_k_unstable(scores, GRID_ROWS, [("s", "ascending")]),
        "best": pc.select_k_unstable(scores, GRID_ROWS, [("s", "descending")]),
    }
    chosen = {
        title: _sorted_rows(index, rows, rank_by, title == "best") for title, rows in order.items()
    }
    picks = random.Random(0).sample(range(len(index)), min(GRID_ROWS, len(index)))
    chosen["random"] = index.take(picks).to_pylist()
    parts = [
        f"<h2>Sample grids (RGB | generated TIR | real TIR when there is one), "
        f"worst and best by {rank_by}</h2>"
    ]
    cells = _grid_cells(
        run_dir,
        Path(report.get("input", ".")),
        list({r["key"]: r for rows in chosen.values() for r in rows}.values()),
    )
    for title, rows in chosen.items():
        path = write_image_grid([cells[r["key"]] for r in rows], run_dir / "grids" / f"{title}.png")
        caption = f"{title}: " + ", ".join(f"{r['key']} ({r.get(rank_by) or 0:.3f})" for r in rows)
        parts.append(_figure(_data_uri(path.read_bytes()), caption))
    return parts


def _sorted_rows(
    index: pa.Table, positions: pa.Array, rank_by: str, descending: bool
) -> list[dict]:
    rows = index.take(positions).to_pylist()
    return sorted(rows, key=lambda r: r.get(rank_by) or 0.0, reverse=descending)


def _grid_cells(run_dir: Path, input_root: Path, rows: list[dict]) -> dict[str, list]:
    """key -> [RGB, generated TIR, real TIR when there is one], reading each shard once."""
    from PIL import Image, ImageOps

    generated = _members(run_dir, {(r["shard"], r["key"]) for r in rows})
    pairs = {}  # pair-shard input: "shard:key" sources hold the RGB and the real TIR
    pair_sources = {tuple(r["source"].split(":", 1)) for r in rows if ".tar:" in r["source"]}
    if pair_sources:
        pairs = _members(input_root, pair_sources)
    cells = {}
    for row in rows:
        tir = np.asarray(Image.open(io.BytesIO(generated[row["key"]]["tir.png"])))
        pair = pairs.get(row["source"].partition(":")[2]) if ".tar:" in row["source"] else None
        if pair is not None:
            rgb_bytes = next(v for k, v in pair.items() if k.startswith("rgb."))
            real = shards.decode_tir_8bit(next(v for k, v in pair.items() if k.startswith("tir.")))
        elif video.parse_frame_path(row["source"]) is not None:
            rgb_bytes, real = video.read_frame(row["source"], "rgb").data, None
        else:
            rgb_bytes, real = Path(row["source"]).read_bytes(), None
        rgb = ImageOps.exif_transpose(Image.open(io.BytesIO(rgb_bytes))).convert("RGB")
        cells[row["key"]] = [np.asarray(rgb), tir] + ([real] if real is not None else [])
    return cells


def _members(root: Path, wanted: set[tuple[str, str]]) -> dict[str, dict]:
    """The samples (shard, key) in `wanted`, by key, reading only their members."""
    found = {}
    for shard in sorted({shard for shard, _ in wanted}):
        found.update(shards.read_samples(root / shard, {key for s, key in wanted if s == shard}))
    return found


# ---- evaluate ----------------------------------------------------------------------------


def _evaluate(run_dir: Path, report: dict) -> list[str]:
    results, models = report["results"], report["models"]
    parts = [f"<h2>Results on the {_e(report['split'])} split ({report['samples']} images)</h2>"]
    header = ["model", "kind", "skips", "step", "images", "SSIM", "PSNR", "GMSD (lower: better)",
              "edge ratio (1: as sharp)", "LBP distance", "LBP real", "LBP fake"]  # fmt: skip
    rows = [
        (
            m["name"],
            m["kind"],
            m.get("skips", ""),
            m.get("step", ""),
            *(
                results[m["name"]]["overall"].get(k)
                for k in (
                    "images",
                    "ssim",
                    "psnr",
                    "gmsd",
                    "edge_ratio",
                    "lbp_distance",
                    "lbp_real",
                    "lbp_fake",
                )
            ),  # fmt: skip
        )
        for m in models
    ]
    parts.append(_table(header, rows))
    parts.append(
        "<p>Each metric is taken per image at its own size against its real TIR. SSIM and "
        "PSNR reward a blurred average; GMSD, the edge ratio and the LBP-histogram distance "
        "see detail. Mean LBP is listed for the paper's tables only (flat regions raise it). "
        "Look at the grids below at native resolution before trusting any one number.</p>"
    )
    for field, title in (("by_daynight", "day/night"), ("by_dataset", "dataset")):
        groups = sorted({g for r in results.values() for g in r[field]})
        header = ["model", *(f"{g} {m}" for g in groups for m in ("SSIM", "PSNR"))]
        rows = [
            (name, *(r[field].get(g, {}).get(m) for g in groups for m in ("ssim", "psnr")))
            for name, r in results.items()
        ]
        parts += [f"<h3>By {title}</h3>", _table(header, rows)]
    per_image = shards.read_table(run_dir / "evaluation.parquet")
    for metric in ("ssim", "psnr"):
        series = {
            m["name"]: [
                r[metric] for r in per_image if r["model"] == m["name"] and np.isfinite(r[metric])
            ]
            for m in models
        }
        parts.append(
            _figure(
                _plot_box(series, metric.upper()),
                f"Distribution of per-image {metric.upper()} by model",
            )
        )
    groups = sorted({g for r in results.values() for g in r["by_daynight"]})
    parts.append(
        _figure(
            _plot_bars(
                {
                    name: [r["by_daynight"].get(g, {}).get("ssim") for g in groups]
                    for name, r in results.items()
                },
                groups,
                "SSIM",
            ),
            "SSIM by day/night and model",
        )
    )
    curves = {name: curve for name, curve in (report.get("curves") or {}).items() if curve}
    if curves:
        parts.append("<h2>Validation by epoch (as the paper's Figures 6 and 7)</h2>")
        for metric in ("psnr", "ssim"):
            epochs = sorted({round(p["epoch"], 2) for c in curves.values() for p in c})
            values = {
                name: [
                    next((p[metric] for p in c if round(p["epoch"], 2) == e), None) for e in epochs
                ]
                for name, c in curves.items()
            }
            parts.append(
                _figure(
                    _plot_bars(values, [f"epoch {e:g}" for e in epochs], metric.upper()),
                    f"val {metric.upper()} at the end of each epoch, per model",
                )
            )
    if report.get("temporal"):
        parts += _evaluate_temporal(report["temporal"])
    if report.get("paper"):
        parts.append(_paper_tables(report["paper"], results))
    grids = report.get("grids") or {}
    if grids:
        first = next(iter(grids.values()))
        parts.append(f"<h2>Sample grids ({' | '.join(_e(c) for c in first['columns'])})</h2>")
        for title, grid in grids.items():
            data = (run_dir / grid["path"]).read_bytes()
            caption = f"{title} by SSIM of {models[0]['name']}: " + ", ".join(
                f"{k} ({s})" for k, s in zip(grid["keys"], grid["ssim"], strict=True)
            )
            parts.append(_figure(_data_uri(data), caption))
    return parts


def _evaluate_temporal(temporal: dict[str, dict]) -> list[str]:
    """Flicker ratio and temporal error per model and clip (video pairs only)."""
    header = ["model", "clip", "frames", "stride", "flicker ratio", "temporal error"]
    rows = []
    for name, scores in temporal.items():
        for clip, s in scores["clips"].items():
            rows.append((name, clip, s["frames"], s["stride"], s["flicker_ratio"],
                         s["temporal_error"]))  # fmt: skip
        if scores["overall"]:
            o = scores["overall"]
            rows.append((name, "all clips", o["frame_steps"], "", o["flicker_ratio"],
                         o["temporal_error"]))  # fmt: skip
    return [
        "<h2>Temporal stability on video pairs</h2>",
        "<p>Between a clip's consecutive test frames (the ingest's frame stride apart): the "
        "flicker ratio is the output's mean absolute change over the real TIR's (1 is the "
        "real amount); the temporal error is the mean absolute difference between the two "
        "changes, in grey levels.</p>",
        _table(header, rows),
    ]


def _paper_tables(paper: dict, results: dict) -> str:
    ours = {name: r for name, r in results.items()}
    rows2 = [(name, *values) for name, values in paper["table2"].items()]
    rows4 = [
        (name, g, *paper["table4"][name][g]) for name in paper["table4"] for g in ("day", "night")
    ]
    ours_rows = [
        (name, g, r["by_daynight"].get(g, {}).get("ssim"), r["by_daynight"].get(g, {}).get("psnr"))
        for name, r in ours.items()
        for g in ("day", "night")
    ]
    return (
        "<h2>The paper's numbers beside ours</h2>"
        f"<p class='note'>{_e(paper['source'])}. The paper trained and tested on KAIST; ours "
        "are measured on the data given here, so compare the ordering of models rather "
        "than the absolute values.</p><h3>Paper, Table 2</h3>"
        + _table(["skips", "SSIM", "PSNR"], rows2)
        + "<h3>Paper, Table 4</h3>"
        + _table(["model", "", "SSIM", "PSNR"], rows4)
        + "<h3>Ours, by day/night</h3>"
        + _table(["model", "", "SSIM", "PSNR"], ours_rows)
    )


# ---- building blocks ---------------------------------------------------------------------


def _rejects(rejects: list[dict]) -> str:
    if not rejects:
        return "<h2>Rejects</h2><p>None.</p>"
    rows = shards.rejects_by_reason(rejects).most_common()
    return "<h2>Rejects by reason</h2>" + _table(["reason", "count"], rows)


def _table(header: list[str], rows: list, cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{_e(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(uri: str, caption: str, cls: str = "") -> str:
    alt = _e(caption)
    image = f"<img class='{cls}' src='{uri}' alt='{alt}'>"
    return f"<figure>{image}<figcaption>{alt}</figcaption></figure>"


def _plot_lines(series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, log: bool = False):
    fig, ax = _axes()
    for name, (xs, ys) in series.items():
        points = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
        if points:
            ax.plot(
                *zip(*points, strict=True),
                marker="o" if len(points) < 30 else None,
                markersize=3,
                label=name,
            )
    if log:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _png(fig)


def _plot_hist(series: dict[str, list[float]], xlabel: str):
    fig, ax = _axes()
    for name, values in series.items():
        ax.hist(*hist_bins(values), alpha=0.7, label=name or None)
    ax.set(xlabel=xlabel, ylabel="images")
    return _png(fig)


def hist_bins(values) -> tuple[np.ndarray, np.ndarray]:
    """(finite values, bin edges) for any data: none, one, equal values or values a
    rounding error apart (where numpy's own edges would fail) get one bin of a visible
    width around them."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if not len(finite):
        return finite, np.array([0.0, 1.0])
    low, high = float(finite.min()), float(finite.max())
    bins = min(40, max(5, len(finite) // 2))
    if high - low <= 1e-9 * max(1.0, abs(low), abs(high)) * bins:
        half = max(1e-3 * abs(low), 1e-6)
        return finite, np.array([low - half, high + half])
    return finite, np.linspace(low, high, bins + 1)


def _plot_box(series: dict[str, list[float]], ylabel: str):
    fig, ax = _axes()
    names = [n for n, v in series.items() if v]
    ax.boxplot([series[n] for n in names], tick_labels=names)
    ax.set(ylabel=ylabel)
    ax.tick_params(axis="x", labelrotation=20)
    return _png(fig)


def _plot_bars(values: dict[str, list[float | None]], groups: list[str], ylabel: str):
    fig, ax = _axes()
    width = 0.8 / max(1, len(values))
    for i, (name, ys) in enumerate(values.items()):
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(xs, [y if y is not None else 0 for y in ys], width, label=name)
    ax.set_xticks([g + width * (len(values) - 1) / 2 for g in range(len(groups))], groups)
    ax.set(ylabel=ylabel)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _png(fig)


def _axes():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=100)
    ax.grid(alpha=0.3)
    return fig, ax


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return _data_uri(buffer.getvalue())


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _stats(values) -> tuple:
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if not len(finite):
        return (None,) * 3
    return float(np.mean(finite)), float(np.min(finite)), float(np.max(finite))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _e(text: Any) -> str:
    return html.escape(str(text))
