import html
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tirsynth import evaluate, generate
from tirsynth.cli import cli
from tirsynth.config import EvaluateConfig, GenerateConfig
from tirsynth.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def render_in_chromium(page: Path, screenshot: Path | None = None) -> dict:
    """Open `page` in headless Chromium; return the page's own check of its tables, images
    and script errors (RENDER_CHECK in tirsynth/report.py)."""
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--virtual-time-budget=5000",
    ]
    dom = subprocess.run(
        [*flags, "--dump-dom", page.resolve().as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    if screenshot is not None:
        subprocess.run(
            [
                *flags,
                "--window-size=1280,2000",
                f"--screenshot={screenshot}",
                page.resolve().as_uri(),
            ],
            capture_output=True,
            timeout=120,
        )
    marker = 'data-render-check="'
    assert marker in dom, f"the page did not finish loading: {dom[:500]}"
    start = dom.index(marker) + len(marker)
    return json.loads(html.unescape(dom[start : dom.index('"', start)]))


@pytest.fixture
def runs(tmp_path, learnable_shards, tiny_checkpoint, ray_session) -> dict[str, Path]:
    """A train run (the tiny checkpoint's), an evaluate run and a generate run on pair shards."""
    evaluated = evaluate.run(
        EvaluateConfig(
            data=str(learnable_shards),
            split="val",
            out=str(tmp_path / "ev"),
            checkpoint=str(tiny_checkpoint),
        ),
        progress=False,
    )
    generated = generate.run(
        GenerateConfig(
            input=str(learnable_shards),
            split="val",
            out=str(tmp_path / "gen"),
            checkpoint=str(tiny_checkpoint),
        ),
        progress=False,
    )
    return {
        "train": tiny_checkpoint.parent.parent,
        "evaluate": evaluated.out,
        "generate": generated.out,
    }


def test_reports_render_in_headless_chromium(runs, tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (make test installs Debian's package as root)")
    for stage, run_dir in runs.items():
        page = run_dir / "report.html"
        text = page.read_text()
        assert "http://" not in text and "https://" not in text  # self-contained, offline
        check = render_in_chromium(page, tmp_path / f"{stage}.png")
        assert check["errors"] == [], (stage, check)
        assert check["broken"] == 0 and check["images"] >= 3 and check["tables"] >= 2, (
            stage,
            check,
        )
        assert (tmp_path / f"{stage}.png").stat().st_size > 10_000


def test_report_contents_and_rebuild(runs):
    train_page = (runs["train"] / "report.html").read_text()
    assert "Validation" in train_page and "Losses" in train_page and "Sample grids" in train_page
    generate_page = (runs["generate"] / "report.html").read_text()
    assert "worst and best by ssim" in generate_page and "Rejects" in generate_page
    evaluate_page = (runs["evaluate"] / "report.html").read_text()
    assert "inverted-luma" in evaluate_page and "By day/night" in evaluate_page
    (runs["evaluate"] / "report.html").unlink()
    result = CliRunner().invoke(cli, ["report", str(runs["evaluate"])])
    assert result.exit_code == 0 and (runs["evaluate"] / "report.html").exists()
    missing = CliRunner().invoke(cli, ["report", str(runs["evaluate"] / "grids")])
    assert missing.exit_code == 1 and "report.json" in missing.output


def test_write_report_refuses_unknown_stage(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"stage": "nope"}))
    with pytest.raises(ValueError, match="unknown stage"):
        write_report(tmp_path)


@pytest.mark.parametrize(
    "values",
    [[], [0.5], [0.5, 0.5], [0.5, 0.5 + 1e-16], [0.3, 0.3 + 5e-17, 0.3], [float("nan"), 1.0],
     [float("nan")], [float("inf"), -2.0, 7e9, 7e9 + 1e-6]],
)  # fmt: skip
def test_histograms_draw_any_data(values):
    from tirsynth.report import _plot_hist, hist_bins

    finite, edges = hist_bins(values)
    assert len(edges) >= 2 and np.all(np.diff(edges) > 0)
    assert np.all((finite >= edges[0]) & (finite <= edges[-1]))
    assert _plot_hist({"": values}, "ssim").startswith("data:image/png;base64,")


def test_a_run_is_never_lost_to_its_report(tmp_path, tiny_checkpoint, ray_session, monkeypatch):
    """Drawing fails: the data are complete and exportable, a no-op rerun keeps the run's
    report.json (series and throughput), and `tirsynth report` draws the page later."""
    from conftest import SAMPLE

    from tirsynth import export, report

    out = tmp_path / "out"
    cfg = GenerateConfig(
        input=str(SAMPLE / "roadscene" / "crop_LR_visible"), out=str(out),
        checkpoint=str(tiny_checkpoint), batch_size=4, shard_size=2,
    )  # fmt: skip

    def broken(*args):
        raise ValueError("Too many bins for data range")

    with monkeypatch.context() as patch:
        patch.setattr(report, "_generate", broken)
        result = generate.run(cfg, progress=False)
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    assert not (out / "report.html").exists()
    assert export.run(out, tmp_path / "files", progress=False).images == result.total == 8
    first = (out / "report.json").read_text()
    assert json.loads(first)["batches"]
    again = generate.run(cfg, progress=False)  # nothing to do
    assert again.generated == 0 and (out / "report.json").read_text() == first
    assert (out / "report.html").is_file()  # drawn by the rerun that found it missing
    (out / "report.html").unlink()
    assert CliRunner().invoke(cli, ["report", str(out)]).exit_code == 0
    assert (out / "report.html").is_file()
