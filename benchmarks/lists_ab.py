"""A/B of the query-batched forward's block lists (GPU): bins by block (the launcher's
`block_table`, 16-bit sort keys where they fit) against bins by key row (session 25's
launcher, restated here as the baseline: H * B*T bins, 32-bit keys), in one process.

For each built-in SPEC (dense, B = 1, the dispatcher's selection_fwd config at --seqlen,
which must be query-batched), on the tuner's inputs: the lists and the segment table of the
whole sequence (one chunk) timed alone, the sum of GPU kernel time of the launcher's torch
steps over its row chunks (torch profiler), and the whole `selection_fwd`; both ways, and
whether the outputs are equal bit for bit. Then the whole forward (block bins) with row
chunks of 1, 2 (shipped), 4 and 8 GiB of partials, and its peak extra memory.

Usage: python benchmarks/lists_ab.py [--seqlen 65536] [--out DIR] small-group ...
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen.benchmark import _bench  # noqa: E402
from nsa_gen.ops import selection as sel  # noqa: E402
from probe_main import dispatched_case, peak_extra_mib, probe_main, torch_kernel_ms  # noqa: E402


def row_lists(block_indices, spec, T, starts, rows, skip_forced):
    """Session 25's lists (dense input): bin h * B*T + the block's first key row."""
    B, _, H, S = block_indices.shape
    BT, (r0, r1), dev = B * T, rows, block_indices.device
    row = torch.arange(r0, r1, device=dev, dtype=torch.int32)
    row0 = row - row % T
    idx = block_indices.reshape(BT, H, S)[r0:r1]
    heads = torch.arange(H, device=dev, dtype=torch.int32)[None, :, None] * BT
    keep = idx >= 0
    if skip_forced:
        own = torch.div(row - row0, spec.BS, rounding_mode="floor")[:, None, None]
        keep &= (idx >= spec.initial_blocks) & (idx <= own - spec.local_blocks)
    key = torch.where(keep, heads + row0[:, None, None] + idx * spec.BS, H * BT).flatten()
    sorted_key, order = torch.sort(key, stable=True)
    edges = torch.searchsorted(sorted_key, torch.arange(H * BT + 1, device=dev, dtype=torch.int32))
    return order.to(torch.int32), edges[1:] - edges[:-1], edges[:-1]


def row_segments(lists, spec, BT, T, seg):
    """Session 25's segment table over the row bins of `row_lists`."""
    entries, counts, first = lists
    n_seg = torch.div(counts + seg - 1, seg, rounding_mode="floor")
    seg_end = torch.cumsum(n_seg, 0)
    n_pairs = entries.numel()
    bound = n_pairs // seg + 1 + min(n_pairs, spec.H * (BT // spec.BS + 1))
    i = torch.arange(bound, device=n_seg.device)
    b = torch.searchsorted(seg_end, i, right=True).clamp_max(n_seg.numel() - 1)
    kth = i - (seg_end[b] - n_seg[b])
    n_tok = torch.where(i < seg_end[-1], torch.clamp(counts[b] - kth * seg, max=seg), 0)
    h = torch.div(b, BT, rounding_mode="floor")
    row_kv = b - h * BT
    return torch.stack([h, row_kv, first[b] + kth * seg, n_tok, torch.zeros_like(h),
                        row_kv - row_kv % T + T], 1).to(torch.int32).contiguous()


class _Rows:
    """Patches the launcher to session 25's lists while active."""
    def __init__(self, spec, T):
        self.spec, self.T = spec, T

    def __enter__(self):
        spec, T = self.spec, self.T
        self.saved = sel._block_lists, sel._query_segments

        class L:
            def __init__(self, t):
                self.entries, self.counts, self.first = t
        sel._block_lists = lambda bi, sp, table, starts, rows, skip_forced=False: L(
            row_lists(bi, spec, T, starts, rows, skip_forced))
        sel._query_segments = lambda lists, seg: row_segments(
            (lists.entries, lists.counts, lists.first), spec, T, T, seg)

    def __exit__(self, *exc):
        sel._block_lists, sel._query_segments = self.saved


def ab(name: str, T: int) -> dict:
    spec, cfg, case = dispatched_case(name, "selection_fwd", T)
    assert cfg["BLOCK_Q"] > 0, "the A/B is of the query-batched forward"
    q, k, v, idx = (case.inputs[n] for n in ("q", "k", "v", "block_indices"))
    vis = sel.visible_blocks(idx, spec, None)
    forced = cfg["FORCED"] > 0
    row = {"spec": name, "T": T, "config": str(cfg)}
    table = sel.block_table(spec, 1, T, None, q.device)
    row["new_lists"] = _bench(lambda: sel._block_lists(vis, spec, table, None, (0, T), skip_forced=forced))
    lists = sel._block_lists(vis, spec, table, None, (0, T), skip_forced=forced)
    row["new_segments"] = _bench(lambda: sel._query_segments(lists, cfg["BLOCK_Q"]))
    old = row_lists(vis, spec, T, None, (0, T), forced)
    row["old_lists"] = _bench(lambda: row_lists(vis, spec, T, None, (0, T), forced))
    row["old_segments"] = _bench(lambda: row_segments(old, spec, T, T, cfg["BLOCK_Q"]))

    def whole():
        return sel.selection_fwd(q, k, v, vis, spec, cfg, canonical=True, forced_listed=True)
    o_new, lse_new = whole()
    row["new_torch_kernels"] = torch_kernel_ms(whole)
    row["new_whole"] = _bench(whole)
    with _Rows(spec, T):
        o_old, lse_old = whole()
        row["old_torch_kernels"] = torch_kernel_ms(whole)
        row["old_whole"] = _bench(whole)
    row["new_whole_again"] = _bench(whole)
    row["same"] = bool(torch.equal(o_new, o_old) and torch.equal(lse_new, lse_old))
    # The row chunk's size (QUERY_PART_BYTES): time and peak extra memory, block bins.
    shipped = sel.QUERY_PART_BYTES
    try:
        for gib in (1, 2, 4, 8):
            sel.QUERY_PART_BYTES = gib << 30
            row[f"peak_extra_MiB_{gib}gib"] = peak_extra_mib(whole)
            row[f"whole_{gib}gib"] = _bench(whole)
            if gib <= 2:
                row[f"new_torch_kernels_{gib}gib"] = torch_kernel_ms(whole)
                with _Rows(spec, T):
                    row[f"old_whole_{gib}gib"] = _bench(whole)
                    row[f"old_torch_kernels_{gib}gib"] = torch_kernel_ms(whole)
    finally:
        sel.QUERY_PART_BYTES = shipped
    return row


if __name__ == "__main__":
    sys.exit(probe_main("lists_ab", "SPEC", ab))
