"""Selected attention (the `slc` branch): launchers and autograd wrapper."""
from __future__ import annotations

import torch

from ..config import Config
from ..kernels import kernel_def, kernel_fn, kernel_module, next_pow2
from ..spec import NSASpec
from .common import (check_grad_inputs, check_qkv, check_seqlens, check_tensor, launch_options,
                     seq_start, tile_table)


def selection_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor,
                  spec: NSASpec, config: Config | None = None,
                  cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over its selected key blocks.

    q [B, T, HQ, DK], k [B, T, H, DK], v [B, T, H, DV]; block_indices [B, T, H, S] int32,
    block j covering tokens [j*BS, (j+1)*BS) of the token's sequence, -1 = empty slot.
    Keys after the query are masked. cu_seqlens (int32 [N+1], B = 1) packs sequences.
    config: defaults to the kernel's heuristic. Returns o [B, T, HQ, DV] (q's dtype) and
    lse [B, T, HQ] (fp32, natural log; -inf where no key was visible).
    """
    B, T = check_qkv(spec, q, k, v)
    check_tensor("block_indices", block_indices, (B, T, spec.H, spec.S),
                 dtypes=(torch.int32,))
    config = config or kernel_def("selection_fwd").default(spec, T)
    q, k, v, block_indices = (x.contiguous() for x in (q, k, v, block_indices))
    starts = seq_start(cu_seqlens, B, T, q.device)
    o = torch.empty(B, T, spec.HQ, spec.DV, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, T, spec.HQ, device=q.device, dtype=torch.float32)
    if B * T == 0:
        return o, lse
    fn = kernel_fn("selection_fwd", spec, config)
    fn[(T, B * spec.H)](q, k, v, block_indices, o, lse, starts if starts is not None else q, T,
                        IS_VARLEN=starts is not None, **launch_options(config))
    return o, lse


def topn(q: torch.Tensor, k_cmp: torch.Tensor, lse_cmp: torch.Tensor, spec: NSASpec,
         config: Config | None = None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Top-n selection blocks per token and kv head, scored inside the kernel.

    q [B, T, HQ, DK]; k_cmp [B, NC, H, DK] compressed keys (packed [1, sum NC, H, DK] with
    cu_seqlens); lse_cmp [B, T, HQ] fp32 from `compression_fwd`. Returns int32
    [B, T, H, S]: the forced initial and local blocks plus the best-scoring others
    (overlap-weighted importance summed over the group), ascending, -1 slots last.
    """
    check_tensor("q", q, (None, None, spec.HQ, spec.DK))
    B, T = q.shape[:2]
    check_tensor("k_cmp", k_cmp, (B, None, spec.H, spec.DK), like=q)
    check_tensor("lse_cmp", lse_cmp, (B, T, spec.HQ), dtypes=(torch.float32,))
    config = config or kernel_def("topn").default(spec, T)
    check_seqlens(cu_seqlens, B, T, q.device)
    q, k_cmp, lse_cmp = q.contiguous(), k_cmp.contiguous(), lse_cmp.contiguous()
    idx = torch.empty(B, T, spec.H, spec.S, device=q.device, dtype=torch.int32)
    if B * T == 0:
        return idx
    tiles = tile_table(cu_seqlens, B, T, config["BLOCK_T"], spec.l, spec.d, q.device)
    fn = kernel_fn("topn", spec, config)
    fn[(tiles.shape[0], spec.H)](q, k_cmp, lse_cmp, idx, tiles, **launch_options(config))
    return idx


def _inverse_selection(block_indices: torch.Tensor, spec: NSASpec, T: int,
                       starts: torch.Tensor | None, ends: torch.Tensor | None, seg: int):
    """Invert [B, T, H, S] block indices into per-block token lists, cut into segments.

    Returns (tokens int32 [E], segments int32 [n, 6], reduces int32 [m, 5], n_slots): see
    nsa_selection_bwd_dkv_kernel. A block is named by its kv head and its first key row
    (b * T + the sequence's first row + j * BS), so packed sequences never share one.
    """
    B, _, H, S = block_indices.shape
    dev = block_indices.device
    BT = B * T
    rows = torch.arange(BT, device=dev, dtype=torch.int64)
    row0 = starts.long() if starts is not None else rows - rows % T
    row_end = ends.long() if ends is not None else row0 + T
    idx = block_indices.reshape(BT, H, S).long()
    heads = torch.arange(H, device=dev, dtype=torch.int64)[None, :, None]
    key = heads * BT + row0[:, None, None] + idx * spec.BS
    key = torch.where(idx >= 0, key, H * BT).flatten()  # empty slots sort last
    sorted_key, order = torch.sort(key, stable=True)  # stable: tokens stay ascending
    tokens = torch.div(order, H * S, rounding_mode="floor").to(torch.int32)
    counts = torch.bincount(sorted_key, minlength=H * BT + 1)[: H * BT]
    first = torch.cumsum(counts, 0) - counts
    n_seg = torch.div(counts + seg - 1, seg, rounding_mode="floor")
    blocks = torch.nonzero(n_seg).squeeze(1)
    n_seg_b = n_seg[blocks]
    total = int(n_seg_b.sum())
    blk = torch.repeat_interleave(blocks, n_seg_b, output_size=total)
    seg_first = torch.cumsum(n_seg_b, 0) - n_seg_b
    kth = torch.arange(total, device=dev) - torch.repeat_interleave(seg_first, n_seg_b, output_size=total)
    multi = n_seg_b > 1
    slots_per = torch.where(multi, n_seg_b, 0)
    slot_first = torch.cumsum(slots_per, 0) - slots_per
    slot = torch.where(multi, slot_first, -1)
    slot = torch.repeat_interleave(slot, n_seg_b, output_size=total)
    slot = torch.where(slot >= 0, slot + kth, -1)
    h = torch.div(blk, BT, rounding_mode="floor")
    row_kv = blk - h * BT
    seq_end = row_end[row_kv]
    segments = torch.stack([h, row_kv, first[blk] + kth * seg,
                            torch.minimum(counts[blk] - kth * seg, torch.full_like(kth, seg)),
                            slot, seq_end], 1).to(torch.int32).contiguous()
    mb = blocks[multi]
    hm = torch.div(mb, BT, rounding_mode="floor")
    reduces = torch.stack([hm, mb - hm * BT, slot_first[multi], n_seg_b[multi], row_end[mb - hm * BT]],
                          1).to(torch.int32).contiguous()
    return tokens, segments, reduces, int(slots_per.sum())


def selection_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, do: torch.Tensor, block_indices: torch.Tensor, spec: NSASpec,
                  config: Config | None = None, cu_seqlens: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `selection_fwd`: (dq [B, T, HQ, DK], dk [B, T, H, DK], dv [B, T, H, DV]).

    o, lse: the forward's outputs; do: dL/do [B, T, HQ, DV]. Deterministic: no float
    atomics; dk/dv come from per-block token lists (see templates/selection_bwd.py.j2).
    """
    B, T = check_qkv(spec, q, k, v)
    check_grad_inputs(spec, q, o, lse, do)
    config = config or kernel_def("selection_bwd").default(spec, T)
    q, k, v, do, block_indices = (x.contiguous() for x in (q, k, v, do, block_indices))
    lse, o = lse.contiguous(), o.contiguous()
    delta = torch.empty(lse.shape, device=q.device, dtype=torch.float32)  # the dq kernel fills it
    starts = seq_start(cu_seqlens, B, T, q.device)
    ends = None
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int64)
        ends = torch.repeat_interleave(cu[1:], cu[1:] - cu[:-1], output_size=T)
    mod = kernel_module("selection_bwd", spec, config)
    opts = launch_options(config)
    dq = torch.empty_like(q)
    dk = torch.zeros_like(k)  # keys no token selected get exactly zero
    dv = torch.zeros_like(v)
    if B * T == 0:
        return dq, dk, dv
    mod.nsa_selection_bwd_kernel[(T, B * spec.H)](
        q, k, v, o, do, lse, delta, block_indices, dq, starts if starts is not None else q, T,
        IS_VARLEN=starts is not None, **opts)
    tokens, segments, reduces, n_slots = _inverse_selection(block_indices, spec, T, starts, ends,
                                                            config["SEG"])
    bk, bv = next_pow2(spec.DK), next_pow2(spec.DV)
    dk_part = q.new_empty(max(1, n_slots) * spec.BS, bk, dtype=torch.float32)
    dv_part = q.new_empty(max(1, n_slots) * spec.BS, bv, dtype=torch.float32)
    n_b = spec.BS // config["BLOCK_N"]
    if segments.shape[0]:
        mod.nsa_selection_bwd_dkv_kernel[(segments.shape[0], n_b)](
            q, k, v, do, lse, delta, tokens, segments, dk, dv, dk_part, dv_part, **opts)
    if reduces.shape[0]:
        mod.nsa_selection_bwd_reduce_kernel[(reduces.shape[0], n_b)](
            dk_part, dv_part, reduces, dk, dv, num_warps=4, num_stages=1)
    return dq, dk, dv


class SelectionFunction(torch.autograd.Function):
    """Selected attention with given block indices, differentiable in q, k, v."""

    @staticmethod
    def forward(ctx, q, k, v, block_indices, spec, fwd_config, bwd_config, cu_seqlens):
        o, lse = selection_fwd(q, k, v, block_indices, spec, fwd_config, cu_seqlens)
        ctx.save_for_backward(q, k, v, o, lse, block_indices, cu_seqlens)
        ctx.spec, ctx.bwd_config = spec, bwd_config
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, block_indices, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = selection_bwd(q, k, v, o, lse, do, block_indices, ctx.spec, ctx.bwd_config,
                                   cu_seqlens)
        return dq, dk, dv, None, None, None, None, None
