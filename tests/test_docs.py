"""The README and docs/ stay true to the repository (issue 25).

Cheap checks, no model runs: the README's test command is the one ``.ci/run`` runs; every
relative link of README.md and docs/*.md resolves; every ``python -m benchmarks.NAME`` and
``capmoe COMMAND`` named in backticks exists, with the flags written beside it; every
``benchmarks/results/`` file the pages name exists, and the results index lists every file of
that folder. (The README's example and docs/configuration.md's block run in test_readme.py.)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RESULTS = ROOT / "benchmarks" / "results"


def _spans(text: str) -> list[str]:
    """Inline code spans and fenced blocks, with their line breaks joined."""
    fenced = re.findall(r"```[a-z]*\n(.*?)```", text, re.DOTALL)
    rest = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.DOTALL)
    inline = re.findall(r"`([^`]+)`", rest)
    return [" ".join(s.split()) for s in inline] + [
        " ".join(line.split())
        for block in fenced
        for line in block.replace("\\\n", " ").split("\n")
    ]


def test_readme_test_command_is_ci_s():
    ci = (ROOT / ".ci" / "run").read_text()
    pytest_line = next(
        line.strip() for line in ci.splitlines() if line.strip().startswith("python -m pytest")
    )
    pytest_line = pytest_line.removesuffix("|| {").strip()
    assert "export OMP_NUM_THREADS=1" in ci
    readme = (ROOT / "README.md").read_text()
    assert f"OMP_NUM_THREADS=1 {pytest_line}" in readme, pytest_line
    assert "torch==2.13.0" in ci and "pip install torch==2.13.0" in readme


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = page.read_text()
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            continue
        path = target.split("#")[0]
        if not (page.parent / path).exists():
            bad.append(target)
    assert not bad, f"{page.name}: links to nothing: {bad}"


def _spellings(flag: str) -> list[str]:
    """``--no-cold`` is argparse's ``BooleanOptionalAction`` of ``--cold``."""
    return [flag, "--" + flag.removeprefix("--no-")] if flag.startswith("--no-") else [flag]


def _benchmark_flags(name: str) -> str:
    return (ROOT / "benchmarks" / f"{name}.py").read_text()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_named_commands_and_flags_exist(page):
    from capmoe_compile.tools.cli import build_parser

    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices)
    bad = []
    for span in _spans(page.read_text()):
        for m in re.finditer(r"python -m benchmarks\.([a-z_]+)\b((?: [^|;&`]*)?)", span):
            name, args = m.group(1), m.group(2)
            if not (ROOT / "benchmarks" / f"{name}.py").exists():
                bad.append(f"benchmarks.{name}")
                continue
            source = _benchmark_flags(name)
            bad += [
                f"benchmarks.{name} {f}"
                for f in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", args)
                if not any(f'"{g}"' in source or f"'{g}'" in source for g in _spellings(f))
            ]
        for m in re.finditer(r"(?:^|\$ )capmoe ([a-z]+)(?=\s|$)((?: [^|;&`]*)?)", span):
            command, args = m.group(1), m.group(2)
            if command not in sub.choices:
                bad.append(f"capmoe {command}")
                continue
            known = sub.choices[command]._option_string_actions
            bad += [
                f"capmoe {command} {f}"
                for f in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", args)
                if f not in known
            ]
    assert not bad, f"{page.name}: commands or flags that do not exist: {bad}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_named_results_exist(page):
    text = page.read_text()
    named = set(re.findall(r"benchmarks/results/([\w.-]+\.(?:json|md|txt|png))", text))
    named.discard("README.md")  # the index: test_results_index_lists_every_record
    missing = sorted(n for n in named if not (RESULTS / n).exists())
    assert not missing, f"{page.name}: names results that are not in benchmarks/results/: {missing}"


def test_results_index_lists_every_record():
    index = (RESULTS / "README.md").read_text()
    files = sorted(p.name for p in RESULTS.iterdir() if p.is_file() and p.name != "README.md")
    unlisted = [f for f in files if f"`{f}`" not in index]
    assert not unlisted, (
        f"benchmarks/results/README.md does not list {unlisted}: add each record to its "
        "benchmark's row (command, date, machine, commit), or delete the run it supersedes"
    )


def test_readme_first_screen():
    """The problem, the install, the demo and the example come first; the rest is in docs/."""
    text = (ROOT / "README.md").read_text()
    heads = re.findall(r"^## (.+)$", text, re.MULTILINE)
    assert heads[:4] == ["The problem", "Install", "Run the demo", "In Python"], heads
    assert "C = max(1, ceil(gamma * T * k / E))" in text
    assert len(text.splitlines()) <= 150


def test_readme_example_says_its_gamma_is_not_a_setting():
    """The example's gamma 1.0 costs the shipped model about half its perplexity again: its
    section says so and points to ``capmoe calibrate`` and docs/calibration.md."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## In Python", 1)[1].split("\n## ", 1)[0]
    assert 'capacity_factor": 1.0' in section
    assert "capmoe calibrate" in section and "(docs/calibration.md)" in section, section
