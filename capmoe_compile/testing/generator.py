"""Random MoE layers, spelled the many ways people write them, with their own SPEC oracle.

A :class:`LayerSpec` combines a router spelling, a dispatch spelling and an expert form; a
:class:`GeneratedMoE` computes it in plain PyTorch, exactly as written (the model under test).
Independently of capmoe's passes, each layer also knows SPEC.md's view of itself:
``routing(x)`` gives the router probabilities ``P``, the model's selection ``S`` and gate
weights ``W``; ``experts(x, ids, weights)`` runs the experts on any assignment (sentinel ``E``
skipped), so :func:`oracle` gives what a capacity-aware layer must compute, through
``capmoe_compile.route``.

Some spellings are layers capmoe must *not* rewrite as dropless (``bmm_own_capacity`` drops
pairs past the model's own capacity): for those the only promise is "left as written", and the
differential check below treats a rewrite that changes the output as wrong. ``scaled_logits``
(top-k over ``logits / tau``) is identified by SPEC's temperature rule, ``P = softmax(logits /
tau)``, and is checked against the oracle like the other routers.

Issue 23's additions: capacity enforced in the router (``router_cap``: the gate weight of pairs
past the layer's own capacity zeroed, positions from a cumsum over the flat one-hot, per top-k
slot, or an argsort rank by expert or by weight; ``cap`` binding, moderate (not binding on the
check's own inputs, binding on others) or never (``C = T``)): SPEC's token-wise rule says such a
layer is left as written unless its cap can never bind, so ``expected_match`` is False and the
check expects eager with capacity on. A ``moderate`` cap that the check's own inputs push up to
``C = T`` never binds either: :meth:`GeneratedMoE.may_rewrite` judges the layer as calibrated,
and the check holds such a layer to the oracle like a ``never`` one. Dispatch by ``torch.split(rows, counts.tolist())``
(``split_tolist``, ``split_index_add``). bf16 models of several layers (:class:`ModelSpec`).
Configuration switches between calls of one compiled model (:class:`Step`,
:func:`switch_steps`). :func:`check` compiles with ``backend="capmoe"`` itself and with a
reference backend (Inductor, or Dynamo + AOT eager), and counts a capmoe failure where the
reference compiles as wrong.

Used by ``tests/test_generator.py`` (a seeded subset in CI) and
``benchmarks/layer_generator.py`` (thousands).

The pieces, one module each: the spellings and specs (``generator_spec``: routers, dispatches,
expert forms, router caps, :class:`LayerSpec`, :class:`ModelSpec`), the layer's routers
(``generator_routers``) and dispatches with their expert modules (``generator_dispatch``), the
layer and model with the oracle (``generator_model``), and the differential check
(``generator_check``). This module re-exports their public names.
"""

from __future__ import annotations

from capmoe_compile.testing.generator_check import DEFAULTS as DEFAULTS
from capmoe_compile.testing.generator_check import POLICIES as POLICIES
from capmoe_compile.testing.generator_check import Outcome as Outcome
from capmoe_compile.testing.generator_check import Step as Step
from capmoe_compile.testing.generator_check import check as check
from capmoe_compile.testing.generator_check import expected as expected
from capmoe_compile.testing.generator_check import inner_compiler as inner_compiler
from capmoe_compile.testing.generator_check import switch_steps as switch_steps
from capmoe_compile.testing.generator_model import GeneratedModel as GeneratedModel
from capmoe_compile.testing.generator_model import GeneratedMoE as GeneratedMoE
from capmoe_compile.testing.generator_model import capacity_would_bind as capacity_would_bind
from capmoe_compile.testing.generator_model import close as close
from capmoe_compile.testing.generator_model import oracle as oracle
from capmoe_compile.testing.generator_model import tolerance as tolerance
from capmoe_compile.testing.generator_spec import ACTIVATIONS as ACTIVATIONS
from capmoe_compile.testing.generator_spec import ALPHA as ALPHA
from capmoe_compile.testing.generator_spec import CAP_KINDS as CAP_KINDS
from capmoe_compile.testing.generator_spec import DISPATCHES as DISPATCHES
from capmoe_compile.testing.generator_spec import FORMS as FORMS
from capmoe_compile.testing.generator_spec import LIMIT as LIMIT
from capmoe_compile.testing.generator_spec import LOOPS as LOOPS
from capmoe_compile.testing.generator_spec import MODEL_EVERY as MODEL_EVERY
from capmoe_compile.testing.generator_spec import ROUTER_CAP_SHARE as ROUTER_CAP_SHARE
from capmoe_compile.testing.generator_spec import ROUTER_CAPS as ROUTER_CAPS
from capmoe_compile.testing.generator_spec import ROUTERS as ROUTERS
from capmoe_compile.testing.generator_spec import SOFTCAP as SOFTCAP
from capmoe_compile.testing.generator_spec import TOP1 as TOP1
from capmoe_compile.testing.generator_spec import Case as Case
from capmoe_compile.testing.generator_spec import LayerSpec as LayerSpec
from capmoe_compile.testing.generator_spec import ModelSpec as ModelSpec
from capmoe_compile.testing.generator_spec import cases as cases
from capmoe_compile.testing.generator_spec import hidden_of as hidden_of
from capmoe_compile.testing.generator_spec import random_model as random_model
from capmoe_compile.testing.generator_spec import random_spec as random_spec
from capmoe_compile.testing.generator_spec import specs as specs
