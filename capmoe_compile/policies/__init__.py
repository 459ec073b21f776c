"""Capacity policies: which pairs an expert past its capacity keeps (SPEC.md, "Policies").

One file per policy, each registering one ``registry.Policy`` by name with
``registry.register_policy`` (re-exported as ``capmoe_compile.routing.register_policy``);
``ranking.py`` holds the ranking primitives they share. ``config.policy``,
``capmoe_compile.route`` and the compiled op take a policy from the registry by its name:
nothing else in the package names one. ``docs/extending.md`` has the recipe for a new one.
"""

from __future__ import annotations

import importlib

#: The built-in policies, in registration order (``routing.POLICIES``).
BUILTIN = ("score", "order", "reverse", "random", "expanded_drop", "reroute")
#: Policies added since, registered after the built-ins: accepted by name everywhere, not
#: iterated over by the sweeps and the calibration search (which keeps recorded figures).
EXTRA = ("priority",)

for _name in BUILTIN + EXTRA:
    importlib.import_module(f"{__name__}.{_name}")
