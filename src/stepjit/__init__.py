"""stepjit: optimizers whose step() runs compiled, fused multi-tensor kernels.

    import numpy as np, stepjit
    w = stepjit.Parameter(np.zeros(1000, np.float32))
    opt = stepjit.optim.SGD([w], lr=0.1, momentum=0.9)
    w.grad = np.ones(1000, np.float32)
    opt.step()

The update of each parameter group is traced into an IR (`stepjit.ir`), lowered to LLVM IR for
host arrays or CUDA C for CuPy arrays, compiled once per configuration structure and reused.
"""

from . import optim
from ._version import __version__
from .parameter import Parameter
from .runtime.cache import CacheInfo, cache_info, configure_logging, reset_cache_info

configure_logging()

__all__ = ["CacheInfo", "Parameter", "__version__", "cache_info", "optim", "reset_cache_info"]
