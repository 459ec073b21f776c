"""The README's "Using it" block runs as written (issue 23), so it cannot drift from the code.

The block is read from README.md (the first ``python`` code block under "## Using it") and run
with ``exec`` on the shipped tiny model, with only ``model`` and ``batch`` set up around it. Its
documented effects are then checked from load figures recorded around it: the
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
from capmoe_compile.models import load_tiny_moe, load_tokenizer
from capmoe_compile.routing import capacity

README = Path(__file__).resolve().parents[1] / "README.md"


def using_it_block(text: str) -> str:
    """The first ```python block of the "## Using it" section (before the next heading)."""
    start = text.index("\n## Using it\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, 'README.md: no ```python block under "## Using it"'
    return match.group(1)


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


def test_using_it_block_runs_as_written(clean_state, capsys):
    code = using_it_block(README.read_text())
    model, _ = load_tiny_moe()
    tok = load_tokenizer()
    tok.padding_side = "left"
    prompts = ["def __init__(self, x):\n  self.x = x", "import os\nimport sys\n"]
    batch = dict(tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False))
    names = [f"model.layers.{i}.mlp" for i in range(len(model.model.layers))]
    E, k = model.config.num_local_experts, model.config.num_experts_per_tok
    ns = {"model": model, "batch": batch}

    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with capmoe_compile.record_stats() as every:  # every layer call the block makes
            exec(compile(code, str(README) + ":Using it", "exec"), ns)
    printed = capsys.readouterr().out
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
