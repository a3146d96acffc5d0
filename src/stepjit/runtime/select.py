"""Which backend runs a group: explicit choice > STEPJIT_BACKEND > where the arrays live."""

from __future__ import annotations

import functools
import importlib.util
import os

from .backend import Backend
from .cache import warn_once

NAMES = ("reference", "llvm", "cuda")


@functools.cache
def _instance(name: str, device: str) -> Backend:
    if name == "reference":
        from .reference import ReferenceBackend

        return ReferenceBackend()
    if name == "llvm":
        from .cpu import LLVMBackend

        return LLVMBackend()
    from .gpu import CUDABackend

    return CUDABackend(int(device.partition(":")[2] or 0))


@functools.cache
def _llvm_usable() -> str | None:
    """None when the LLVM backend can be used here, else the reason it cannot."""
    try:
        _instance("llvm", "cpu")
    except Exception as exc:  # ImportError, or an LLVM that cannot target this host
        return f"{type(exc).__name__}: {exc}"
    return None


def select_backend(explicit: str | None, devices: set[str]) -> Backend:
    """The backend for arrays on `devices` ('cpu', 'cuda:0', ...)."""
    requested = explicit or os.environ.get("STEPJIT_BACKEND") or None
    if requested is not None and requested not in NAMES:
        source = "backend" if explicit else "STEPJIT_BACKEND"
        raise ValueError(f"unknown {source} {requested!r}; choose one of {', '.join(NAMES)}")
    if len(devices) > 1:
        raise ValueError(f"parameters live on several devices ({', '.join(sorted(devices))})")
    device = next(iter(devices), "cpu")
    on_gpu = device.startswith("cuda")
    if requested is None:
        requested = "cuda" if on_gpu else "llvm"
        if requested == "llvm" and (reason := _llvm_usable()) is not None:
            warn_once("no-llvm", f"the LLVM backend cannot be used ({reason}); "
                      "falling back to the (slow) reference interpreter")
            requested = "reference"
    if requested == "cuda" and not on_gpu:
        hint = ""
        if importlib.util.find_spec("cupy") is None:
            hint = " (and CuPy is not installed: pip install 'stepjit[cuda]')"
        raise ValueError(
            f"backend 'cuda' needs CuPy arrays; these parameters are numpy arrays{hint}"
        )
    if requested in ("llvm", "reference") and on_gpu:
        raise ValueError(f"backend {requested!r} runs on host arrays; these live on {device}")
    return _instance(requested, device)
