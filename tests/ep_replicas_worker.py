"""One rank of tests/test_distributed_replicas.py, started by ``torchrun`` (gloo, loopback).

    torchrun --nproc-per-node 2 tests/ep_replicas_worker.py OUT_DIR

Every case runs on every rank; a case's result is "" or its traceback, written to
``OUT_DIR/rank{r}.json``. The oracle is SPEC.md's "Redundant expert copies" on one device:
``replicas.route_replicas`` on the concatenation of the ranks' rows (``token_rank`` = the rank
holding each row, for ``expanded_drop``), then every kept pair through the logical expert's
weights (a copy computes what its expert computes).
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import sys
import traceback

import torch
import torch.distributed as dist

from capmoe_compile import config
from capmoe_compile.bridge import capture_context
from capmoe_compile.distributed import expert_parallel, layers, record_timings
from capmoe_compile.experts import moe_experts_reference
from capmoe_compile.replicas import Placement, route_replicas
from capmoe_compile.testing import zoo

H, F, E, K = 32, 64, 4, 2
POLICIES = ("score", "order", "reverse", "random", "expanded_drop", "reroute")
# rank 0 holds two copies of expert 0; E = 4 experts on 7 copies; expert 3 only on rank 1
PLACEMENTS = {
    "dup_on_rank": Placement.from_copies(E, [[0, 1, 0], [2, 3, 0, 2]]),
    "uneven": Placement.from_copies(E, [[0, 1, 2], [3, 1]]),  # 3 + 2 slots, E % W irrelevant
    "shares": Placement.from_copies(E, [[0, 1], [0, 2, 3]], shares=[[0.7, 1.0], [0.3, 1.0, 1.0]]),
}


def passes_only(gm, example_inputs):
    """The capmoe rewrite without Inductor (fast to build; the op is the same)."""
    from capmoe_compile.passes import run_passes

    run_passes(gm, example_inputs, {})
    return gm.forward


passes_only.backend_ctx_ctor = capture_context


def _block():
    model = zoo.build("mixtral", num_layers=1, hidden=H, ffn=F, num_experts=E, top_k=K, vocab=64)
    return model.model.layers[0].mlp, model


def _hidden(model, batch, seq, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, H, generator=gen)
    return x + model.zoo_shared_direction.float() / math.sqrt(H) * 3


def _split(t, rank, sizes):
    s = sum(sizes[:rank])
    return t[s : s + sizes[rank]]


def _oracle(ref, ep_layer, x_all, sizes_rows, rank, **kw):
    """(this rank's output rows, the kept pairs at this rank's copies) on one device."""
    flat = x_all.reshape(-1, H)
    logits, W, ids = ref.gate(flat)
    P = logits.float().softmax(-1)
    token_rank = torch.repeat_interleave(torch.arange(len(sizes_rows)), torch.tensor(sizes_rows))
    pl = ep_layer.placement
    split = "share" if pl.shares is not None else "round_robin"
    r = route_replicas(P, ids, W, pl, token_rank=token_rank, split=split, **kw)
    params = [ref.get_parameter(n) for n in ep_layer.param_names]
    out = moe_experts_reference(flat, r.ids, r.weights, params, ep_layer.form)
    kept = r.copy_ids[r.copy_ids < pl.num_copies]
    here = int((torch.tensor(pl.rank_of)[kept] == rank).sum())
    return _split(out, rank, sizes_rows).reshape(-1, H), here


def case_every_policy(rank, world, name, sizes=(2, 2), seq=8, scope="batch"):
    """EP with copies (compiled) == the single-device oracle, every policy, 2 gammas; and each
    rank computes exactly the pairs the oracle assigns to its copies."""
    pl = PLACEMENTS[name]
    block, model = _block()
    ref = copy.deepcopy(block)
    expert_parallel(block, example_inputs=_hidden(model, 2, 8), placement=pl)
    ep_layer = layers()[block.experts._capmoe_ep_key]
    assert ep_layer.placement == pl
    mine = [p for p in range(pl.num_copies) if pl.rank_of[p] == rank]
    for n, local in zip(ep_layer.param_names, ep_layer.local, strict=True):
        want_local = ref.get_parameter(n).detach()[[pl.expert_of[p] for p in mine]]
        torch.testing.assert_close(local, want_local)  # a copy's weights, on its rank
    x_all = _hidden(model, sum(sizes), seq)
    x = _split(x_all, rank, sizes)
    rows = [b * seq for b in sizes]
    torch._dynamo.reset()
    ep = torch.compile(block, backend=passes_only, dynamic=False)
    with torch.no_grad():
        off = ref(x_all).reshape(-1, H)
        want_off = _split(off, rank, rows)
        torch.testing.assert_close(block(x).reshape(-1, H), want_off, atol=1e-5, rtol=1e-4)
        with record_timings() as tm:
            got = ep(x).reshape(-1, H)
        torch.testing.assert_close(got, want_off, atol=1e-5, rtol=1e-4)
        _, here = _oracle(ref, ep_layer, x_all, rows, rank, capacity_factor=None)
        assert sum(t.recv_rows for t in tm) == here, (sum(t.recv_rows for t in tm), here)
        assert ep_layer.compiled_as.startswith("opaque"), ep_layer.compiled_as
        nseq = sum(sizes) if scope == "sequence" else 1
        changed = []
        for gamma in (0.5, 1.0):
            for policy in POLICIES:
                opts = dict(capacity_factor=gamma, policy=policy, min_tokens=2)
                with config.patch(capacity_scope=scope, **opts), record_timings() as tm:
                    got = ep(x).reshape(-1, H)
                kw = dict(opts, capacity_scope=scope, num_sequences=nseq)
                if scope == "sequence":  # the oracle routes each sequence on its own alike
                    kw["num_sequences"] = sum(sizes)
                want, here = _oracle(ref, ep_layer, x_all, rows, rank, **kw)
                msg = f"{name} {policy} gamma={gamma}"
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=msg)
                assert sum(t.recv_rows for t in tm) == here, msg
                if gamma < 1 and not torch.allclose(got, want_off):
                    changed.append(policy)
        assert len(changed) >= 3, changed  # capacity did something on this rank's rows


def case_plan_json(rank, world, tmp):
    """A plan file (``capmoe_compile.plan``) names the layer; expert_parallel reads it."""
    from capmoe_compile import plan as P

    block, model = _block()
    ref = copy.deepcopy(block)
    probe = copy.deepcopy(block)
    expert_parallel(probe, example_inputs=_hidden(model, 2, 8), placement=PLACEMENTS["uneven"])
    name = layers()[probe.experts._capmoe_ep_key].name
    loads = {name: P.LayerLoads(torch.tensor([[40, 5, 10, 9], [30, 8, 12, 14]]),
                                torch.tensor([32, 32]), K)}  # fmt: skip
    p = P.plan(loads, ranks=world, spare_per_rank=1, gamma=1.0)
    path = os.path.join(tmp, "plan.json")
    if rank == 0:
        p.save(path)
    dist.barrier()
    expert_parallel(block, example_inputs=_hidden(model, 2, 8), placement=path)
    ep_layer = layers()[block.experts._capmoe_ep_key]
    pl = ep_layer.placement
    assert pl == p.placement(name) and pl.redundant == 2, pl  # 2 ranks x 3 slots, E = 4
    x_all = _hidden(model, 4, 8)
    x = _split(x_all, rank, (2, 2))
    ep = torch.compile(block, backend=passes_only, dynamic=False)
    with torch.no_grad(), config.patch(capacity_factor=1.0):
        want, _ = _oracle(ref, ep_layer, x_all, [16, 16], rank, capacity_factor=1.0)
        torch.testing.assert_close(ep(x).reshape(-1, H), want, atol=1e-5, rtol=1e-4)
    bad = copy.deepcopy(ref)
    try:
        expert_parallel(bad, example_inputs=_hidden(model, 2, 8), placement={"nope": pl})
    except ValueError as e:
        assert "did not find" in str(e), e
    else:
        raise AssertionError("a placement for an unknown layer must raise")
    wide = Placement.from_copies(E, [[0], [1], [2, 3]])  # 3 ranks, the group has 2
    try:
        expert_parallel(copy.deepcopy(ref), example_inputs=_hidden(model, 2, 8), placement=wide)
    except ValueError as e:
        assert "ranks" in str(e), e
    else:
        raise AssertionError("a placement over more ranks than the group must raise")


def main() -> None:
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    cases = {
        "dup_on_rank": lambda: case_every_policy(rank, world, "dup_on_rank"),
        "uneven_slots_and_tokens": lambda: case_every_policy(rank, world, "uneven", sizes=(1, 3)),
        "shares": lambda: case_every_policy(rank, world, "shares"),
        "sequence_scope": lambda: case_every_policy(
            rank, world, "dup_on_rank", sizes=(1, 2), scope="sequence"
        ),
        "plan_json": lambda: case_plan_json(rank, world, out_dir),
    }
    results = {}
    for name, fn in cases.items():
        try:
            fn()
            results[name] = ""
        except Exception:  # noqa: BLE001 - reported per case to the test
            results[name] = traceback.format_exc()
            print(f"rank {rank} {name}:\n{results[name]}", file=sys.stderr, flush=True)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)  # after every case: a later hang still reports this one
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
