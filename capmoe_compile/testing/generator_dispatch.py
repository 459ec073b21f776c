"""A generated layer's dispatches (per-pair gathers, grouped and batched GEMMs, loops over
experts, splits) with its expert forms, and the expert modules some of them run (a
``ModuleList`` expert, transformers' eager hit-expert loops). Mixed into
:class:`~capmoe_compile.testing.generator_model.GeneratedMoE`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from capmoe_compile.testing.generator_spec import hidden_of


class DispatchSpellings:
    """:class:`GeneratedMoE`'s dispatches (``_<dispatch>(xf, ids, w) -> [T, H]``, one per
    name of ``DISPATCHES``) and its experts on rows (``_one_expert``), from the stacked
    weights ``w_in``, ``w_gate``, ``w_out`` (and biases) the layer holds."""

    def _w(self, name: str) -> torch.Tensor:
        """A stacked weight as [E, in, out], whatever its storage."""
        w = getattr(self, name)
        return w if self.spec.transposed else w.transpose(1, 2)

    def _hidden(self, h_in: torch.Tensor, h_gate: torch.Tensor | None) -> torch.Tensor:
        return hidden_of(self.spec, h_in, h_gate)

    def _b(self, name: str, e: torch.Tensor | int | None = None):
        b = getattr(self, name, None)
        if b is None:
            return 0
        return b if e is None else b[e]

    def _gather_einsum(self, xf, ids, w):
        k = ids.shape[1]
        e = ids.reshape(-1)
        xs = xf.repeat_interleave(k, dim=0)
        h_in = torch.einsum("nh,nhf->nf", xs, self._w("w_in")[e]) + self._b("b_in", e)
        h_gate = None
        if self.spec.form == "gate_and_up":
            h_gate = torch.einsum("nh,nhf->nf", xs, self._w("w_gate")[e]) + self._b("b_gate", e)
        h = self._hidden(h_in, h_gate)
        y = torch.einsum("nf,nfh->nh", h, self._w("w_out")[e]) + self._b("b_out", e)
        return (y.view(-1, k, xf.shape[1]) * w.unsqueeze(-1)).sum(dim=1)

    def _grouped_mm(self, xf, ids, w):
        k = ids.shape[1]
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tok = order // k
        e_sorted = flat[order]
        counts = torch.histc(flat.float(), bins=self.spec.E, min=0, max=self.spec.E - 1)
        offs = torch.cumsum(counts, 0).to(torch.int32)  # histc, as transformers: no graph break
        xs = xf[tok]

        def proj(name, inp):
            y = torch._grouped_mm(inp, self._w(name), offs=offs)
            return y + self._b("b" + name[1:], e_sorted)

        h_gate = proj("w_gate", xs) if self.spec.form == "gate_and_up" else None
        h = self._hidden(proj("w_in", xs), h_gate)
        y = proj("w_out", h) * w.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros_like(xf)
        return out.index_add(0, tok, y)

    def _dense_onehot(self, xf, ids, w):
        dense = torch.zeros(xf.shape[0], self.spec.E, dtype=w.dtype).scatter(1, ids, w)
        h_in = torch.einsum("th,ehf->etf", xf, self._w("w_in")) + self._bias3("b_in")
        h_gate = None
        if self.spec.form == "gate_and_up":
            h_gate = torch.einsum("th,ehf->etf", xf, self._w("w_gate")) + self._bias3("b_gate")
        h = self._hidden(h_in, h_gate)
        y = torch.einsum("etf,efh->eth", h, self._w("w_out")) + self._bias3("b_out")
        return torch.einsum("te,eth->th", dense.to(y.dtype), y)

    def _bias3(self, name):
        b = getattr(self, name, None)
        return 0 if b is None else b[:, None, :]

    def _expert_loop(self, xf, ids, w):
        out = torch.zeros_like(xf)
        for e in range(self.spec.E):
            weight = (w * (ids == e)).sum(dim=-1, keepdim=True)
            out = out + weight * self._one_expert(e, xf)
        return out

    def _one_expert(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        return self._expert_rows(e, rows, self.w_in[e], self.w_out[e])

    def _expert_rows(self, e: int, rows, w_in_e, w_out_e) -> torch.Tensor:
        """Expert ``e`` on ``rows``, given its in and out weights as stored."""

        def lin(w):
            return w if self.spec.transposed else w.t()

        h_in = rows @ lin(w_in_e) + self._b("b_in", e)
        h_gate = None
        if self.spec.form == "gate_and_up":
            h_gate = rows @ self._w("w_gate")[e] + self._b("b_gate", e)
        return self._hidden(h_in, h_gate) @ lin(w_out_e) + self._b("b_out", e)

    def _where_loop(self, xf, ids, w):
        out = torch.zeros_like(xf)
        for e in range(self.spec.E):
            tok, slot = torch.where(ids == e)
            y = self._one_expert(e, xf[tok]) * w[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    def _modulelist_where(self, xf, ids, w):
        out = torch.zeros_like(xf)
        for e, expert in enumerate(self.expert_list):
            tok, slot = torch.where(ids == e)
            out.index_add_(0, tok, (expert(xf[tok]) * w[tok, slot, None]).to(out.dtype))
        return out

    def _hit_loop(self, xf, ids, w):
        return self.hit_experts(xf, ids, w)

    _hit_loop_item = _hit_loop

    def _split_tolist(self, xf, ids, w):
        T, k = ids.shape
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.spec.E)
        rows = xf.repeat_interleave(k, dim=0)[order]
        chunks = torch.split(rows, counts.tolist())
        outs = [self._one_expert(e, r) for e, r in enumerate(chunks)]
        y = torch.empty_like(rows)
        y[order] = torch.cat(outs).to(y.dtype)
        return (y.view(T, k, -1) * w.unsqueeze(-1).to(y.dtype)).sum(1)

    def _split_index_add(self, xf, ids, w):
        k = ids.shape[1]
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tok = order // k
        counts = F.one_hot(flat, self.spec.E).sum(0)
        chunks = xf[tok].split(counts.tolist(), dim=0)
        y = torch.cat([self._one_expert(e, r) for e, r in enumerate(chunks)])
        y = y * w.reshape(-1)[order].unsqueeze(-1)
        return torch.zeros_like(xf).index_add_(0, tok, y.to(xf.dtype))

    def _sorted_index_add(self, xf, ids, w):
        k = ids.shape[1]
        flat = ids.reshape(-1)
        order = torch.argsort(flat)
        tok = order // k
        e = flat[order]
        xs = xf[tok]
        h_in = torch.bmm(xs.unsqueeze(1), self._w("w_in")[e]).squeeze(1) + self._b("b_in", e)
        h_gate = None
        if self.spec.form == "gate_and_up":
            h_gate = torch.bmm(xs.unsqueeze(1), self._w("w_gate")[e]).squeeze(1)
            h_gate = h_gate + self._b("b_gate", e)
        h = self._hidden(h_in, h_gate)
        y = torch.bmm(h.unsqueeze(1), self._w("w_out")[e]).squeeze(1) + self._b("b_out", e)
        y = y * w.reshape(-1)[order].unsqueeze(-1)
        return torch.zeros_like(xf).index_add_(0, tok, y)

    def _bmm_capacity(self, xf, ids, w):
        return self._bmm(xf, ids, w, cap=xf.shape[0])

    def _bmm_own_capacity(self, xf, ids, w):
        T, k = ids.shape
        return self._bmm(xf, ids, w, cap=max(1, int(T * k / self.spec.E)))

    def _bmm(self, xf, ids, w, cap):
        T, k = ids.shape
        E, H = self.spec.E, xf.shape[1]
        hot = F.one_hot(ids, E)
        pos = (torch.cumsum(hot.reshape(T * k, E), 0).reshape(T, k, E) - 1) * hot
        pos = pos.sum(-1)
        slot = torch.where(pos < cap, ids * cap + pos, torch.full_like(ids, E * cap))
        buf = xf.new_zeros(E * cap + 1, H)
        buf = buf.index_copy(0, slot.reshape(-1), xf.repeat_interleave(k, 0))
        buf = buf[: E * cap].view(E, cap, H)
        h_in = torch.bmm(buf, self._w("w_in")) + self._bias3("b_in")
        h_gate = None
        if self.spec.form == "gate_and_up":
            h_gate = torch.bmm(buf, self._w("w_gate")) + self._bias3("b_gate")
        y = torch.bmm(self._hidden(h_in, h_gate), self._w("w_out")) + self._bias3("b_out")
        y = torch.cat([y.reshape(E * cap, H), y.new_zeros(1, H)])
        return (y[slot.reshape(-1)].view(T, k, H) * w.unsqueeze(-1)).sum(dim=1)


try:  # transformers' decorator: its eager loop is what capmoe's bridge rewrites
    from transformers.integrations.moe import use_experts_implementation
except ImportError:  # pragma: no cover - the hit_loop dispatches need transformers
    use_experts_implementation = None
_HitLoopExperts = _HitLoopItemExperts = None

if use_experts_implementation is not None:

    @use_experts_implementation
    class _HitLoopExperts(nn.Module):  # noqa: F811 - defined where transformers is
        """transformers' eager experts loop (this project's own spelling of it), on the
        generated layer's weights (shared with it)."""

        def __init__(self, config, owner: nn.Module) -> None:
            super().__init__()
            self.num_experts = owner.spec.E
            self.w_in, self.w_out = owner.w_in, owner.w_out
            object.__setattr__(self, "_owner", owner)  # not a submodule: no cycle

        def forward(self, hidden_states, top_k_index, top_k_weights):
            final = torch.zeros_like(hidden_states)
            with torch.no_grad():
                mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
                hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
            for e in hit:
                e = e[0]
                if e == self.num_experts:
                    continue
                slot, tok = torch.where(mask[e])
                y = self._owner._expert_rows(e, hidden_states[tok], self.w_in[e], self.w_out[e])
                y = y * top_k_weights[tok, slot, None]
                final.index_add_(0, tok, y.to(final.dtype))
            return final

    @use_experts_implementation
    class _HitLoopItemExperts(_HitLoopExperts):  # noqa: F811
        """Nemotron-H's spelling: ``.nonzero().squeeze(-1)`` read with ``.item()``, no sentinel
        skip, a skip of empty selections."""

        def forward(self, hidden_states, top_k_index, top_k_weights):
            final = torch.zeros_like(hidden_states, dtype=top_k_weights.dtype)
            with torch.no_grad():
                mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
                mask = mask.permute(2, 1, 0)
                hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().squeeze(-1)
            for e in hit:
                e = e.item()
                slot, tok = torch.where(mask[e])
                if tok.numel() == 0:
                    continue
                y = self._owner._expert_rows(e, hidden_states[tok], self.w_in[e], self.w_out[e])
                y = y * top_k_weights[tok, slot, None]
                final.index_add_(0, tok, y.to(final.dtype))
            return final.to(hidden_states.dtype)


class _ListExpert(nn.Module):
    """Expert ``e`` of a generated layer as a module of its own (a copy of its weights), for
    the ``nn.ModuleList`` dispatch."""

    def __init__(self, owner: nn.Module, e: int) -> None:
        super().__init__()
        self.spec = owner.spec
        for name in ("w_in", "w_gate", "w_out", "b_in", "b_gate", "b_out"):
            p = getattr(owner, name, None)
            if p is not None:
                setattr(self, name, nn.Parameter(p[e].detach().clone()))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        def proj(name: str, h: torch.Tensor) -> torch.Tensor:
            w = getattr(self, name)
            b = getattr(self, "b" + name[1:], None)
            y = h @ (w if self.spec.transposed else w.t())
            return y if b is None else y + b

        gate = proj("w_gate", rows) if self.spec.form == "gate_and_up" else None
        return proj("w_out", hidden_of(self.spec, proj("w_in", rows), gate))


class _EagerConfig:
    _experts_implementation = "eager"
