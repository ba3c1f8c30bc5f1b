"""The README and docs/ name only commands and options that exist, link only to files that
exist, and the README stays short."""

import re
from pathlib import Path

import click
import pytest

from tirsynth.cli import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"\btirsynth ((?:[a-z][a-z-]*)(?: [a-z][a-z-]*)?)")
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z-]*)")


def code(text: str) -> list[str]:
    """The code of a Markdown page: fenced blocks (continuation lines joined) and inline
    spans; prose that names the tool is not an invocation."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines = [line for block in blocks for line in re.sub(r"\\\n\s*", " ", block).splitlines()]
    return lines + re.findall(r"`([^`\n]+)`", prose)


def command_lines(text: str):
    """Each `tirsynth ...` invocation in the page's code."""
    for line in code(text):
        for match in COMMAND.finditer(line):
            yield match, line[match.start() :].split("#")[0]


def resolve(words: list[str]) -> tuple[click.Command, list[click.Command]]:
    """The command that `tirsynth WORDS` runs, and the groups on the way (whose options
    may come first: `tirsynth bench --markdown F ingest`)."""
    command, groups = cli, []
    for word in words:
        if not isinstance(command, click.Group):
            break
        if word in command.commands:  # else a group option's value: look further
            groups.append(command)
            command = command.commands[word]
    return command, groups


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_commands_and_options_named_in_the_docs_exist(page):
    text = page.read_text()
    checked = 0
    for match, invocation in command_lines(text):
        words = [w for w in invocation.split()[1:] if not w.startswith("-")][:4]
        command, groups = resolve(words)
        assert command is not cli, f"{page.name}: `tirsynth {match.group(1)}` is no command"
        known = {o for c in (command, *groups) for p in c.params for o in p.opts}
        for option in OPTION.findall(invocation):
            assert option in known | {"--help"}, f"{page.name}: {invocation!r}: {option}"
        checked += 1
    if page.name == "README.md":
        assert checked >= 10


def test_links_and_images_in_the_docs_exist():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if "://" in target or target.startswith("../shared/"):
                continue  # the web, and the specification beside the checkout
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_readme_is_short_and_starts_with_what_it_does_its_figure_and_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150
    first_screen = "\n".join(lines[:30])
    assert "![" in first_screen and "make demo" in first_screen and "make test" in first_screen
    figure = re.search(r"!\[[^]]*\]\(([^)]+)\)", first_screen).group(1)
    assert (ROOT / figure).stat().st_size > 10_000  # committed, not a placeholder


def test_no_timing_is_quoted_outside_the_benchmark_tables():
    """Dated or machine-specific figures live in docs/benchmarks.md with their provenance."""
    timing = re.compile(r"\d+(?:\.\d+)? ?(?:ms|minutes|images/s|pairs/s|s/step)\b")
    for page in PAGES:
        if page.name == "benchmarks.md":
            continue
        found = timing.findall(page.read_text())
        assert not found, f"{page.name} quotes timings {found}: move them to benchmarks.md"
