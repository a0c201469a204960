"""A/B of the query-batched forward's block lists (GPU): the list kernels (`_query_lists`:
bins, a stable sort, edges, scan, segments; session 38) against the torch steps they
replace (sessions 26-37's launcher, restated here as the baseline: ~50 short torch
kernels a row chunk), in one process.

For each built-in SPEC at each --seqlen (dense, B = 1, bf16, the dispatcher's configs; its
selection_fwd config must be query-batched): one chunk's lists alone both ways (GPU time,
do_bench median, and host time, `probe_main.host_ms`), whether both give the same entries
and segment table bit for bit, then nsa() with the gate on every branch both ways (do_bench
median; kernels, torch, kernels again), its host time both ways, and nsa() replayed from a
CUDA graph (no host time: the bound the eager op can reach).

Usage: python benchmarks/lists_ab.py [--seqlen 8192] [--out DIR] small-group ...
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen.benchmark import _bench  # noqa: E402
from nsa_gen.kernels import kernel_module  # noqa: E402
from nsa_gen.ops import selection as sel  # noqa: E402
from probe_main import (dispatched_case, graph_replay, host_ms, probe_main,  # noqa: E402
                        random_nsa_args)


def torch_lists(block_indices, spec, T, table, starts, rows, seg, skip_forced):
    """Sessions 26-37's lists of rows r0 .. r1 - 1: `_query_lists`' result by torch steps."""
    B, _, H, S = block_indices.shape
    (r0, r1), dev = rows, block_indices.device
    table = table or sel.block_table(spec, B, T, None, dev)
    n_blk = table.key_row.numel()
    n_bin = H * n_blk
    idx = block_indices.reshape(B * T, H, S)[r0:r1]
    keep = idx >= 0
    if skip_forced:
        row = torch.arange(r0, r1, device=dev, dtype=torch.int32)
        row0 = starts[r0:r1] if starts is not None else row - row % T
        own = torch.div(row - row0, spec.BS, rounding_mode="floor")[:, None, None]
        keep &= (idx >= spec.initial_blocks) & (idx <= own - spec.local_blocks)
    kt = sel._key_type(n_bin)
    heads = torch.arange(H, device=dev, dtype=torch.int32)[None, :, None] * n_blk
    key = torch.where(keep, heads + table.row_block[r0:r1, None, None] + idx, n_bin)
    sorted_key, order = torch.sort(key.to(kt).flatten(), stable=True)
    edges = torch.searchsorted(sorted_key, torch.arange(n_bin + 1, device=dev, dtype=kt),
                               out_int32=True)
    counts, first = edges[1:] - edges[:-1], edges[:-1]
    n_pairs = order.numel()
    bound = n_pairs // seg + 1 + min(n_pairs, n_bin)
    n_seg = torch.div(counts + seg - 1, seg, rounding_mode="floor")
    seg_end = torch.cumsum(n_seg, 0, dtype=torch.int32)
    i = torch.arange(bound, device=dev, dtype=torch.int32)
    b = torch.searchsorted(seg_end, i, right=True, out_int32=True).clamp_max(n_bin - 1)
    kth = i - (seg_end[b] - n_seg[b])
    n_tok = torch.where(i < seg_end[-1], torch.clamp(counts[b] - kth * seg, max=seg), 0)
    h = torch.div(b, n_blk, rounding_mode="floor")
    g = b - h * n_blk
    segments = torch.stack([h, table.key_row[g], first[b] + kth * seg, n_tok,
                            torch.zeros_like(h), table.row_end[g]], 1).to(torch.int32).contiguous()
    return order.to(torch.int32), segments


class _Torch:
    """Patches the launcher to the torch lists while active."""
    def __init__(self, skip_forced: bool):
        self.skip_forced = skip_forced

    def __enter__(self):
        self.saved = sel._query_lists
        sel._query_lists = lambda mod, bi, spec, T, table, starts, rows, seg: torch_lists(
            bi, spec, T, table, starts, rows, seg, self.skip_forced)

    def __exit__(self, *exc):
        sel._query_lists = self.saved


def ab(name: str, T: int) -> dict:
    from nsa_gen import api
    spec, cfg, case = dispatched_case(name, "selection_fwd", T)
    assert cfg["BLOCK_Q"] > 0, "the A/B is of the query-batched forward"
    vis = sel.visible_blocks(case.inputs["block_indices"], spec, None)
    forced = cfg["FORCED"] > 0
    mod = kernel_module("selection_fwd", spec, cfg)
    chunks, seg = sel.query_chunks(spec, T, 2), cfg["BLOCK_Q"]
    rows = chunks[0]  # the first chunk's lists, timed alone
    row = {"spec": name, "T": T, "config": str(cfg), "chunks": len(chunks)}

    def kernels():
        return sel._query_lists(mod, vis, spec, T, None, None, rows, seg)

    def baseline():
        return torch_lists(vis, spec, T, None, None, rows, seg, forced)
    (e_new, s_new), (e_old, s_old) = kernels(), baseline()
    row["same"] = bool(torch.equal(e_new, e_old) and torch.equal(s_new, s_old))
    row["lists_kernels_ms"], row["lists_torch_ms"] = _bench(kernels), _bench(baseline)
    row["lists_host_kernels_ms"], row["lists_host_torch_ms"] = host_ms(kernels), host_ms(baseline)

    args = random_nsa_args(spec, T)

    def fwd():
        return api.nsa(*args, spec=spec)
    o_new = fwd()
    row["nsa_kernels_ms"] = _bench(fwd)
    row["nsa_host_kernels_ms"] = host_ms(fwd)
    with _Torch(forced):
        o_old = fwd()
        row["nsa_torch_ms"] = _bench(fwd)
        row["nsa_host_torch_ms"] = host_ms(fwd)
    row["nsa_kernels_again_ms"] = _bench(fwd)
    row["nsa_same"] = bool(torch.equal(o_new, o_old))
    row["nsa_graph_ms"] = _bench(graph_replay(fwd))
    return row


if __name__ == "__main__":
    sys.exit(probe_main("lists_ab", "SPEC", ab))
