"""Issue 24: each extension axis has one registry, and nothing outside it branches on its
members' names. Read from the package's source: no comparison (``==``, ``!=``, ``in``) against
a registered policy or kernel name outside ``capmoe_compile/policies/`` and the kernels'
registrations; every router pattern says how it reads P; no module over 600 lines among
those this axis split (``routing.py``, the routers and policies packages)."""

from __future__ import annotations

from pathlib import Path

from source_scan import compares_against

import capmoe_compile
from capmoe_compile import routing
from capmoe_compile.lowering import kernels
from capmoe_compile.passes import routers

ROOT = Path(capmoe_compile.__file__).parent
# calibrate.py's SEARCH_POLICIES filter is being rewritten in another change (issue 24's split
# of calibrate.py); listed here until it lands
ALLOWED: set[str] = set()


def test_no_branch_on_policy_names_outside_the_policies():
    names = set(routing.policy_names())
    hits = compares_against(names, skip={"policies", "testing", "tools", *ALLOWED})
    assert not hits, hits


def test_no_branch_on_kernel_names_outside_their_registrations():
    names = {k.name for k in kernels.kernels()}
    hits = compares_against(names, skip=("testing", "tools"))
    assert not hits, hits


def test_every_router_pattern_says_how_it_reads_p():
    assert routers.ROUTER_PATTERNS, "no router pattern registered"
    for pattern in routers.ROUTER_PATTERNS:
        assert routers.p_rule(pattern), f"{pattern.__name__} has no p_rule"
    priorities = [routers.PATTERNS[p].priority for p in routers.ROUTER_PATTERNS]
    assert priorities == sorted(priorities, reverse=True)


def test_split_modules_fit_600_lines():
    paths = [ROOT / "routing.py", *(ROOT / "policies").glob("*.py")]
    paths += (ROOT / "passes" / "routers").glob("*.py")
    long = [f"{p.name}: {n}" for p in paths if (n := len(p.read_text().splitlines())) > 600]
    assert not long, long
