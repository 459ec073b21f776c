"""Tools around the compiler: the ``capmoe`` command line (``cli``), the plots of a quality
sweep (``report``) and the lm-evaluation-harness bridge (``lm_eval_bridge``).

Tools may import the test models (``capmoe_compile.testing``); the library never imports tools.
"""
