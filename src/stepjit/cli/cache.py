"""`stepjit cache info | clear`: the compiled kernels kept on disk between runs."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from ..runtime.cache import _MAGIC, default_cache_dir, is_temporary

_ENTRY = re.compile(r"[0-9a-f]{16,64}\.(o|cubin|ptx)")  # entries are named by a hash of their key


def is_cache_entry(path: Path) -> bool:
    """Whether `path` is a kernel the library cached: a hash-named file that is a `DiskCache`
    file (with its header) or a CUDA image (the CUDA backend keeps cubin/PTX as they are)."""
    if not _ENTRY.fullmatch(path.name) or path.is_symlink() or not path.is_file():
        return False
    if path.suffix in (".cubin", ".ptx"):
        return path.parent.name == "cuda"
    # without following a link or waiting on a FIFO put there since the checks above
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return False
    try:
        return os.read(fd, len(_MAGIC)) == _MAGIC
    except OSError:
        return False
    finally:
        os.close(fd)


def _backend_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())


def cache_entries(root: Path) -> dict[str, list[Path]]:
    """Kernel files under the cache directory `root`, by backend subdirectory. Only files that
    `is_cache_entry` recognises count: nothing else is ever reported or removed."""
    found: dict[str, list[Path]] = {}
    if not root.is_dir():
        return found
    for sub in _backend_dirs(root):
        files = [path for path in sorted(sub.iterdir()) if is_cache_entry(path)]
        if files:
            found[sub.name] = files
    return found


def cache_temporaries(root: Path) -> list[Path]:
    """Files in the backend subdirectories of the cache directory `root` that a write left
    behind when its process was killed (see `stepjit.runtime.cache.is_temporary`)."""
    if not root.is_dir():
        return []
    return [
        path
        for sub in _backend_dirs(root)
        for path in sorted(sub.iterdir())
        if is_temporary(path) and not path.is_symlink() and path.is_file()
    ]


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover - unreachable


def _info(root: Path, entries: dict[str, list[Path]], temporaries: list[Path]) -> None:
    print(f"location  {root}{'' if root.is_dir() else '  (does not exist yet)'}")
    total_n = total_bytes = 0
    for backend, files in entries.items():
        size = sum(p.stat().st_size for p in files)
        total_n, total_bytes = total_n + len(files), total_bytes + size
        print(f"{backend:<9} {len(files)} entries, {_human(size)}")
    if temporaries:
        size = sum(p.stat().st_size for p in temporaries)
        print(f"{'leftover':<9} {len(temporaries)} temporary files, {_human(size)} (left by "
              "interrupted writes; clear removes them)")
    print(f"{'total':<9} {total_n} entries, {_human(total_bytes)}")


def _clear(root: Path, entries: dict[str, list[Path]], temporaries: list[Path]) -> None:
    removed = 0
    for files in entries.values():
        for path in files:
            path.unlink(missing_ok=True)
            removed += 1
    for path in temporaries:
        path.unlink(missing_ok=True)
    also = f" and {len(temporaries)} temporary files" if temporaries else ""
    print(f"removed {removed} entries{also} from {root}")


def command(args: argparse.Namespace) -> int:
    """`stepjit cache info | clear`."""
    root = default_cache_dir()
    action = _info if args.action == "info" else _clear
    action(root, cache_entries(root), cache_temporaries(root))
    return 0


def add_parser(commands) -> argparse.ArgumentParser:
    """Add `stepjit cache` to the subcommands `commands`."""
    cache = commands.add_parser(
        "cache", help="show or clear the on-disk kernel cache",
        description="The compiled kernels kept on disk between runs (STEPJIT_CACHE_DIR, else the "
        "user's cache directory). info: location, entries and size per backend; clear: remove "
        "every entry (kernels are recompiled when next needed) and any temporary file an "
        "interrupted write left behind.",
    )
    cache.add_argument("action", choices=("info", "clear"), help="info or clear")
    cache.set_defaults(func=command)
    return cache
