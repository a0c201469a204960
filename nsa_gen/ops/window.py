"""Sliding-window attention (the `swa` branch): launchers."""
from __future__ import annotations

import torch

from ..config import Config
from ..kernels import kernel_def, kernel_fn
from ..spec import NSASpec
from .common import check_qkv, dot_precision, launch_options, outputs, seq_start, tile_table


def window_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: NSASpec,
               config: Config | None = None, cu_seqlens: torch.Tensor | None = None,
               out: tuple[torch.Tensor, torch.Tensor] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of query t over the keys max(0, t - w + 1) .. t of its sequence (w = spec.w).

    q [B, T, HQ, DK], k [B, T, H, DK], v [B, T, H, DV]; cu_seqlens (int32 [N+1], B = 1)
    packs sequences, positions counting from each sequence's start. config: defaults to
    the kernel's heuristic. out: optional (o, lse) to write into. Returns o [B, T, HQ, DV]
    (q's dtype) and lse [B, T, HQ] (fp32, natural log).
    """
    B, T = check_qkv(spec, q, k, v)
    config = config or kernel_def("window_fwd").default(spec, T)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    seq_start(cu_seqlens, B, T, q.device)  # validates cu_seqlens
    o, lse = outputs(out, (B, T, spec.HQ, spec.DV), (B, T, spec.HQ), q)
    if B * T == 0:
        return o, lse
    tiles = tile_table(cu_seqlens, B, T, config["BLOCK_T"], spec.l, spec.d, q.device)
    fn = kernel_fn("window_fwd", spec, config)
    fn[(tiles.shape[0], spec.H)](q, k, v, o, lse, tiles, DOT_PRECISION=dot_precision(q),
                                 **launch_options(config))
    return o, lse
