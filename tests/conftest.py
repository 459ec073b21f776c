"""Suite-wide setup. Keep the TRITON_INTERPRET block first: it must run before triton is imported."""

import os

import torch  # importing torch does not import triton

# Without a GPU, the hand-written Triton kernels (capmoe_compile/lowering/triton_moe.py) run in
# Triton's interpreter on CPU tensors. Triton reads TRITON_INTERPRET when it is imported, so it
# is set here, before any test module is imported. It only changes what ``@triton.jit`` returns;
# Inductor's CPU code generation (C++) does not use triton. With CUDA the kernels run compiled.
# An explicit TRITON_INTERPRET in the environment wins.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# The files whose Inductor compiles take longest, slowest first (measured with `--durations`
# on a cold cache). CI runs whole files per worker (`-n 2 --dist loadfile`), handed out in
# collection order; alphabetical order started the slowest file (test_zoo_compile) last, and
# it then ran alone for minutes at the end. Starting these first leaves the short files to
# fill in beside them. Only the order changes; every test still runs.
SLOW_FIRST = (
    "test_zoo_compile.py",
    "test_lowering.py",
    "test_distributed.py",
    "test_serving.py",
    "test_families.py",
    "test_triton_moe.py",
    "test_generate.py",
    "test_generator.py",
    "test_calibrate.py",
    "test_passes.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable
