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
