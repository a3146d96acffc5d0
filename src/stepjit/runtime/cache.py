"""Compile counters shared by every backend (`stepjit.cache_info()`), and the on-disk cache."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import stat
import sys
import tempfile
import threading
import warnings
from pathlib import Path


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


# -- the on-disk cache of compiled code -----------------------------------------------------------

log = logging.getLogger("stepjit")


def configure_logging() -> None:
    """STEPJIT_LOG=debug (or info, warning) sends the library's log to stderr."""
    level = os.environ.get("STEPJIT_LOG")
    if level and not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("stepjit %(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(getattr(logging, level.upper(), logging.DEBUG))

_MAGIC = b"STEPJIT\x01"
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Issue `message` as a RuntimeWarning the first time `key` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"stepjit: {message}", RuntimeWarning, stacklevel=3)


def default_cache_dir() -> Path:
    """STEPJIT_CACHE_DIR, else the platform's per-user cache directory."""
    env = os.environ.get("STEPJIT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local"
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "stepjit"


def _trusted(path: Path, st: os.stat_result) -> bool:
    """Owned by this user and writable by nobody else (the cache holds code we will run)."""
    if not hasattr(os, "getuid"):
        return True
    return st.st_uid == os.getuid() and not (st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


class DiskCache:
    """Compiled code on disk: private to the user, checksummed, written atomically.

    A file that is corrupted, truncated, or not trusted (another owner, or writable by others) is
    ignored and recompiled; a directory that cannot be created or written makes the cache
    memory-only, with one warning.
    """

    def __init__(self, subdir: str, suffix: str) -> None:
        self.subdir, self.suffix = subdir, suffix

    @property
    def directory(self) -> Path:
        return default_cache_dir() / self.subdir

    def _usable_dir(self) -> Path | None:
        d = self.directory
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = d.stat()
        except OSError as exc:
            warn_once(f"dir:{d}", f"kernel cache {d} is unusable ({exc}); caching in memory only")
            return None
        if not _trusted(d, st) or not _trusted(d.parent, d.parent.stat()):
            warn_once(f"trust:{d}", f"kernel cache {d} is writable by other users or not owned "
                      "by you; not using it (caching in memory only)")
            return None
        if not os.access(d, os.W_OK | os.X_OK):
            warn_once(f"dir:{d}", f"kernel cache {d} is not writable; caching in memory only")
            return None
        return d

    def path(self, key: str) -> Path:
        return self.directory / f"{key}{self.suffix}"

    def get(self, key: str) -> bytes | None:
        """The payload stored under `key`, or None (missing, corrupt or untrusted)."""
        d = self._usable_dir()
        if d is None:
            return None
        path = d / f"{key}{self.suffix}"
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                blob = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.debug("cache read failed for %s: %s", path, exc)
            return None
        if not _trusted(path, st):
            warn_once(f"trust:{path}", f"cache file {path} is not private to you; recompiling")
            return None
        header = len(_MAGIC) + 32
        payload = blob[header:]
        if (
            len(blob) < header
            or blob[: len(_MAGIC)] != _MAGIC
            or hashlib.sha256(payload).digest() != blob[len(_MAGIC) : header]
        ):
            log.debug("cache file %s is corrupt; recompiling", path)
            return None
        return payload

    def put(self, key: str, payload: bytes) -> None:
        """Store `payload` under `key` (atomically: readers see the old file or the new one)."""
        d = self._usable_dir()
        if d is None:
            return
        blob = _MAGIC + hashlib.sha256(payload).digest() + payload
        try:
            fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
                os.replace(tmp, d / f"{key}{self.suffix}")
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:
            warn_once(f"write:{d}", f"cannot write to kernel cache {d} ({exc}); "
                      "caching in memory only")

    def entries(self) -> list[Path]:
        d = self.directory
        return sorted(d.glob(f"*{self.suffix}")) if d.is_dir() else []

    def clear(self) -> int:
        """Remove every entry; return how many were removed."""
        removed = 0
        for p in self.entries():
            p.unlink(missing_ok=True)
            removed += 1
        return removed
