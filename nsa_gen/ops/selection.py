"""Selected attention (the `slc` branch): launchers and autograd wrapper."""
from __future__ import annotations

import torch

from ..config import Config
from ..kernels import kernel_def, kernel_fn
from ..spec import NSASpec
from .common import check_qkv, check_tensor, launch_options, seq_start, tile_table


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
    seq_start(cu_seqlens, B, T, q.device)  # validates cu_seqlens
    q, k_cmp, lse_cmp = q.contiguous(), k_cmp.contiguous(), lse_cmp.contiguous()
    idx = torch.empty(B, T, spec.H, spec.S, device=q.device, dtype=torch.int32)
    if B * T == 0:
        return idx
    tiles = tile_table(cu_seqlens, B, T, config["BLOCK_T"], spec.l, spec.d, q.device)
    fn = kernel_fn("topn", spec, config)
    fn[(tiles.shape[0], spec.H)](q, k_cmp, lse_cmp, idx, tiles, **launch_options(config))
    return idx
