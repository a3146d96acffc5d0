"""Compile counters shared by every backend (`stepjit.cache_info()`)."""

from __future__ import annotations

import dataclasses
import threading


@dataclasses.dataclass
class CacheInfo:
    """How kernels were obtained since the process started (or since `reset_cache_info()`).

    compiles:        kernels built from scratch (IR lowered and compiled)
    memory_hits:     kernels found already loaded in this process
    disk_hits:       kernels loaded from the on-disk cache of an earlier process
    compile_seconds: wall time spent compiling and loading
    """

    compiles: int = 0
    memory_hits: int = 0
    disk_hits: int = 0
    compile_seconds: float = 0.0


_stats = CacheInfo()
_lock = threading.Lock()


def record(*, compiles: int = 0, memory_hits: int = 0, disk_hits: int = 0, seconds: float = 0.0):
    with _lock:
        _stats.compiles += compiles
        _stats.memory_hits += memory_hits
        _stats.disk_hits += disk_hits
        _stats.compile_seconds += seconds


def cache_info() -> CacheInfo:
    """A snapshot of the compile counters."""
    with _lock:
        return dataclasses.replace(_stats)


def reset_cache_info() -> None:
    with _lock:
        _stats.compiles = _stats.memory_hits = _stats.disk_hits = 0
        _stats.compile_seconds = 0.0
