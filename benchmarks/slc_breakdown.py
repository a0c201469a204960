"""Where the time of the query-batched selected-attention forward goes (GPU).

For each run SPEC[:P=V,...] (the dispatcher's selection_fwd config at --seqlen, params
replaced as given), on the tuner's inputs (random q/k/v, top-n-like block lists that hold
every forced block), times each step of `selection_fwd` with BLOCK_Q > 0 alone: canonical
block lists (visible_blocks), the per-block lists and their segment table, the forced
pass (FORCED > 0), the partial kernel, the combine kernel; then the whole launcher, and the
group-centric kernel (BLOCK_Q = 0, the rest of the config the same) for comparison.

Usage: python benchmarks/slc_breakdown.py [--seqlen 65536] [--out DIR] small-group:FORCED=64 ...
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen.benchmark import _bench  # noqa: E402
from nsa_gen.config import parse_assignments  # noqa: E402
from nsa_gen.kernels import kernel_module, token_group_pad  # noqa: E402
from nsa_gen.ops import selection as sel  # noqa: E402
from nsa_gen.ops.common import launch_options, tile_table  # noqa: E402
from probe_main import dispatched_case, probe_main  # noqa: E402


def breakdown(run: str, T: int) -> dict:
    name, _, overrides = run.partition(":")
    spec, base, case = dispatched_case(name, "selection_fwd", T)
    cfg = base.replace(**parse_assignments(filter(None, overrides.split(","))))
    assert cfg["BLOCK_Q"] > 0, "the breakdown is of the query-batched forward"
    q, k, v, idx = (case.inputs[n] for n in ("q", "k", "v", "block_indices"))
    dev = q.device
    row = {"spec": name, "T": T, "config": str(cfg)}
    forced = cfg["FORCED"] > 0
    vis = sel.visible_blocks(idx, spec, None)
    row["visible_blocks"] = _bench(lambda: sel.visible_blocks(idx, spec, None))
    mod = kernel_module("selection_fwd", spec, cfg)
    entries, segs = sel._query_lists(mod, vis, spec, T, None, None, (0, T), cfg["BLOCK_Q"])
    row["block_lists"] = _bench(lambda: sel._query_lists(mod, vis, spec, T, None, None, (0, T),
                                                         cfg["BLOCK_Q"]))
    row["n_segments"] = int(segs.shape[0])
    row["n_segments_used"] = int((segs[:, 3] > 0).sum())
    n_part = T * spec.H * spec.S
    o_part = torch.empty(n_part, spec.G, spec.DV, device=dev, dtype=q.dtype)
    lse_part = torch.empty(n_part, spec.G, device=dev, dtype=torch.float32)
    o = torch.empty(1, T, spec.HQ, spec.DV, device=dev, dtype=q.dtype)
    lse = torch.empty(1, T, spec.HQ, device=dev, dtype=torch.float32)
    if forced:
        tiles = tile_table(None, 1, T, cfg["FORCED"] // token_group_pad(spec), spec.l, spec.d, dev)
        kv0 = sel._kv_args(k, v, spec, cfg.replace(BLOCK_Q=0))
        row["forced_pass"] = _bench(lambda: mod.nsa_selection_fwd_forced_kernel[(tiles.shape[0], spec.H)](
            q, *kv0, o, lse, tiles, num_warps=4, num_stages=cfg.num_stages))
    kv = sel._kv_args(k, v, spec, cfg)
    row["partial_kernel"] = _bench(lambda: mod.nsa_selection_fwd_kernel[(segs.shape[0],)](
        q, *kv, entries, segs, o_part, lse_part, 0, **launch_options(cfg)))
    pos = [q, T, False] if forced else []
    row["combine_kernel"] = _bench(lambda: mod.nsa_selection_fwd_combine_kernel[(T,)](
        vis, o_part, lse_part, o, lse, 0, *pos, num_warps=4, num_stages=1))
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        mem0 = torch.cuda.memory_allocated()
    row["whole"] = _bench(lambda: sel.selection_fwd(q, k, v, vis, spec, cfg, canonical=True,
                                                    forced_listed=True))
    if cuda:
        row["peak_extra_MiB"] = (torch.cuda.max_memory_allocated() - mem0) / 2 ** 20
    group = cfg.replace(BLOCK_Q=0, num_warps=2)
    row["group_centric"] = _bench(lambda: sel.selection_fwd(q, k, v, vis, spec, group, canonical=True,
                                                            forced_listed=True))
    return row


if __name__ == "__main__":
    sys.exit(probe_main("slc_breakdown", "SPEC[:P=V,...]", breakdown))
