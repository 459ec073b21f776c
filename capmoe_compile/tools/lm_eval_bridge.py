"""lm-evaluation-harness on a model compiled with ``backend="capmoe"``.

Importing this module registers the lm-eval model type ``capmoe``: lm-eval's ``HFLM`` whose
forward passes (``loglikelihood``, ``loglikelihood_rolling``, multiple choice) run through
``torch.compile(model, backend="capmoe", options=...)``. Capacity options are model arguments;
every key of ``capmoe_compile.config`` is accepted (``capacity_factor``, ``policy``,
``renormalize``, ``reroute_rounds``, ``seed``, ``min_tokens``, ``min_capacity``,
``capacity_align``, ``capacity_scope``, ``exclude_padding``); ``capacity_factor=none`` is
capacity off. Everything else goes to ``HFLM`` unchanged.

Command line (``pip install 'capmoe-compile[eval]'``), the same arguments as ``lm_eval``::

    python -m capmoe_compile.tools.lm_eval_bridge --model capmoe \\
        --model_args pretrained=allenai/OLMoE-1B-7B-0924,device=cuda,capacity_factor=1.0,policy=score \\
        --tasks hellaswag --batch_size 8

    # the shipped tiny model on the packaged offline task
    python -m capmoe_compile.tools.lm_eval_bridge --model capmoe \\
        --model_args pretrained=tiny_moe,capacity_factor=1.0 \\
        --tasks capmoe_pycode --include_path "$(python -m capmoe_compile.tools.lm_eval_bridge --task-dir)"

(``python -m lm_eval`` alone does not know ``capmoe``: lm-eval registers third-party models
only when their module is imported, which this entry point does first.)

Python::

    import lm_eval
    from capmoe_compile.tools.lm_eval_bridge import CapmoeLM

    lm = CapmoeLM(pretrained="tiny_moe", capacity_factor=1.0, policy="score")
    out = lm_eval.simple_evaluate(model=lm, tasks=[...])
    lm.capmoe_summary()      # pairs dropped / added, modeled EP speedup over the run

Notes:

- ``pretrained=tiny_moe`` (or ``shipped``) is the model shipped in ``capmoe_compile.models``
  (with its byte tokenizer and ``add_bos_token=False``: ByT5's tokenizer would otherwise append
  eos to every context); anything else is what ``HFLM`` accepts (a hub id, a local directory,
  a model object).
- Capacity is per call (``T`` = the batch's tokens). lm-eval right-pads a batch and passes no
  attention mask for causal models, so padding rows count in ``T`` and in loads when
  ``batch_size > 1``; ``batch_size=1`` (the default) has none.
- ``generate_until`` tasks run transformers' ``generate`` on the uncompiled model: capacity is
  off for them (a warning says so once).
- Shapes vary from batch to batch, so the model is compiled with dynamic shapes (one graph;
  model argument ``dynamic=false`` or ``none`` for torch.compile's other modes).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .. import config
from ..telemetry import record_stats

__all__ = ["TASK_DIR", "CapmoeLM", "main", "task_dir"]

#: The packaged offline lm-eval task (``capmoe_pycode``): its jsonl lives here.
TASK_DIR = Path(__file__).resolve().parent.parent / "models" / "tasks"

_SHIPPED = ("tiny_moe", "shipped")


@register_model("capmoe")
class CapmoeLM(HFLM):
    """``HFLM`` whose model calls run compiled by the ``capmoe`` backend with given options."""

    def __init__(
        self,
        pretrained="tiny_moe",
        *,
        dynamic: bool | None = True,
        collect_stats: bool = True,
        **kwargs,
    ) -> None:
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in config.KNOBS}
        self.capmoe_options = self._check(options)
        if isinstance(pretrained, str) and pretrained in _SHIPPED:
            from ..models import load_tiny_moe

            model, tokenizer = load_tiny_moe()
            pretrained = model
            kwargs.setdefault("tokenizer", tokenizer)
            kwargs.setdefault("max_length", model.config.max_position_embeddings)
            # ByT5's tokenizer appends eos to every encoding unless told not to
            kwargs.setdefault("add_bos_token", False)
        super().__init__(pretrained=pretrained, **kwargs)
        # options are applied around each call (config.patch), not baked into the compile:
        # capmoe resolves them at run time, so set_capmoe_options never recompiles
        self._capmoe_fn = torch.compile(self.model, backend="capmoe", dynamic=dynamic)
        self._collect = collect_stats
        self._generate_warned = False
        self.reset_capmoe_stats()

    @staticmethod
    def _check(options: dict) -> dict:
        options = dict(options)
        if isinstance(options.get("capacity_factor"), str):  # "none" / "off" from the CLI
            if options["capacity_factor"].lower() in ("none", "off"):
                options["capacity_factor"] = None
        if isinstance(options.get("local_experts"), str):
            options["local_experts"] = tuple(int(e) for e in options["local_experts"].split())
        config.resolve(options)  # validate: a bad option raises ValueError naming it
        return options

    def set_capmoe_options(self, **options) -> None:
        """Replace the capacity options (``capmoe_compile.config`` knobs) for later calls,
        without recompiling; switching to or from ``expanded_drop`` needs a new instance
        (its graph is wider) after ``torch._dynamo.reset()``."""
        self.capmoe_options = self._check(options)

    # -- statistics ---------------------------------------------------------------------------

    def reset_capmoe_stats(self) -> None:
        self._totals = {
            "calls": 0,
            "layer_calls": 0,
            "pairs": 0,
            "dropped": 0,
            "added": 0,
            "max_before": 0,
            "max_after": 0,
        }

    def capmoe_summary(self) -> dict:
        """Totals over every compiled call since the last reset: pairs (the model's own
        ``T * k``), dropped and added pairs and their shares, and the modeled EP speedup
        (sum of max loads before over after, SPEC.md)."""
        t = dict(self._totals)
        pairs = t["pairs"] or 1
        t["dropped_share"] = t["dropped"] / pairs
        t["added_share"] = t["added"] / pairs
        t["modeled_speedup"] = t["max_before"] / t["max_after"] if t["max_after"] else 1.0
        t["options"] = dict(self.capmoe_options)
        return t

    def _accumulate(self, layers) -> None:
        t = self._totals
        t["calls"] += 1
        for s in layers:
            t["layer_calls"] += 1
            t["pairs"] += int(s.loads_before.sum())
            t["dropped"] += s.dropped
            t["added"] += s.added
            t["max_before"] += int(s.loads_before.max())
            t["max_after"] += int(s.loads_after.max())

    # -- model calls ----------------------------------------------------------------------------

    def _model_call(self, inps, attn_mask=None, labels=None):
        stats_cm = record_stats() if self._collect else contextlib.nullcontext()
        patch = config.patch(**self.capmoe_options)
        with torch.no_grad(), patch, stats_cm as stats:
            if attn_mask is not None or labels is not None:
                out = self._capmoe_fn(input_ids=inps, attention_mask=attn_mask, labels=labels)
            else:
                out = self._capmoe_fn(inps)
        if stats is not None:
            self._accumulate(stats.layers)
        return out.logits

    def _model_generate(self, *args, **kwargs):
        if not self._generate_warned and self.capmoe_options.get("capacity_factor") is not None:
            warnings.warn(
                "capmoe lm-eval bridge: generate_until runs the uncompiled model; capacity is "
                "off for generation tasks",
                stacklevel=2,
            )
            self._generate_warned = True
        return super()._model_generate(*args, **kwargs)


def task_dir() -> Path:
    """A directory with the packaged offline task ``capmoe_pycode`` (multiple choice: which
    continuation of a line of Python is right), to pass as lm-eval's ``include_path``.

    The task's YAML is written there with the absolute path of the packaged jsonl, since
    lm-eval resolves ``data_files`` against the working directory, not the YAML.
    """
    import tempfile

    out = Path(tempfile.gettempdir()) / f"capmoe_lm_eval_tasks_{os.getuid()}"
    out.mkdir(parents=True, exist_ok=True)
    data = TASK_DIR / "pycode.jsonl"
    template = (TASK_DIR / "pycode.yaml").read_text()
    (out / "capmoe_pycode.yaml").write_text(template.replace("@DATA_FILE@", str(data)))
    return out


def main(argv: list[str] | None = None) -> None:
    """``lm_eval``'s command line with the ``capmoe`` model type registered.
    ``--task-dir`` prints the packaged task's directory instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--task-dir"]:
        print(task_dir())
        return
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
