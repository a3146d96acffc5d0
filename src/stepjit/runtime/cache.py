"""Compile counters shared by every backend (`stepjit.cache_info()`), the on-disk cache, and the
checks of what it holds before a loader is given it (`read_elf`)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import stat
import struct
import sys
import tempfile
import threading
import warnings
from collections.abc import Mapping
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


MAX_ENTRY_BYTES = 64 << 20
"""Cache files larger than this are not read (the entry is recompiled)."""

# Never follow a link, never wait for a writer (a FIFO), never leak the descriptor to a child.
_READ_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
_TEMPORARY = re.compile(r"\.tmp-[a-z0-9_]{8}")  # the names tempfile.mkstemp(prefix=".tmp-") makes


def is_temporary(path: Path) -> bool:
    """Whether `path` is named like the file `DiskCache.put` writes before renaming it into place
    (one is left behind when a process is killed while writing)."""
    return bool(_TEMPORARY.fullmatch(path.name))


def _distrust(st: os.stat_result) -> str | None:
    """Why a cache file or directory with this status must not be used, or None.

    The cache holds code this process will run: only its owner may be able to write it.
    """
    if not hasattr(os, "getuid"):
        return None
    if st.st_uid != os.getuid():
        return f"is owned by another user (uid {st.st_uid}, you are {os.getuid()})"
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IWOTH:
        return f"is writable by other users (mode {mode:04o})"
    if mode & stat.S_IWGRP:
        return f"is writable by its group (mode {mode:04o})"
    return None


def _make_private_dirs(path: Path) -> None:
    """Create `path` and its missing parents, each with mode 0700 whatever the umask.

    Directories that already exist are left as they are.
    """
    missing = []
    current = path
    while not os.path.lexists(current) and current.parent != current:
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:  # made meanwhile by another process, which makes it private
            continue
        os.chmod(directory, 0o700)  # the umask may have taken bits from the owner too


def _read_private_file(path: Path) -> bytes | None:
    """The contents of `path` if it is a regular file that only this user can write and no larger
    than `MAX_ENTRY_BYTES`; else None. Checked on the open descriptor before anything is read."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a symbolic link (ELOOP), a device without a reader, no permission
        log.debug("cache file %s not opened: %s", path, exc)
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            log.debug("cache file %s is not a regular file; recompiling", path)
            return None
        reason = _distrust(st)
        if reason is not None:
            warn_once(f"trust:{path}", f"cache file {path} is not private to you ({reason}); "
                      "recompiling")
            return None
        if st.st_size > MAX_ENTRY_BYTES:
            log.debug("cache file %s is larger than %d bytes; recompiling", path, MAX_ENTRY_BYTES)
            return None
        chunks, size = [], 0
        while size <= st.st_size:
            chunk = os.read(fd, st.st_size + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        log.debug("cache read failed for %s: %s", path, exc)
        return None
    finally:
        os.close(fd)
    if size != st.st_size:  # changed while being read: not something DiskCache.put does
        log.debug("cache file %s changed size while being read; recompiling", path)
        return None
    return b"".join(chunks)


class DiskCache:
    """Compiled code on disk: private to the user, checksummed, written atomically.

    The cache directory and every directory stepjit creates for it are made private (0700). A
    directory owned by another user or writable by its group or by others is not used (one
    warning; caching in memory only). A file is opened without following links or blocking and
    checked before it is read: it must be a regular file owned by this user, writable by nobody
    else, and at most `MAX_ENTRY_BYTES` long. A file that fails these checks, or whose checksum
    does not match (corrupt or truncated), is a miss: recompiled and overwritten. The checksum
    detects damage, it does not authenticate: what the file holds is checked again by the backend
    that loads it.
    """

    def __init__(self, subdir: str, suffix: str) -> None:
        self.subdir, self.suffix = subdir, suffix

    @property
    def directory(self) -> Path:
        return default_cache_dir() / self.subdir

    def _usable_dir(self) -> Path | None:
        root = default_cache_dir()
        d = root / self.subdir
        try:
            _make_private_dirs(d)
            reasons = [(p, _distrust(p.stat())) for p in (root, d)]
        except OSError as exc:
            warn_once(f"dir:{d}", f"kernel cache {d} is unusable ({exc}); caching in memory only")
            return None
        for p, reason in reasons:
            if reason is not None:
                remedy = f"; `chmod go-w {p}` makes it private" if "writable" in reason else ""
                warn_once(f"trust:{p}", f"kernel cache directory {p} {reason}, so no code is "
                          f"loaded from it (caching in memory only){remedy}")
                return None
        if not os.access(d, os.W_OK | os.X_OK):
            warn_once(f"dir:{d}", f"kernel cache {d} is not writable; caching in memory only")
            return None
        return d

    def get(self, key: str) -> bytes | None:
        """The payload stored under `key`, or None (missing, not a private regular file, too
        large, or corrupt)."""
        d = self._usable_dir()
        if d is None:
            return None
        path = d / f"{key}{self.suffix}"
        blob = _read_private_file(path)
        if blob is None:
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
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
        except FileNotFoundError as exc:  # the cache was cleared while this was being written
            log.debug("cache write to %s abandoned: %s", d, exc)
        except OSError as exc:
            warn_once(f"write:{d}", f"cannot write to kernel cache {d} ({exc}); "
                      "caching in memory only")

    def entries(self) -> list[Path]:
        """The files of this cache's entries."""
        d = self.directory
        return sorted(d.glob(f"*{self.suffix}")) if d.is_dir() else []

    def temporaries(self) -> list[Path]:
        """Files `put` was writing when its process was killed (see `is_temporary`)."""
        d = self.directory
        return sorted(p for p in d.glob(".tmp-*") if is_temporary(p)) if d.is_dir() else []

    def clear(self) -> int:
        """Remove every entry and leftover temporary file; return how many entries were
        removed."""
        for p in self.temporaries():
            p.unlink(missing_ok=True)
        removed = 0
        for p in self.entries():
            p.unlink(missing_ok=True)
            removed += 1
        return removed


# -- what a loader may be given --------------------------------------------------------------------
# A checksum cannot tell a well-formed image from a malformed one stored with a valid checksum,
# and loaders (LLVM's RuntimeDyld, the CUDA driver) trust the structure of what they are given: an
# offset or index out of bounds crashes the process. Backends check every entry with `read_elf`.
class MalformedEntry(ValueError):
    """A cache entry whose contents a loader must not be given (the entry is treated as a miss)."""


ET_REL, ET_EXEC = 1, 2
SHT_NULL, SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_RELA, SHT_NOBITS, SHT_REL = 0, 1, 2, 3, 4, 8, 9
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR, SHF_MERGE, SHF_STRINGS, SHF_INFO_LINK = (
    0x1, 0x2, 0x4, 0x10, 0x20, 0x40)
SHN_ABS = 0xFFF1
STB_LOCAL, STB_GLOBAL, STB_WEAK = 0, 1, 2
STT_NOTYPE, STT_OBJECT, STT_FUNC, STT_SECTION, STT_FILE = 0, 1, 2, 3, 4

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM = struct.Struct("<IBBHQQ")
_RELA = struct.Struct("<QQq")
_REL = struct.Struct("<QQ")
_TABLE_ENTRY = {SHT_SYMTAB: _SYM.size, SHT_RELA: _RELA.size, SHT_REL: _REL.size}
_NO_CONTENTS = {SHT_NULL, SHT_NOBITS, SHT_SYMTAB, SHT_STRTAB, SHT_RELA, SHT_REL}

MAX_SECTIONS = 4096
MAX_SEGMENTS = 64
MAX_SYMBOLS = 1 << 16
MAX_RELOCATIONS = 1 << 18
MAX_ALIGN = 4096
MAX_NOBITS = 16 << 20  # bytes a section or segment may ask for beyond what the file holds


@dataclasses.dataclass(frozen=True)
class ElfRules:
    """What one loader accepts, beyond what `read_elf` requires of every file.

    file_type, machine: the required e_type and e_machine (None: any machine); osabi: the
        allowed e_ident[EI_OSABI] values.
    section_types: the allowed sh_type values (None: any; those `read_elf` knows are still checked).
    section_flags: the sh_flags bits a section may have.
    forbidden_sections: section names refused (sections a loader interprets, such as .eh_frame).
    relocation_sizes: relocation type -> bytes it patches (None: any type, patching at least one
        byte inside its section).
    symbol_types, symbol_binds: the allowed st_type and st_bind values (None: any).
    absolute_types: the st_type values an absolute symbol may have (None: any).
    locals_first: whether local symbols must precede the others, as the ELF format requires (CUDA
        cubins do not keep to it).
    aligned: whether the section header table and every section lie at offsets aligned as their
        contents require (LLVM refuses files where they do not; CUDA cubins do not keep to it).
    program_headers: whether the file has a program header table (else it must have none).
    """

    file_type: int
    machine: int | None
    osabi: frozenset[int] = frozenset({0})
    section_types: frozenset[int] | None = None
    section_flags: int = ~0
    forbidden_sections: frozenset[str] = frozenset()
    relocation_sizes: Mapping[int, int] | None = None
    symbol_types: frozenset[int] | None = None
    symbol_binds: frozenset[int] | None = None
    absolute_types: frozenset[int] | None = None
    locals_first: bool = True
    aligned: bool = True
    program_headers: bool = False


@dataclasses.dataclass(frozen=True)
class ElfSection:
    """One section header (offsets and sizes in bytes)."""

    index: int
    name: str
    type: int
    flags: int
    offset: int
    size: int
    link: int
    info: int
    align: int


@dataclasses.dataclass(frozen=True)
class ElfSymbol:
    """One symbol; `section` is its st_shndx (0: undefined, `SHN_ABS`: absolute)."""

    name: str
    bind: int
    type: int
    section: int
    value: int
    size: int

    @property
    def defined(self) -> bool:
        """Whether this file defines the symbol (else the loader must find it elsewhere)."""
        return self.section != 0


@dataclasses.dataclass(frozen=True)
class ElfRelocation:
    """One relocation of section `section` at `offset`, against symbol number `symbol`."""

    section: int
    offset: int
    type: int
    symbol: int
    addend: int


@dataclasses.dataclass(frozen=True)
class ElfFile:
    """The parts of a checked ELF file that its loader uses."""

    flags: int
    sections: tuple[ElfSection, ...]
    symbols: tuple[ElfSymbol, ...]
    relocations: tuple[ElfRelocation, ...]


def read_elf(data: bytes, rules: ElfRules) -> ElfFile:
    """Parse a 64-bit little-endian ELF file, checking everything its loader trusts.

    Checked: the header fields; the program and section header tables and every segment and
    section lie inside `data`, do not overlap, and have power-of-two alignments; string tables are
    NUL-terminated and every name lies inside its table; symbol, relocation and string table
    links and entry sizes; every symbol's section index, and its value and size inside that
    section; every relocation's symbol index, type, and the bytes it patches inside its section;
    and `rules`. Raises `MalformedEntry` saying what is wrong. What the sections hold (machine
    code, constants) is not checked: the checksum and the directory's ownership protect it.
    """
    try:
        return _read_elf(data, rules)
    except MalformedEntry:
        raise
    except (struct.error, IndexError, ValueError) as exc:  # a check missing above: still a miss
        raise MalformedEntry(f"unreadable: {exc}") from exc


def _read_elf(data: bytes, rules: ElfRules) -> ElfFile:
    size = len(data)
    if size < _EHDR.size:
        raise MalformedEntry(f"{size} bytes: shorter than an ELF header")
    (ident, file_type, machine, version, entry, phoff, shoff, flags, ehsize, phentsize, phnum,
     shentsize, shnum, shstrndx) = _EHDR.unpack_from(data)
    if ident[:7] != b"\x7fELF\x02\x01\x01":
        raise MalformedEntry("not a 64-bit little-endian ELF file of version 1")
    if ident[7] not in rules.osabi or any(ident[9:]):
        raise MalformedEntry(f"unexpected OS ABI {ident[7]} or identification padding")
    expected_machine = machine if rules.machine is None else rules.machine
    if (file_type, machine, version) != (rules.file_type, expected_machine, 1):
        raise MalformedEntry(f"type {file_type}, machine {machine}, version {version}: expected "
                             f"{rules.file_type}, {expected_machine}, 1")
    if ehsize != _EHDR.size or shentsize != _SHDR.size:
        raise MalformedEntry(f"header sizes {ehsize}, {shentsize}")
    if file_type == ET_REL and entry:
        raise MalformedEntry("a relocatable file with an entry point")
    spans = [(0, _EHDR.size, "the ELF header")]

    if rules.program_headers:
        if phentsize != _PHDR.size or not 0 < phnum <= MAX_SEGMENTS:
            raise MalformedEntry(f"{phnum} program headers of {phentsize} bytes")
        _check_span(phoff, phnum * _PHDR.size, size, "the program header table")
        spans.append((phoff, phoff + phnum * _PHDR.size, "the program header table"))
        for i in range(phnum):
            _, _, offset, _, _, filesz, memsz, align = _PHDR.unpack_from(
                data, phoff + i * _PHDR.size)
            _check_span(offset, filesz, size, f"segment {i}")
            if not filesz <= memsz <= filesz + MAX_NOBITS or not _is_alignment(align):
                raise MalformedEntry(f"segment {i}: memory size {memsz}, alignment {align}")
    elif phoff or phnum or phentsize:
        raise MalformedEntry("a program header table where none belongs")

    if not 0 < shnum <= MAX_SECTIONS:
        raise MalformedEntry(f"{shnum} sections")
    _check_span(shoff, shnum * _SHDR.size, size, "the section header table",
                align=8 if rules.aligned else 1)
    spans.append((shoff, shoff + shnum * _SHDR.size, "the section header table"))
    headers = [_SHDR.unpack_from(data, shoff + i * _SHDR.size) for i in range(shnum)]
    if any(headers[0]):
        raise MalformedEntry("section 0 is not the null section")
    if not 0 < shstrndx < shnum:
        raise MalformedEntry(f"section name table index {shstrndx} of {shnum} sections")
    section_names = _string_table(data, headers[shstrndx], "the section name table")

    sections = [ElfSection(0, "", SHT_NULL, 0, 0, 0, 0, 0, 0)]
    for i, (name, kind, sflags, addr, offset, length, link, info, align, entsize) in enumerate(
        headers[1:], start=1
    ):
        label = _string(data, section_names, name, f"the name of section {i}")
        where = f"section {i} ({label})"
        if rules.section_types is not None and kind not in rules.section_types:
            raise MalformedEntry(f"{where} has type {kind:#x}")
        if label in rules.forbidden_sections:
            raise MalformedEntry(f"{where} is not loaded from a cache")
        if sflags & ~rules.section_flags:
            raise MalformedEntry(f"{where} has flags {sflags:#x}")
        if file_type == ET_REL and addr:
            raise MalformedEntry(f"{where} has an address in a relocatable file")
        if not _is_alignment(align):
            raise MalformedEntry(f"{where} has alignment {align}")
        if link >= shnum or (sflags & SHF_INFO_LINK and not 0 < info < shnum):
            raise MalformedEntry(f"{where} links to section {link} / {info} of {shnum}")
        if kind == SHT_NOBITS:
            if length > MAX_NOBITS:
                raise MalformedEntry(f"{where} asks for {length} bytes")
        else:
            _check_span(offset, length, size, where, align=max(align, 1) if rules.aligned else 1)
            if length:
                spans.append((offset, offset + length, where))
        if kind in _TABLE_ENTRY and (
            entsize != _TABLE_ENTRY[kind] or length % entsize or rules.aligned and offset % 8
        ):
            raise MalformedEntry(f"{where}: entries of {entsize} bytes in {length} at {offset}")
        if kind == SHT_STRTAB:
            _string_table(data, headers[i], where)
        sections.append(ElfSection(i, label, kind, sflags, offset, length, link, info, align))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise MalformedEntry(f"{first} overlaps {second}")

    symbols = _symbols(data, sections, headers, rules)
    relocations = _relocations(data, sections, symbols, rules)
    return ElfFile(flags, tuple(sections), tuple(symbols), tuple(relocations))


def _is_alignment(value: int) -> bool:
    return value <= MAX_ALIGN and value & (value - 1) == 0


def _check_span(offset: int, length: int, size: int, what: str, align: int = 1) -> None:
    if offset > size or length > size - offset or offset % align:
        raise MalformedEntry(f"{what}: {length} bytes at {offset} in a file of {size}")


def _string_table(data: bytes, header: tuple, what: str) -> tuple[int, int]:
    """(offset, size) of a string table, checked to start and end with NUL."""
    kind, offset, length = header[1], header[4], header[5]
    if kind != SHT_STRTAB or length == 0 or offset + length > len(data):
        raise MalformedEntry(f"{what} is not a string table inside the file")
    if data[offset] != 0 or data[offset + length - 1] != 0:
        raise MalformedEntry(f"{what} does not start and end with NUL")
    return offset, length


def _string(data: bytes, table: tuple[int, int], index: int, what: str) -> str:
    offset, length = table
    if index >= length:
        raise MalformedEntry(f"{what} is past the end of its string table")
    start = offset + index
    raw = data[start : data.index(b"\0", start)]
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedEntry(f"{what} is not ASCII") from None


def _symbols(data: bytes, sections: list[ElfSection], headers: list[tuple],
             rules: ElfRules) -> list[ElfSymbol]:
    tables = [s for s in sections if s.type == SHT_SYMTAB]
    if not tables:
        return []
    if len(tables) > 1:
        raise MalformedEntry("more than one symbol table")
    table = tables[0]
    count = table.size // _SYM.size
    if not 0 < count <= MAX_SYMBOLS or table.info > count:
        raise MalformedEntry(f"{count} symbols, the first global at {table.info}")
    names = _string_table(data, headers[table.link], "the symbol name table")
    if any(_SYM.unpack_from(data, table.offset)):
        raise MalformedEntry("symbol 0 is not the null symbol")
    symbols = [ElfSymbol("", STB_LOCAL, STT_NOTYPE, 0, 0, 0)]
    for k in range(1, count):
        name, info, _, shndx, value, length = _SYM.unpack_from(data, table.offset + k * _SYM.size)
        bind, kind = info >> 4, info & 0xF
        where = f"symbol {k}"
        if rules.locals_first and (bind == STB_LOCAL) != (k < table.info):
            raise MalformedEntry(f"{where} is out of order (locals come first)")
        if rules.symbol_binds is not None and bind not in rules.symbol_binds:
            raise MalformedEntry(f"{where} has binding {bind}")
        if rules.symbol_types is not None and kind not in rules.symbol_types:
            raise MalformedEntry(f"{where} has type {kind}")
        label = _string(data, names, name, f"the name of {where}")
        where = f"symbol {k} ({label})"
        if kind == STT_SECTION and not 0 < shndx < len(sections):
            raise MalformedEntry(f"{where} names section {shndx}")
        if kind == STT_FILE and shndx != SHN_ABS:
            raise MalformedEntry(f"{where} is a file name that is not absolute")
        if shndx == SHN_ABS:
            if rules.absolute_types is not None and kind not in rules.absolute_types:
                raise MalformedEntry(f"{where} of type {kind} is absolute")
        elif shndx >= len(sections):
            raise MalformedEntry(f"{where} is in section {shndx}")
        elif shndx and kind != STT_SECTION:
            section = sections[shndx]
            if value > section.size or length > section.size - value:
                raise MalformedEntry(f"{where} is not inside section {section.name}")
        symbols.append(ElfSymbol(label, bind, kind, shndx, value, length))
    return symbols


def _relocations(data: bytes, sections: list[ElfSection], symbols: list[ElfSymbol],
                 rules: ElfRules) -> list[ElfRelocation]:
    relocations: list[ElfRelocation] = []
    symtab = next((s.index for s in sections if s.type == SHT_SYMTAB), None)
    for section in sections:
        if section.type not in (SHT_RELA, SHT_REL):
            continue
        where = f"relocation section {section.name}"
        if section.link != symtab or not 0 < section.info < len(sections):
            raise MalformedEntry(f"{where} links to sections {section.link} / {section.info}")
        target = sections[section.info]
        if target.type in _NO_CONTENTS:
            raise MalformedEntry(f"{where} patches section {target.name}, which has no contents")
        entry = _RELA if section.type == SHT_RELA else _REL
        count = section.size // entry.size
        if len(relocations) + count > MAX_RELOCATIONS:
            raise MalformedEntry(f"more than {MAX_RELOCATIONS} relocations")
        for k in range(count):
            fields = entry.unpack_from(data, section.offset + k * entry.size)
            offset, info, addend = fields if entry is _RELA else (*fields, 0)
            symbol, kind = info >> 32, info & 0xFFFFFFFF
            if symbol >= len(symbols):
                raise MalformedEntry(f"{where}[{k}] refers to symbol {symbol} of {len(symbols)}")
            patched = 1
            if rules.relocation_sizes is not None:
                # LLVM resolves a relocation against a section symbol by its section and against
                # any other by its name; nothing else (no symbol, a file name) is resolvable.
                patched = rules.relocation_sizes.get(kind, 0)
                against = symbols[symbol]
                if not patched or symbol == 0 or against.type == STT_FILE or (
                    against.type != STT_SECTION and not against.name
                ):
                    raise MalformedEntry(f"{where}[{k}] has type {kind} against symbol {symbol}")
            if patched > target.size or offset > target.size - patched:
                raise MalformedEntry(f"{where}[{k}] patches {patched} bytes at {offset} of "
                                     f"{target.size}")
            relocations.append(ElfRelocation(section.info, offset, kind, symbol, addend))
    return relocations
