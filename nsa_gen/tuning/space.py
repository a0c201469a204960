"""Search space of a kernel for a spec, and static pruning before anything is compiled.

The space is the product of the kernel's `KernelDef.space(spec)` (tile sizes, structural
variants, num_warps, num_stages). A point is pruned when it is not in the space's valid set
(divisibility, known parameters), when its shared-memory estimate exceeds the device's
per-block limit, or when its register estimate would spill past 255 registers per thread.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable

from ..config import Config
from ..db import DeviceKey, config_problem
from ..db.store import MAX_REGS_PER_THREAD
from ..kernels import KERNELS, dim_chunks, kernel_def, next_pow2, slc_fwd_rows
from ..spec import NSASpec

# Registers a thread needs besides its tiles: pointers, offsets, loop state, masks.
REG_OVERHEAD = 40


def _slc_fwd_tiles(spec: NSASpec, cfg: Config) -> float:
    """32-bit words live at once in one program of selection_fwd: the fp32 accumulator and
    scores, the 16-bit probabilities and query tile (two values a word). K and V tiles are
    left out: the pipeline streams them through shared memory, so counting them would
    prune configs that run fine. The estimate is meant as a lower bound."""
    g, bk, bv, bn = slc_fwd_rows(spec, cfg), next_pow2(spec.DK), next_pow2(spec.DV), cfg["BLOCK_N"]
    # The group-centric kernel keeps all of it for each of its SHARE tokens.
    share = 1 if cfg["BLOCK_Q"] else cfg.get("SHARE", 1)
    return share * (g * bv + g * bn + (g * bn + g * bk) / 2)


def _gate_fwd_tiles(spec: NSASpec, cfg: Config) -> float:
    """gate_fwd: the fp32 accumulator of the widest dim piece and one loaded 16-bit branch
    tile (a lower bound: 32-bit inputs take a word a value)."""
    bv = dim_chunks(spec.DV)[0][1]
    return 1.5 * cfg["BLOCK_R"] * bv


# Kernel stem -> words of live tiles per program (a tuning key that renders another stem's
# kernel, selection_fwd_gated, takes that one's). A stem without a model is not pruned on
# registers (its compile failures are still caught at tuning time).
REGISTER_MODELS: dict[str, Callable[[NSASpec, Config], float]] = {
    "selection_fwd": _slc_fwd_tiles,
    "gate_fwd": _gate_fwd_tiles,
}


def register_estimate(stem: str, spec: NSASpec, config: Config) -> int | None:
    """Rough registers per thread of kernel `stem` (live tiles spread over the block's
    threads, plus a fixed overhead), or None if the kernel has no register model."""
    kd = KERNELS.get(stem)
    model = REGISTER_MODELS.get(kd.renders or stem if kd else stem)
    if model is None:
        return None
    threads = 32 * config.num_warps
    return int(model(spec, config) / threads + 0.999) + REG_OVERHEAD


@dataclass(frozen=True)
class SearchSpace:
    """The choices of every tunable of kernel `stem` for one spec, as sorted
    (name, choices) pairs: categorical Optuna parameters of the same names."""

    stem: str
    params: tuple[tuple[str, tuple[Any, ...]], ...]

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.params]

    @property
    def size(self) -> int:
        n = 1
        for _, c in self.params:
            n *= len(c)
        return n

    def configs(self) -> list[Config]:
        """Every point of the space (unpruned), in a fixed order."""
        names = self.names
        return [Config.from_dict(dict(zip(names, vals)))
                for vals in itertools.product(*(c for _, c in self.params))]


def search_space(stem: str, spec: NSASpec) -> SearchSpace:
    space = kernel_def(stem).space(spec)
    return SearchSpace(stem, tuple(sorted((k, tuple(v)) for k, v in space.items())))


def prune_reason(stem: str, spec: NSASpec, config: Config, device: DeviceKey) -> str | None:
    """Why `config` is not worth compiling for `spec` on `device`, or None if it is."""
    problem = config_problem(kernel_def(stem), spec, config, device)
    if problem is not None:
        return problem
    if not device.is_cpu:
        regs = register_estimate(stem, spec, config)
        if regs is not None and regs > MAX_REGS_PER_THREAD:
            return f"needs about {regs} registers per thread (limit {MAX_REGS_PER_THREAD})"
    return None


def pruned_space(stem: str, spec: NSASpec, device: DeviceKey) -> tuple[list[Config], dict[Config, str]]:
    """The space split into configs to try and pruned ones (config -> reason). A config
    that sets a param its variant does not read (`KernelDef.canonical` says which) runs as
    its canonical form would: it is pruned as a copy of that one."""
    kd = kernel_def(stem)
    keep: list[Config] = []
    dropped: dict[Config, str] = {}
    for cfg in search_space(stem, spec).configs():
        why = prune_reason(stem, spec, cfg, device)
        if why is None and kd.canonical(spec, cfg) != cfg:
            why = f"runs as {kd.canonical(spec, cfg)}"
        if why is None:
            keep.append(cfg)
        else:
            dropped[cfg] = why
    return keep, dropped
