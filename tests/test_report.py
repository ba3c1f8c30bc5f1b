import html
import json
import shutil
import subprocess
from pathlib import Path

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
