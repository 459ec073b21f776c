"""A generated layer's routers, as written (the model under test) and as SPEC.md reads them
(``routing``: P, S, W), with the router caps (issue 23). Mixed into
:class:`~capmoe_compile.testing.generator_model.GeneratedMoE`."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class RouterSpellings:
    """:class:`GeneratedMoE`'s routers: ``_route`` (the ids and gate weights as written, one
    spelling per name of ``ROUTERS``, with the router cap), and SPEC's reading of them."""

    def _route(self, x, xf):
        ids, w = self._route_dropless(x, xf)
        if self.spec.router_cap:
            w = self._router_capacity(ids, w)
        return ids, w

    # the moderate router cap, in sixteenths of T*k/E: set by ``calibrate_router_cap``
    cap_sixteenths = 24

    def _router_cap_value(self, T, k: int):
        E, kind = self.spec.E, self.spec.cap
        if kind == "never":
            return T  # no expert can hold more than T pairs: never binds
        if kind == "binding":
            return max(1, (T * k) // (2 * E))
        q = self.cap_sixteenths
        return (T * k * q + 16 * E - 1) // (16 * E)  # ceil(q/16 * T*k/E)

    def router_cap_can_bind(self, T: int) -> bool:
        """Whether the router's own cap drops a pair of *some* input of ``T`` tokens: ``C < T``.
        A token's k experts are distinct, so no expert gets more than ``T`` pairs: a cap of
        ``T`` or more (``never``, or a ``moderate`` one calibrated up to ``T``) never binds."""
        return bool(self.spec.router_cap) and self._router_cap_value(T, self.spec.k) < T

    def may_rewrite(self, T: int) -> bool:
        """Whether SPEC lets capmoe rewrite this layer on calls of ``T`` tokens (the layer as
        built and calibrated; :attr:`LayerSpec.expected_match` is the spec's intent): not an
        layer's own capacity in the dispatch, not a router cap
        that can bind at ``T`` (SPEC: token-wise routing is part of what a match proves)."""
        s = self.spec
        if s.dispatch == "bmm_own_capacity":
            return False
        return not self.router_cap_can_bind(T)

    def _router_capacity(self, ids, w):
        """The layer's own capacity, in the router: pairs past position C in their expert's
        queue get weight 0 (every pair is still computed)."""
        T, k = ids.shape
        E = self.spec.E
        cap = self._router_cap_value(T, k)
        how = self.spec.router_cap
        if how == "cumsum_flat":
            hot = F.one_hot(ids, E).reshape(T * k, E)
            pos = (hot.cumsum(0) * hot).sum(-1).view(T, k)  # 1-based place in its queue
            return w * (pos <= cap)
        if how == "cumsum_slot":
            hot = F.one_hot(ids, E)
            seen = torch.zeros(E, dtype=hot.dtype)
            places = []
            for j in range(k):
                c = hot[:, j].cumsum(0) + seen
                places.append((c * hot[:, j]).sum(-1))
                seen = seen + hot[:, j].sum(0)
            return w.masked_fill(torch.stack(places, 1) > cap, 0)
        flat = ids.reshape(-1)
        if how == "sort_rank":
            order = torch.argsort(flat, stable=True)
        else:  # sort_score: best weight first within each expert
            by_w = torch.argsort(w.reshape(-1).float(), descending=True, stable=True)
            order = by_w[torch.argsort(flat[by_w], stable=True)]
        counts = F.one_hot(flat, E).sum(0)
        starts = counts.cumsum(0) - counts
        rank = torch.arange(T * k) - starts[flat[order]]  # 0-based place within its expert
        place = torch.empty_like(rank).scatter(0, order, rank).view(T, k)
        return torch.where(place < cap, w, torch.zeros_like(w))

    def calibrate_router_cap(self, inputs) -> None:
        """For ``cap="moderate"``: the smallest cap (in sixteenths of T*k/E) that drops no pair
        of ``inputs``; a router cap that does not bind here but does for other inputs, unless
        the inputs' own load reaches ``T`` (then no cap below ``T`` spares them, the cap is
        ``T`` and never binds: :meth:`router_cap_can_bind` says so, and the layer is dropless)."""
        if self.spec.cap != "moderate":
            return
        q = 1
        with torch.no_grad():
            for x in inputs:
                ids, _ = self._route_dropless(x, x.reshape(-1, x.shape[-1]))
                T, k = ids.shape
                load = int(torch.bincount(ids.reshape(-1), minlength=self.spec.E).max())
                while (T * k * q + 16 * self.spec.E - 1) // (16 * self.spec.E) < load:
                    q += 1
        self.cap_sixteenths = q

    def _route_dropless(self, x, xf):
        s = self.spec
        r = s.router
        if r == "softmax_topk_3d":
            w, ids = torch.topk(torch.softmax(self.gate(x), dim=-1), s.k, dim=-1)
            return ids.reshape(-1, s.k), w.reshape(-1, s.k)
        logits = self.gate(xf)
        if r in ("softmax_topk", "softmax_topk_renorm"):
            w, ids = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), s.k, dim=-1)
            if r == "softmax_topk_renorm":
                w = w / w.sum(dim=-1, keepdim=True)
            return ids, w.to(xf.dtype)
        if r == "softmax_max_top1":
            w, ids = torch.max(torch.softmax(logits, dim=-1), dim=-1)
            return ids.unsqueeze(-1), w.unsqueeze(-1)
        if r == "softmax_argmax_top1":
            probs = torch.softmax(logits, dim=-1)
            ids = torch.argmax(probs, dim=-1, keepdim=True)
            return ids, probs.gather(1, ids)
        if r == "softmax_bias_topk":
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            ids = torch.topk(probs + self.bias, s.k, dim=-1).indices
            w = probs.gather(1, ids)
            return ids, (w / w.sum(dim=-1, keepdim=True)).to(xf.dtype)
        if r == "logits_bias_topk":
            ids = torch.topk(logits.float() + self.bias, s.k, dim=-1).indices
            w = logits.float().gather(1, ids).sigmoid()
            return ids, (w / w.sum(dim=-1, keepdim=True)).to(xf.dtype)
        if r == "logits_topk_softmax":
            vals, ids = torch.topk(logits, s.k, dim=-1)
            return ids, torch.softmax(vals, dim=-1)
        if r == "scaled_logits":
            vals, ids = torch.topk(logits / 0.7, s.k, dim=-1)
            return ids, torch.softmax(vals, dim=-1)
        probs = torch.sigmoid(logits.float())
        if r == "sigmoid_topk_renorm":
            w, ids = torch.topk(probs, s.k, dim=-1)
        else:  # sigmoid_bias_topk: the bias shapes the selection only
            ids = torch.topk(probs + self.bias, s.k, dim=-1).indices
            w = probs.gather(1, ids)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20) * 1.5
        return ids, w.to(xf.dtype)

    def routing(self, x: torch.Tensor):
        """``(P, S, W)``: router probabilities over all experts ([T, E], float32), the model's
        own selection ([T, k] ids) and its gate weights ([T, k])."""
        xf = x.reshape(-1, x.shape[-1])
        ids, w = self._route(x, xf)
        r = self.spec.router
        logits = self.gate(xf)
        if r.startswith("sigmoid"):
            P = torch.sigmoid(logits.float())  # the model's own score, in float32
        elif r in ("softmax_topk_3d", "softmax_max_top1", "softmax_argmax_top1"):
            P = torch.softmax(logits, dim=-1)  # the model's own score, in its dtype (bf16 ties)
        elif r in ("softmax_topk", "softmax_topk_renorm", "softmax_bias_topk"):
            P = torch.softmax(logits, dim=-1, dtype=torch.float32)
        elif r == "scaled_logits":  # logits under a temperature: P = softmax(logits / tau)
            P = torch.softmax(logits.float() / 0.7, dim=-1)
        else:  # top-k of logits: P = softmax of them, for ranking only (SPEC), float32
            P = torch.softmax(logits.float(), dim=-1)
        return P.float(), ids, w
