"""transformers ``generate`` through the capmoe backend (issue 15).

One tiny skewed zoo Mixtral (1 layer, H=64, E=8, k=2), compiled once for the module the way the
README shows (``model.compile(backend="capmoe", dynamic=True)``: in place, so ``generate``
goes through it). Every figure is checked against an eager run:

- capacity off: eager ``generate`` of the same weights, token for token and logits allclose;
- capacity on: an eager copy of the model whose router outputs are replaced, through a forward
  hook (``capmoe_compile.testing.serving.CapacityOracle``, shared with
  ``benchmarks/serving_graphs.py``), by ``capmoe_compile.route`` applied to the router's own
  selection (the padding rows of a prefill call excluded as SPEC.md says, the experts run by
  transformers' ``eager`` loop, which skips the dropped pairs' sentinel id). The hook also
  records each call's loads, which ``record_stats`` must report, call by call, phase by phase.

The serving sequence (prompts of 3 lengths, batch sizes 1, 3 and 8, left padding) runs 8 new
tokens per prompt here rather than 20, to keep the file cheap: decode steps past the second
reuse the same graphs (the cache length is already symbolic), so more steps add time, not
graphs; likewise more prompt lengths (the prefill length is symbolic under dynamic=True). The
graph bound it checks is the one the README states; ``python -m benchmarks.serving_graphs``
runs the issue's whole sequence (5 lengths, 20 new tokens) with the same checks.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import capmoe_compile as cc
from capmoe_compile import backend
from capmoe_compile.testing import serving, zoo

E, K = 8, 2
GAMMA = 1.0
MIN_TOKENS = 2  # the config default, written out: the oracle applies the same rule
#: The README's bound on graphs over the serving sequence with ``dynamic=True``: prefill, the
#: first decode step and the later decode steps (the cache length becomes symbolic), once for
#: batch size 1 and once for batch sizes >= 2 (Dynamo specialises sizes 0 and 1).
MAX_GRAPHS = 6
SERVING_LENGTHS = (3, 9, 17)
SERVING_BATCHES = (3, 1, 8)
SERVING_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def models():
    """(eager model, compiled copy, compile_count before the compile)."""
    torch._dynamo.reset()
    eager = zoo.build("mixtral", num_layers=1, seed=5, skew=1.5)
    compiled = copy.deepcopy(eager)
    before = backend.compile_count()
    compiled.compile(backend="capmoe", dynamic=True)
    yield eager, compiled, before
    torch._dynamo.reset()


_left_padded = serving.left_padded
_generate = serving.greedy


def CapacityOracle(model, **options):  # noqa: N802 - the shared oracle with this file's rule
    return serving.CapacityOracle(model, min_tokens=MIN_TOKENS, **options)


def _capacity(tokens: int) -> int:
    return max(1, math.ceil(GAMMA * tokens * K / E))


# --------------------------------------------------------------------------------------------


def test_generate_capacity_off_equals_eager(models):
    eager, compiled, _ = models
    ids, mask = _left_padded([5, 9, 7], seed=1)
    want, want_logits = _generate(eager, ids, mask, 6)
    with cc.config.patch(capacity_factor=None):
        got, got_logits = _generate(compiled, ids, mask, 6)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)


def test_generate_capacity_on_equals_hook_oracle_and_stats(models):
    eager, compiled, _ = models
    lengths = [5, 9, 7]
    ids, mask = _left_padded(lengths, seed=2)
    new = 6
    oracle = CapacityOracle(eager, capacity_factor=GAMMA, policy="score")
    want, want_logits = _generate(oracle.model, ids, mask, new)
    opts = dict(capacity_factor=GAMMA, policy="score", min_tokens=MIN_TOKENS)
    with cc.config.patch(**opts), cc.record_stats() as stats:
        got, got_logits = _generate(compiled, ids, mask, new)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)

    # pairs were dropped in prefill and in decode, so the comparison above tells capacity
    # from none
    dropped = [int((c["before"] - c["after"]).clamp_min(0).sum()) for c in oracle.calls]
    assert dropped[0] > 0 and sum(dropped[1:]) > 0, dropped

    # record_stats: one prefill call (padding excluded), then one decode call per new token
    B = len(lengths)
    assert [s.phase for s in stats.layers] == ["prefill"] + ["decode"] * (new - 1)
    assert [s.phase for s in stats.layers] == [c["phase"] for c in oracle.calls]
    pre = stats.prefill[0]
    assert pre.tokens == sum(lengths) and pre.sequences == B
    assert pre.capacity == _capacity(sum(lengths))
    for s in stats.decode:
        assert s.tokens == B and s.sequences == B and s.capacity == _capacity(B)
    for s, c in zip(stats.layers, oracle.calls, strict=True):
        assert s.tokens == c["tokens"]
        assert torch.equal(s.loads_before, c["before"]), (s, c)
        assert torch.equal(s.loads_after, c["after"]), (s, c)
        assert int(s.loads_after.max()) <= s.capacity


def test_single_sequence_decode_runs_as_written(models):
    """min_tokens=2: a batch of one sequence decodes as written (T=1 < min_tokens), its
    prefill gets capacity."""
    _, compiled, _ = models
    ids, mask = _left_padded([9], seed=3)
    with cc.config.patch(capacity_factor=GAMMA, min_tokens=MIN_TOKENS), cc.record_stats() as st:
        _generate(compiled, ids, mask, 3)
    assert [s.phase for s in st.layers] == ["prefill", "decode", "decode"]
    assert st.prefill[0].capacity == _capacity(9)
    assert all(s.capacity is None and s.dropped == 0 and s.tokens == 1 for s in st.decode)


def test_serving_sequence_bounded_graphs_and_fresh_results(models):
    """Prompts of 3 lengths x batch sizes 1, 3, 8, left padded: every call computes what eager
    (capacity off) and the hook oracle (capacity on) compute, and the graphs compiled over
    the whole module stay within MAX_GRAPHS."""
    eager, compiled, before = models
    oracle = CapacityOracle(eager, capacity_factor=GAMMA, policy="score")
    n = SERVING_NEW_TOKENS
    for B in SERVING_BATCHES:
        for i, longest in enumerate(SERVING_LENGTHS):
            lengths = [longest] + [max(1, longest - 2 * j - i) for j in range(1, B)]
            ids, mask = _left_padded(lengths, seed=10 * B + i)
            with cc.config.patch(capacity_factor=None):
                got, _ = _generate(compiled, ids, mask, n)
            assert torch.equal(got, _generate(eager, ids, mask, n)[0]), (B, lengths)
            with cc.config.patch(capacity_factor=GAMMA, min_tokens=MIN_TOKENS):
                got, _ = _generate(compiled, ids, mask, n)
            assert torch.equal(got, _generate(oracle.model, ids, mask, n)[0]), (B, lengths)
    graphs = backend.compile_count() - before
    assert 0 < graphs <= MAX_GRAPHS, graphs


def test_compiled_wrapper_generate_warns():
    """torch.compile(model).generate runs the original module's generate, uncompiled:
    record_stats says so instead of staying silently empty."""
    model = zoo.build("mixtral", num_layers=1, seed=5, skew=1.5)
    wrapper = torch.compile(model, backend="capmoe")
    ids, mask = _left_padded([4, 6], seed=4)
    count = backend.compile_count()
    with pytest.warns(UserWarning, match="model.compile"):
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            with cc.config.patch(capacity_factor=GAMMA), cc.record_stats() as st:
                _generate(wrapper, ids, mask, 2)
    assert st.layers == [] and backend.compile_count() == count  # it really ran uncompiled
