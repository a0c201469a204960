"""Every environment variable nsa-gen reads, read here and nowhere else (README lists them)."""
from __future__ import annotations

import os
from pathlib import Path


_CACHE_DIR: tuple[str | None, Path] | None = None


def cache_dir() -> Path:
    """NSA_GEN_CACHE_DIR: where rendered kernel modules are cached (default ~/.cache/nsa-gen).
    Read on every launch (a module lookup is keyed by it), so the Path is kept while the
    variable does not change: building and hashing it took 20 us a launch, 2 us kept (this
    CPU, session 16; the decode profile showed it)."""
    global _CACHE_DIR
    p = os.environ.get("NSA_GEN_CACHE_DIR")
    if _CACHE_DIR is None or _CACHE_DIR[0] != p:
        _CACHE_DIR = (p, Path(p) if p else Path.home() / ".cache" / "nsa-gen")
    return _CACHE_DIR[1]


def db_overlay() -> Path | None:
    """NSA_GEN_DB: a user or model tuning-DB directory consulted before the shipped one."""
    p = os.environ.get("NSA_GEN_DB")
    return Path(p) if p else None


def interpret() -> bool:
    """TRITON_INTERPRET=1: Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_interpreter() -> None:
    """Turn on TRITON_INTERPRET for this process (CPU runs). Triton reads it when it is
    imported (its standard library is jitted then), so this must run before that."""
    import sys
    if "triton" in sys.modules and not interpret():
        raise RuntimeError("TRITON_INTERPRET must be set before triton is imported")
    os.environ["TRITON_INTERPRET"] = "1"


def log_level() -> str:
    """NSA_GEN_LOG: log level of the `nsa_gen` logger (default WARNING)."""
    return os.environ.get("NSA_GEN_LOG", "WARNING").upper()
