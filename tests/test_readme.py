"""The README's example and docs/configuration.md's "Using it" block run as written (issues 23
and 25), so they cannot drift from the code.

Each is read from its page (the first ``python`` code block under its heading) and run with
``exec`` as written, in a namespace of its own: both load the shipped tiny model themselves.
The README's example (its first screen) must print one line per layer with the capacity SPEC.md
gives, and ``explain``'s table. The "Using it" block's documented effects are checked from load
figures recorded around it: the
``config.patch`` applies inside the patch (its capacity factor and Expanded Drop's added
pairs), the exempt layer runs as written, the configured layer uses its own capacity factor and
the others the global one. Before issue 23 the block raised (the width of ``expanded_drop`` was
fixed in the compiled graph) and its ``config.patch`` was outranked by ``options=``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

import capmoe_compile
from capmoe_compile import config, module_config
from capmoe_compile.routing import capacity

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"


def python_block(path: Path, heading: str) -> str:
    """The first ```python block of the ``## heading`` section of ``path`` (before the next
    heading of that level)."""
    text = path.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, f'{path.name}: no ```python block under "## {heading}"'
    return match.group(1)


def using_it_block(text: str | None = None) -> str:
    return python_block(CONFIGURATION, "Using it")


@pytest.fixture
def clean_state():
    """The block sets global config and per-module overrides: undo them, and drop its compiled
    code, so no other test sees them."""
    before = config.snapshot()
    torch._dynamo.reset()
    yield
    for name, value in before.items():
        setattr(config, name, value)
    module_config.clear()
    torch._dynamo.reset()


def test_readme_example_runs_as_written(clean_state, capsys):
    code = python_block(README, "In Python")
    assert len(code.strip().splitlines()) <= 20  # the first screen's example stays short
    ns: dict = {}
    exec(compile(code, str(README) + ":In Python", "exec"), ns)
    printed = capsys.readouterr().out
    model, stats = ns["model"], ns["stats"]
    E, k = model.config.num_local_experts, model.config.num_experts_per_tok
    names = [f"model.layers.{i}.mlp" for i in range(len(model.model.layers))]
    assert [r.name for r in stats.layers] == names
    for r in stats.layers:
        C = capacity(r.tokens, E, k, 1.0)
        assert r.capacity == C and int(r.loads_after.max()) <= C, (r.name, r.tokens)
        assert r.padding_excluded  # the tokenizer's attention_mask is passed: padding excluded
        assert f"{r.name} T={r.tokens} C={C} max/mean load" in printed
    assert f"{len(names)} MoE layer(s) matched" in printed
    # the output the README shows for it (the first fenced block after the example)
    text = README.read_text()
    after = text[text.index(code) + len(code) + len("```") :]  # past the example's own fence
    shown = re.search(r"```\n(.*?)```", after, re.DOTALL).group(1)
    for line in shown.strip().splitlines():
        assert line in printed, (line, printed)


def test_using_it_block_runs_as_written(clean_state, capsys):
    code = using_it_block()
    ns: dict = {}

    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with capmoe_compile.record_stats() as every:  # every layer call the block makes
            exec(compile(code, str(CONFIGURATION) + ":Using it", "exec"), ns)
    printed = capsys.readouterr().out
    model = ns["model"]
    names = [f"model.layers.{i}.mlp" for i in range(len(model.model.layers))]
    E, k = model.config.num_local_experts, model.config.num_experts_per_tok
    ours = [str(w.message) for w in caught if "capmoe" in str(w.message)]
    assert not ours, ours  # nothing outranked, nothing else to say about this block

    # The config.patch applies inside it: gamma 1.25 (not the 1.0 set outside) and Expanded Drop
    # adds pairs; the first compiled call is the first len(names) records.
    patched = every.layers[: len(names)]
    assert [r.name for r in patched] == names
    for r in patched:
        assert r.capacity == capacity(r.tokens, E, k, 1.25), (r.name, r.tokens, r.capacity)
    assert sum(r.added for r in patched) > 0
    assert config.capacity_factor == 1.0 and config.policy == "score"  # the patch is undone

    # The block's own record_stats: the first layer exempt (as written), the last configured
    # to gamma 2.0, the others the global 1.0; policy score again, so nothing is added.
    stats = ns["stats"]
    assert [r.name for r in stats.layers] == names
    first, *middle, last = stats.layers
    assert first.capacity is None and first.dropped == first.added == 0
    assert torch.equal(first.loads_before, first.loads_after)
    for r in middle:
        assert r.capacity == capacity(r.tokens, E, k, 1.0), (r.name, r.tokens, r.capacity)
    assert last.capacity == capacity(last.tokens, E, k, 2.0), (last.tokens, last.capacity)
    assert all(r.added == 0 for r in stats.layers)
    for r in stats.layers:  # the figures the block prints
        assert f"{r.name} {r.capacity} {r.imbalance_before} {r.modeled_speedup}" in printed

    # explain printed a table of every layer, twice (the compiled model and a trace of its own)
    assert printed.count("4 MoE layer(s) matched") == 2, printed
    assert all(printed.count(name) >= 2 for name in names)

    # the reference semantics: no expert gets more than C of the 16 tokens
    ids = ns["ids"]
    C = capacity(16, 8, 2, 1.0)
    assert ids.shape == (16, 2)
    assert int(torch.bincount(ids.flatten(), minlength=9)[:8].max()) <= C
