"""A/B of the query-batched forward's overlaps (GPU), in one process: its block lists built
ahead on a side stream (`ops.selection.OVERLAP_LISTS`, `ops.common.ahead`) against built in
line before each row chunk's kernels (the launcher before session 27), and its combine kernel
on the side stream with COMBINE_ASIDE programs an SM beside the next chunk's selection
kernel (partials in two buffers of half QUERY_PART_BYTES each, unless a mode sets that).

For each built-in SPEC (dense, B = 1) at --seqlen: `selection_fwd` with the dispatcher's
config (which must be query-batched) on the tuner's inputs, and the whole `nsa()` forward on
the benchmark's random inputs, each timed (do_bench median) in every mode, two rounds; the
GPU time of the torch (non-Triton) kernels of one call in line and ahead; whether each
mode's outputs equal the in-line ones bit for bit; selection_fwd's peak extra memory.

Usage: python benchmarks/ahead_ab.py [--seqlen 65536] [--out DIR] small-group ...
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen.benchmark import _bench  # noqa: E402
from nsa_gen.ops import selection as sel  # noqa: E402
from probe_main import dispatched_case, kernel_ms, probe_main, random_qkv  # noqa: E402

# Mode: the launcher's settings it runs under (the others as shipped).
MODES = {
    "inline": dict(OVERLAP_LISTS=False, COMBINE_ASIDE=0),
    "ahead": dict(OVERLAP_LISTS=True, COMBINE_ASIDE=0),
    "aside1": dict(OVERLAP_LISTS=True, COMBINE_ASIDE=1),
    "aside2": dict(OVERLAP_LISTS=True, COMBINE_ASIDE=2),
    "aside4": dict(OVERLAP_LISTS=True, COMBINE_ASIDE=4),
    "aside_all": dict(OVERLAP_LISTS=True, COMBINE_ASIDE=1 << 20),  # a program a row
    "aside2_4gib": dict(OVERLAP_LISTS=True, COMBINE_ASIDE=2, QUERY_PART_BYTES=4 << 30),
}


def _torch_kernel_ms(fn) -> float:
    """GPU time of the torch (non-Triton) kernels one call of fn launches, in ms."""
    return sum(t for name, t in kernel_ms(fn).items() if not name.startswith(("nsa_", "Memcpy")))


def _peak_extra_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    mem0 = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - mem0) / 2 ** 20


def _ab(row: dict, what: str, fn) -> None:
    """Time fn in every mode, two rounds; keep each mode's output of the first round."""
    shipped = {name: getattr(sel, name) for name in MODES["aside2_4gib"]}
    outs = {}
    try:
        for rnd in (1, 2):
            for mode, settings in MODES.items():
                for name, value in {**shipped, **settings}.items():
                    setattr(sel, name, value)
                if rnd == 1:
                    outs[mode] = fn()
                    if mode in ("inline", "ahead"):
                        row[f"{what}_{mode}_torch_kernels"] = _torch_kernel_ms(fn)
                    if what == "selection_fwd":
                        row[f"{what}_{mode}_peak_extra_MiB"] = _peak_extra_mib(fn)
                row[f"{what}_{mode}_{rnd}"] = _bench(fn)
    finally:
        for name, value in shipped.items():
            setattr(sel, name, value)
    for mode, out in outs.items():
        row[f"{what}_{mode}_same"] = all(torch.equal(x, y) for x, y in zip(out, outs["inline"]))


def ab(name: str, T: int) -> dict:
    from nsa_gen import api
    from nsa_gen.spec import BRANCHES
    spec, cfg, case = dispatched_case(name, "selection_fwd", T)
    assert cfg["BLOCK_Q"] > 0, "the A/B is of the query-batched forward"
    q, k, v, idx = (case.inputs[n] for n in ("q", "k", "v", "block_indices"))
    vis = sel.visible_blocks(idx, spec, None)
    row = {"spec": name, "T": T, "config": str(cfg)}
    _ab(row, "selection_fwd", lambda: sel.selection_fwd(q, k, v, vis, spec, cfg, canonical=True,
                                                        forced_listed=True))
    q, k, v = random_qkv(spec, T)
    gates = [torch.sigmoid(torch.randn(1, T, spec.HQ, device="cuda", dtype=q.dtype))
             if spec.has(b) else None for b in BRANCHES]
    _ab(row, "nsa", lambda: (api.nsa(q, k, v, *gates, spec=spec),))
    return row


if __name__ == "__main__":
    sys.exit(probe_main("ahead_ab", "SPEC", ab))
