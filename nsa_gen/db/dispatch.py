"""Runtime dispatch: which config to launch kernel `stem` with, for a spec and a shape.

Lookup order: overlays (paths given in code, then NSA_GEN_DB), then the DB shipped with
the package, then (for a key with a `KernelDef.fallback`, e.g. selection_fwd_gated) the
fallback kernel's own lookup, then the kernel's heuristic default. Among DB entries for the
same kernel source and spec, the exact device comes first (another board of the same architecture
only where the device has none), then the nearest shape in log2(T, B) space (an exact one
first; token-count params, a split length, are scaled to the shape: `KernelDef.at_shape`),
and an earlier source beats a later one at equal distance. Every candidate is checked
against the device's limits before use.

Nothing is timed here. The first call for a (kernel, spec, shape, device) reads the DB
(once per kernel and device) and ranks candidates; later calls are one dict lookup.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
from pathlib import Path
from typing import Iterable

from .. import env
from ..config import Config
from ..kernels import KernelDef, kernel_def
from ..spec import NSASpec
from .store import (MAX_THREADS_PER_BLOCK, DeviceKey, Entry, TuneKey, TuningDB, current_device_key,
                    kernel_source_hash, shape_distance, shipped_db_dir, spec_fields, triton_version)

log = logging.getLogger("nsa_gen")

# Past this many memoized keys (a run with endlessly varying T), start over rather than grow.
MEMO_LIMIT = 1 << 16


def config_problem(kd: KernelDef, spec: NSASpec, config: Config, device: DeviceKey) -> str | None:
    """Why `config` cannot run kernel `kd` for `spec` on `device`, or None if it can
    (known parameters with allowed values, threads per block, shared memory)."""
    if not kd.valid(spec, config):
        return f"not in {kd.stem}'s config space for this spec"
    if config.num_warps * 32 > MAX_THREADS_PER_BLOCK:
        return f"num_warps={config.num_warps} exceeds {MAX_THREADS_PER_BLOCK} threads"
    for name, arch in kd.min_arch:
        if config[name] and device.capability < arch:
            return f"{name}={config[name]} needs sm{arch} or later, {device.id} is {device.arch}"
    limit = device.smem_limit
    if limit is not None:
        need = kd.smem_bytes(spec, config)
        if need > limit:
            return f"needs {need} B of shared memory, {device.id} has {limit} B"
    return None


def fitting_default(kd: KernelDef, spec: NSASpec, T: int, device: DeviceKey) -> Config:
    """The heuristic default, or if it does not fit `device`, the config of the space that
    differs from it in the fewest parameters (then fewest stages, then smallest tiles)."""
    base = kd.default(spec, T)
    if config_problem(kd, spec, base, device) is None:
        return base
    space = kd.space(spec)
    names = sorted(space)
    want = base.as_dict()

    def rank(cfg: Config):
        d = cfg.as_dict()
        return (sum(d[n] != want.get(n) for n in names), cfg.num_stages,
                [d[n] if isinstance(d[n], (int, float)) else 0 for n in names])

    cands = (Config.from_dict(dict(zip(names, vals)))
             for vals in itertools.product(*(space[n] for n in names)))
    fits = [c for c in cands if config_problem(kd, spec, c, device) is None]
    if not fits:
        # Nothing fits by our estimate; the default is still our best guess, let Triton decide.
        return base
    return min(fits, key=rank)


class Dispatcher:
    """Chooses launch configs from tuning DBs.

    overlays: DB directories consulted before the shipped one, first wins (a user's or a
    model's tuning results). read_env: also consult NSA_GEN_DB, after `overlays`.
    shipped: the package's DB (default: `shipped_db_dir()`; None or a missing directory is
    fine). device: force a device key (default: the CUDA device of each call, or the CPU
    interpreter's key).
    """

    def __init__(self, overlays: Iterable[str | os.PathLike] = (), *, read_env: bool = True,
                 shipped: str | os.PathLike | None | bool = True, device: DeviceKey | None = None):
        paths = [Path(p) for p in overlays]
        if read_env and env.db_overlay() is not None:
            paths.append(env.db_overlay())
        if shipped is True:
            shipped = shipped_db_dir()
        if shipped:
            paths.append(Path(shipped))
        self._sources = [TuningDB(p) for p in paths]
        self._device = device
        self._lock = threading.Lock()
        self._memo: dict[tuple, tuple[Config, str]] = {}
        self._index: dict[tuple[str, DeviceKey], dict[tuple, list]] = {}
        self._warned: set[tuple] = set()

    @property
    def sources(self) -> list[Path]:
        return [db.root for db in self._sources]

    def add_overlay(self, path: str | os.PathLike) -> None:
        """Consult the DB at `path` before every source so far (e.g. a model's own results)."""
        with self._lock:
            self._sources.insert(0, TuningDB(path))
            self._reset()

    def clear(self) -> None:
        """Forget memoized choices and loaded files (after the DB on disk changed)."""
        with self._lock:
            self._reset()

    def _reset(self) -> None:
        self._memo = {}
        self._index = {}
        self._warned = set()

    def get(self, stem: str, spec: NSASpec, T: int, B: int = 1, device: int | None = None) -> Config:
        """The config to launch kernel `stem` with for `spec` at T tokens and batch B, on CUDA
        device index `device`. None means the device current at the first call with these
        arguments (pass the index when one process drives different kinds of GPU). Always
        returns a config that fits the device by our estimates; never times anything."""
        return self._choice(stem, spec, T, B, device)[0]

    def origin(self, stem: str, spec: NSASpec, T: int, B: int = 1, device: int | None = None) -> str:
        """Where get()'s config for these arguments comes from, in words: the DB entry (its
        kernel, spec, shape and device), another kernel's (a fallback key), or the heuristic
        default, with the stale entries it ignored (tuned on another version of the
        template) counted."""
        return self._choice(stem, spec, T, B, device)[1]

    def _choice(self, stem: str, spec: NSASpec, T: int, B: int, device: int | None,
                ) -> tuple[Config, str]:
        try:
            return self._memo[(stem, spec, T, B, device)]
        except KeyError:
            pass
        choice = self._resolve(stem, spec, T, B, device)
        memo = self._memo
        if len(memo) >= MEMO_LIMIT:
            memo.clear()
        memo[(stem, spec, T, B, device)] = choice
        return choice

    def device_key(self, device: int | None = None) -> DeviceKey:
        return self._device if self._device is not None else current_device_key(device)

    def _resolve(self, stem: str, spec: NSASpec, T: int, B: int, device: int | None,
                 ) -> tuple[Config, str]:
        kd = kernel_def(stem)
        dev = self.device_key(device)
        group = (stem, kernel_source_hash(stem), spec_fields(spec))
        entries = self._entries(stem, dev)
        cands = entries.get(group, [])
        want = (max(1, T), max(1, B))
        mine = triton_version()

        def rank(c: tuple[int, TuneKey, Entry]):
            src, k, _ = c
            return (k.device != dev, shape_distance(want, k.shape), src, k.triton != mine,
                    abs(k.device.sm_count - dev.sm_count), -k.T, -k.B)

        for src, k, e in sorted(cands, key=rank):
            cfg = kd.at_shape(spec, e.config, k.T, want[0])
            problem = config_problem(kd, spec, cfg, dev)
            if problem is None:
                if k.shape != want or k.device != dev:
                    log.debug("%s T=%d B=%d on %s uses the entry tuned for %s as %s",
                              stem, T, B, dev.id, k.describe(), cfg)
                return cfg, f"DB {self._sources[src].root.name}: {k.describe()}"
            self._warn_once(("misfit", k, cfg),
                            "ignoring tuned config for %s from %s: %s",
                            k.describe(), self._sources[src].root, problem)
        # Entries of this kernel and spec tuned on another version of its template: never
        # used (the code they timed is gone), but a DB full of them usually means a template
        # change whose entries were not re-keyed or retuned, so say so.
        # (entries holds this kernel's groups only: (kernel, source hash, spec))
        stale = sum(len(c) for (_, src_hash, fields), c in entries.items()
                    if fields == group[2] and src_hash != group[1])
        if stale:
            self._warn_once(("stale", stem, dev, spec),
                            "ignoring %d entries of %s for spec %r tuned on another version of "
                            "its template (stale): retune (`nsa-gen tune`) or, where the code "
                            "is unchanged, re-key them (benchmarks/rekey.py)",
                            stale, stem, spec.name)
        if kd.fallback:
            # A tuning key of another kernel's (selection_fwd_gated): that kernel's entries
            # beat the heuristic default.
            log.debug("%s has no entry for spec %r at T=%d B=%d; using %s's", stem, spec.name,
                      T, B, kd.fallback)
            cfg, where = self._choice(kd.fallback, spec, T, B, device)
            return cfg, f"{kd.fallback}'s: {where}"
        self._warn_once(("default", stem, dev, spec),
                        "no tuned config for %s with spec %r on %s (first seen at "
                        "T=%d B=%d); using the heuristic default. Run `nsa-gen tune` to tune it.",
                        stem, spec.name, dev.id, T, B)
        why = f" ({stale} stale entries ignored)" if stale else ""
        return fitting_default(kd, spec, T, dev), "heuristic default" + why

    def _entries(self, stem: str, dev: DeviceKey) -> dict[tuple, list]:
        """Entries of kernel `stem` usable on `dev` (same architecture), by group."""
        idx = self._index.get((stem, dev))
        if idx is not None:
            return idx
        with self._lock:
            idx = {}
            for src, db in enumerate(self._sources):
                for k, e in db.load(stem).items():
                    if k.device.arch == dev.arch:
                        idx.setdefault(k.group, []).append((src, k, e))
            self._index[(stem, dev)] = idx
            return idx

    def _warn_once(self, key: tuple, msg: str, *args) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        log.warning(msg, *args)


_DEFAULT: Dispatcher | None = None
_DEFAULT_LOCK = threading.Lock()


def default_dispatcher() -> Dispatcher:
    """The process-wide dispatcher: NSA_GEN_DB overlay (read once, on first use), then the
    shipped DB, then heuristic defaults."""
    global _DEFAULT
    if _DEFAULT is None:
        with _DEFAULT_LOCK:
            if _DEFAULT is None:
                _DEFAULT = Dispatcher()
    return _DEFAULT


def reset_default_dispatcher() -> None:
    """Drop the process-wide dispatcher, so the next use re-reads NSA_GEN_DB and the DB files."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        _DEFAULT = None
