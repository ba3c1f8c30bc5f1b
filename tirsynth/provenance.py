"""Where a measurement came from: the command, the commit, the date and the machine.

Timings go stale with the next commit or the next machine, so a benchmark's figures are
written with their provenance (`tirsynth bench ... --markdown FILE`) and collected in
docs/benchmarks.md, never quoted bare in the code or the guides.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def commit() -> str:
    """The checkout's short commit, `-dirty` when files differ from it; `unknown` outside
    a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(PACKAGE_ROOT), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short=10", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


def machine() -> str:
    """Cores, CPU model, memory and GPU, in one line."""
    parts = [f"{os.cpu_count()} cores", _cpu_model()]
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        parts.append(f"{pages * page_size / 2**30:.0f} GiB")
    except (ValueError, OSError):
        pass
    parts.append(_gpu() or "no GPU")
    return ", ".join(parts)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu() -> str | None:
    if "torch" not in sys.modules:  # a benchmark that never loaded torch used no GPU
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))


def markdown_section(title: str, lines: list[str], command: list[str] | None = None) -> str:
    """A benchmark's printed lines as a Markdown section: its provenance, then a table of
    the `figure: value` lines, then any other lines (tables of their own) verbatim."""
    command = command if command is not None else ["tirsynth", *sys.argv[1:]]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        f"### {title}",
        "",
        f"- command: `{shlex.join(command)}`",
        f"- commit: `{commit()}`",
        f"- date: {now}",
        f"- machine: {machine()}",
        "",
    ]
    figures = [line.split(": ", 1) for line in lines if ": " in line and "|" not in line]
    rest = [line for line in lines if not (": " in line and "|" not in line)]
    if figures:
        out += ["| figure | value |", "|---|---|"]
        out += [f"| {name.strip()} | {value.strip()} |" for name, value in figures]
        out.append("")
    if rest:
        out += ["```", *rest, "```", ""]
    return "\n".join(out) + "\n"


def append_markdown(path: str | Path, section: str) -> None:
    """Add a section to a Markdown file (created if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(("\n" if path.stat().st_size else "") + section)
