"""The backends, and which one runs a group: explicit choice > STEPJIT_BACKEND > where the
arrays live.

A backend is one module with a `Backend` subclass, named once in `BACKENDS` with what the rest of
the library reads: the device kind it runs on, whether it is the default there, and the stages
`stepjit dump` can show of it (with their file suffixes). A new backend plugs in here.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass

from .backend import Backend
from .cache import warn_once


@dataclass(frozen=True)
class BackendInfo:
    """What the library knows of a backend before importing it."""

    name: str
    module: str  # imported on first use: `import stepjit` loads no compiler
    cls: str
    device_kind: str  # "cpu" (host arrays) or "cuda"
    default: bool  # chosen for arrays of its device kind when nothing is asked
    stages: dict[str, str]  # dump stage -> file suffix, in pipeline order


BACKENDS: dict[str, BackendInfo] = {
    info.name: info for info in (
        BackendInfo("reference", "stepjit.runtime.reference", "ReferenceBackend", "cpu", False,
                    {"ir": ".ir.txt"}),
        BackendInfo("llvm", "stepjit.runtime.cpu", "LLVMBackend", "cpu", True,
                    {"ir": ".ir.txt", "llvm": ".ll", "llvm-opt": ".opt.ll", "asm": ".s"}),
        BackendInfo("cuda", "stepjit.runtime.gpu", "CUDABackend", "cuda", True,
                    {"ir": ".ir.txt", "cuda": ".cu", "ptx": ".ptx"}),
    )
}
"""Every backend by name."""

NAMES = tuple(BACKENDS)


def device_kind(device: str) -> str:
    """'cpu' or 'cuda' for a device string such as 'cuda:1'."""
    return device.partition(":")[0]


@functools.cache
def _instance(name: str, device: str) -> Backend:
    info = BACKENDS[name]
    cls = getattr(importlib.import_module(info.module), info.cls)
    if info.device_kind == "cpu":
        return cls()
    return cls(int(device.partition(":")[2] or 0))


@functools.cache
def _usable(name: str, device: str) -> str | None:
    """None when backend `name` can be used here, else the reason it cannot."""
    try:
        _instance(name, device)
    except Exception as exc:  # ImportError, or a compiler that cannot target this host
        return f"{type(exc).__name__}: {exc}"
    return None


def select_backend(explicit: str | None, devices: set[str]) -> Backend:
    """The backend for arrays on `devices` ('cpu', 'cuda:0', ...)."""
    requested = explicit or os.environ.get("STEPJIT_BACKEND") or None
    if requested is not None and requested not in BACKENDS:
        source = "backend" if explicit else "STEPJIT_BACKEND"
        raise ValueError(f"unknown {source} {requested!r}; choose one of {', '.join(NAMES)}")
    if len(devices) > 1:
        raise ValueError(f"parameters live on several devices ({', '.join(sorted(devices))})")
    device = next(iter(devices), "cpu")
    kind = device_kind(device)
    if kind not in {info.device_kind for info in BACKENDS.values()}:
        raise ValueError(f"parameters on {device} are not supported (stepjit updates "
                         f"{' and '.join(sorted({i.device_kind for i in BACKENDS.values()}))} "
                         "arrays)")
    if requested is None:
        requested = next(i.name for i in BACKENDS.values() if i.default and i.device_kind == kind)
        if kind == "cpu" and (reason := _usable(requested, device)) is not None:
            warn_once("no-llvm", f"the {requested} backend cannot be used ({reason}); "
                      "falling back to the (slow) reference interpreter")
            requested = "reference"
    want = BACKENDS[requested].device_kind
    if want == "cuda" and kind != "cuda":
        hint = ""
        if importlib.util.find_spec("cupy") is None:
            hint = " (and CuPy is not installed: pip install 'stepjit[cuda]')"
        raise ValueError(
            f"backend {requested!r} needs CuPy arrays; these parameters are numpy arrays{hint}"
        )
    if want == "cpu" and kind != "cpu":
        raise ValueError(f"backend {requested!r} runs on host arrays; these live on {device}")
    return _instance(requested, device)
