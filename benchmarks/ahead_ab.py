"""A/B of the query-batched forward's block lists (and the backward's inverted selection)
built ahead on a side stream (`ops.selection.OVERLAP_LISTS`, `ops.common.ahead`) against
built in line before each row chunk's kernels (the launchers before session 27), in one
process (GPU).

For each built-in SPEC (dense, B = 1) at --seqlen: `selection_fwd` with the dispatcher's
config (which must be query-batched) on the tuner's inputs, and the whole `nsa()` forward on
the benchmark's random inputs, and `selection_bwd` (any spec: its dk/dv token lists are
built while the dq kernel runs), each timed (do_bench median) in both modes, two rounds; the
GPU time of the torch (non-Triton) kernels of one call; whether the modes' outputs are equal
bit for bit; selection_fwd's peak extra memory. A third mode builds ahead with row chunks of
4 GiB of partials instead of 2 (QUERY_PART_BYTES).

Session 27 also measured the combine kernel on the side stream beside the next chunk's
selection kernel (partials double-buffered, a grid-stride combine with 1, 2, 4 programs an
SM or one a row): 0.4-3.8 ms slower than `ahead` (RESULTS run 45), so it was taken out.

Usage: python benchmarks/ahead_ab.py [--seqlen 65536] [--out DIR] small-group fla-compat ...
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen.benchmark import _bench  # noqa: E402
from nsa_gen.ops import selection as sel  # noqa: E402
from probe_main import (dispatched_case, peak_extra_mib, probe_main,  # noqa: E402
                        random_nsa_args, torch_kernel_ms)

# Mode: the launcher's settings it runs under.
MODES = {"inline": dict(OVERLAP_LISTS=False, QUERY_PART_BYTES=2 << 30),
         "ahead": dict(OVERLAP_LISTS=True, QUERY_PART_BYTES=2 << 30),
         # Row chunks of 4 GiB of partials: with the lists hidden, what is a chunk's cost now?
         "ahead_4gib": dict(OVERLAP_LISTS=True, QUERY_PART_BYTES=4 << 30)}


def _ab(row: dict, what: str, fn, modes=tuple(MODES)) -> None:
    """Time fn in each of `modes`, two rounds; keep each mode's output of the first round."""
    shipped = {name: getattr(sel, name) for name in MODES["ahead"]}  # every mode sets these
    outs = {}
    try:
        for rnd in (1, 2):
            for mode in modes:
                for name, value in MODES[mode].items():
                    setattr(sel, name, value)
                if rnd == 1:
                    outs[mode] = fn()
                    row[f"{what}_{mode}_torch_kernels"] = torch_kernel_ms(fn)
                    if what == "selection_fwd":
                        row[f"{what}_{mode}_peak_extra_MiB"] = peak_extra_mib(fn)
                row[f"{what}_{mode}_{rnd}"] = _bench(fn)
    finally:
        for name, value in shipped.items():
            setattr(sel, name, value)
    for mode, out in outs.items():
        row[f"{what}_{mode}_same"] = all(torch.equal(x, y) for x, y in zip(out, outs["inline"]))


def ab(name: str, T: int) -> dict:
    from nsa_gen import api
    spec, cfg, case = dispatched_case(name, "selection_fwd", T)
    row = {"spec": name, "T": T, "config": str(cfg)}
    if cfg["BLOCK_Q"] > 0:  # the forward's lists: the query-batched kernel's only
        q, k, v, idx = (case.inputs[n] for n in ("q", "k", "v", "block_indices"))
        vis = sel.visible_blocks(idx, spec, None)
        _ab(row, "selection_fwd", lambda: sel.selection_fwd(q, k, v, vis, spec, cfg,
                                                            canonical=True, forced_listed=True))
        args = random_nsa_args(spec, T)
        _ab(row, "nsa", lambda: (api.nsa(*args, spec=spec),))
    # The backward's inverted selection, built while the dq kernel runs (every spec).
    _, bcfg, bcase = dispatched_case(name, "selection_bwd", T)
    row["bwd_config"] = str(bcfg)
    _ab(row, "selection_bwd", lambda: bcase.run(bcfg), modes=("inline", "ahead"))
    return row


if __name__ == "__main__":
    sys.exit(probe_main("ahead_ab", "SPEC", ab))
