"""The kernel registry: for each kernel stem, its template, the values it prints, its
config space, a heuristic default that is always valid, and a resource estimate.

Every number a template prints is computed here, from a validated spec and a config.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

from . import codegen
from .config import Config
from .spec import NSASpec

LOG2E = 1.4426950408889634


def next_pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, x))))


def group_pad(spec: NSASpec) -> int:
    """Rows of a group tile: tl.dot needs M >= 16."""
    return max(16, next_pow2(spec.G))


@dataclass(frozen=True)
class KernelDef:
    stem: str
    branch: str
    context: Callable[[NSASpec, Config], dict]
    default: Callable[[NSASpec, int], Config]
    space: Callable[[NSASpec], dict[str, list]]
    smem_bytes: Callable[[NSASpec, Config], int]
    applies: Callable[[NSASpec], bool]

    @property
    def template(self) -> str:
        return f"{self.stem}.py.j2"

    @property
    def kernel_name(self) -> str:
        return f"nsa_{self.stem}_kernel"

    def valid(self, spec: NSASpec, config: Config) -> bool:
        """Static checks of a config against the spec (divisibility, known params)."""
        space = self.space(spec)
        if set(dict(config.params)) != set(space) - {"num_warps", "num_stages"}:
            return False
        return all(v in space[k] for k, v in config.as_dict().items() if k in space)


def _common(spec: NSASpec) -> dict:
    return dict(HQ=spec.HQ, H=spec.H, G=spec.G, G_PAD=group_pad(spec), DK=spec.DK, DV=spec.DV,
                BK=next_pow2(spec.DK), BV=next_pow2(spec.DV), BS=spec.BS, S=spec.S,
                SCALE_LOG2=spec.softmax_scale * LOG2E)


# ----------------------------------------------------------------------------- selection_fwd

def _slc_fwd_context(spec: NSASpec, cfg: Config) -> dict:
    return dict(_common(spec), BLOCK_N=cfg["BLOCK_N"])


def _slc_fwd_space(spec: NSASpec) -> dict[str, list]:
    return {"BLOCK_N": [b for b in (16, 32, 64, 128) if spec.BS % b == 0],
            "num_warps": [2, 4, 8], "num_stages": [1, 2, 3, 4]}


def _slc_fwd_default(spec: NSASpec, T: int) -> Config:
    return Config.make(BLOCK_N=min(64, spec.BS), num_warps=4, num_stages=2)


def _slc_fwd_smem(spec: NSASpec, cfg: Config) -> int:
    bn, stages = cfg["BLOCK_N"], max(1, cfg.num_stages)
    bk, bv = next_pow2(spec.DK), next_pow2(spec.DV)
    return 2 * (group_pad(spec) * bk + stages * bn * (bk + bv))


KERNELS: dict[str, KernelDef] = {
    "selection_fwd": KernelDef("selection_fwd", "slc", _slc_fwd_context, _slc_fwd_default,
                               _slc_fwd_space, _slc_fwd_smem, lambda s: s.has("slc")),
}


def kernel_def(stem: str) -> KernelDef:
    try:
        return KERNELS[stem]
    except KeyError:
        raise KeyError(f"unknown kernel '{stem}' (known: {', '.join(KERNELS)})") from None


def kernel_source(stem: str, spec: NSASpec, config: Config | None = None) -> str:
    """The rendered module source of kernel `stem` for `spec` (default config if None)."""
    kd = kernel_def(stem)
    config = config or kd.default(spec, 4096)
    return codegen.render(kd.template, kd.context(spec, config), spec.spec_hash)


def kernel_module(stem: str, spec: NSASpec, config: Config) -> ModuleType:
    """The imported generated module of kernel `stem` (cached by content hash)."""
    return codegen.load_module(stem, kernel_source(stem, spec, config))


def kernel_fn(stem: str, spec: NSASpec, config: Config):
    return getattr(kernel_module(stem, spec, config), kernel_def(stem).kernel_name)
