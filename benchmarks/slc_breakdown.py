"""Where the time of the query-batched selected-attention forward goes (GPU).

For each spec, on the tuner's inputs (random q/k/v, realistic random block indices), times
each step of `selection_fwd` with BLOCK_Q > 0 alone: canonical block lists
(visible_blocks), the sort into per-block lists, the segment table, the partial kernel,
the combine kernel; then the whole launcher at several partial-memory budgets (row
chunks), and the group-centric kernel (BLOCK_Q = 0) for comparison.

Usage: python benchmarks/slc_breakdown.py [--seqlen 65536] [--out DIR] SPEC=BLOCK_Q ...
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen.benchmark import _bench  # noqa: E402
from nsa_gen.config import Config  # noqa: E402
from nsa_gen.harness import make_case  # noqa: E402
from nsa_gen.kernels import kernel_module  # noqa: E402
from nsa_gen.ops import selection as sel  # noqa: E402
from nsa_gen.ops.common import launch_options  # noqa: E402
from nsa_gen.spec import load_spec  # noqa: E402
from probe_main import probe_main  # noqa: E402


def breakdown(name: str, block_q: int, T: int, dev: str) -> dict:
    spec = load_spec(name)
    case = make_case("selection_fwd", spec, T, dtype=torch.bfloat16, device=dev, seed=0)
    q, k, v, idx = (case.inputs[n] for n in ("q", "k", "v", "block_indices"))
    cfg = Config.make(BLOCK_N=64, BLOCK_Q=block_q, num_warps=4, num_stages=2)
    row = {"spec": name, "T": T, "config": str(cfg)}
    BT = T
    vis = sel.visible_blocks(idx, spec, None)
    row["visible_blocks"] = _bench(lambda: sel.visible_blocks(idx, spec, None))
    row["block_lists"] = _bench(lambda: sel._block_lists(vis, spec, T, None, (0, BT)))
    lists = sel._block_lists(vis, spec, T, None, (0, BT))
    row["segments"] = _bench(lambda: sel._query_segments(lists, spec, BT, T, None, 1, block_q))
    segs = sel._query_segments(lists, spec, BT, T, None, 1, block_q)
    row["n_segments"] = int(segs.shape[0])
    row["n_segments_used"] = int((segs[:, 3] > 0).sum())
    mod = kernel_module("selection_fwd", spec, cfg)
    n_part = BT * spec.H * spec.S
    o_part = torch.empty(n_part, spec.G, spec.DV, device=dev, dtype=q.dtype)
    lse_part = torch.empty(n_part, spec.G, device=dev, dtype=torch.float32)
    o = torch.empty(1, T, spec.HQ, spec.DV, device=dev, dtype=q.dtype)
    lse = torch.empty(1, T, spec.HQ, device=dev, dtype=torch.float32)
    row["partial_kernel"] = _bench(lambda: mod.nsa_selection_fwd_kernel[(segs.shape[0],)](
        q, k, v, lists.entries, segs, o_part, lse_part, 0, **launch_options(cfg)))
    row["combine_kernel"] = _bench(lambda: mod.nsa_selection_fwd_combine_kernel[(BT,)](
        vis, o_part, lse_part, o, lse, 0, num_warps=4, num_stages=1))
    budget = sel.QUERY_PART_BYTES
    for gib in (1, 4, 16):
        sel.QUERY_PART_BYTES = gib << 30
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        row[f"whole_{gib}GiB"] = _bench(lambda: sel.selection_fwd(q, k, v, idx, spec, cfg))
        row[f"peak_extra_MiB_{gib}GiB"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    sel.QUERY_PART_BYTES = budget
    group = Config.make(BLOCK_N=64, BLOCK_Q=0, num_warps=2, num_stages=2)
    row["group_centric"] = _bench(lambda: sel.selection_fwd(q, k, v, idx, spec, group))
    return row


def _run(run: str, T: int) -> dict:
    name, block_q = run.split("=")
    return breakdown(name, int(block_q), T, "cuda")


if __name__ == "__main__":
    sys.exit(probe_main("slc_breakdown", "SPEC=BLOCK_Q", _run))
