"""Sliding-window attention (the `swa` branch): launchers and autograd wrapper."""
from __future__ import annotations

import torch

from ..config import Config
from ..kernels import kernel_def, kernel_fn, kernel_module
from ..spec import NSASpec
from .common import (check_grad_inputs, check_qkv, check_seqlens, dkv_launch_options,
                     dot_precision, kv_tile_args, launch_options, outputs, tile_table,
                     tma_config)


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
    check_seqlens(cu_seqlens, B, T, q.device)
    o, lse = outputs(out, (B, T, spec.HQ, spec.DV), (B, T, spec.HQ), q)
    if B * T == 0:
        return o, lse
    tiles = tile_table(cu_seqlens, B, T, config["BLOCK_T"], spec.l, spec.d, q.device)
    config = tma_config("window_fwd", config, k, v)
    fn = kernel_fn("window_fwd", spec, config)
    fn[(tiles.shape[0], spec.H)](q, *kv_tile_args(k, v, spec, config, config["BLOCK_N"]),
                                 o, lse, tiles, DOT_PRECISION=dot_precision(q),
                                 **launch_options(config))
    return o, lse


def window_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
               lse: torch.Tensor, do: torch.Tensor, spec: NSASpec, config: Config | None = None,
               cu_seqlens: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `window_fwd`: (dq [B, T, HQ, DK], dk [B, T, H, DK], dv [B, T, H, DV]),
    in the inputs' dtypes.

    o [B, T, HQ, DV], lse [B, T, HQ] (fp32): the forward's outputs; do: dL/do, like o.
    Deterministic: no float atomics; each key's dk/dv is summed by one program over the
    queries whose window holds it (see templates/window_bwd.py.j2).
    """
    B, T = check_qkv(spec, q, k, v)
    check_grad_inputs(spec, q, o, lse, do)
    config = config or kernel_def("window_bwd").default(spec, T)
    q, k, v, do, lse = (x.contiguous() for x in (q, k, v, do, lse))
    check_seqlens(cu_seqlens, B, T, q.device)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=q.device, dtype=q.dtype)
    dv = torch.empty(v.shape, device=q.device, dtype=q.dtype)
    if B * T == 0:
        return dq, dk, dv
    o = o.contiguous()
    delta = torch.empty(lse.shape, device=q.device, dtype=torch.float32)  # the dq kernel fills it
    mod = kernel_module("window_bwd", spec, config)
    opts, prec = launch_options(config), dot_precision(q)
    tiles = tile_table(cu_seqlens, B, T, config["BLOCK_T"], spec.l, spec.d, q.device)
    mod.nsa_window_bwd_kernel[(tiles.shape[0], spec.H)](
        q, k, v, o, do, lse, delta, dq, tiles, DOT_PRECISION=prec, **opts)
    # Key tiles: the same table over DKV_BLOCK_N tokens (a tile never straddles sequences).
    key_tiles = tile_table(cu_seqlens, B, T, config["DKV_BLOCK_N"], spec.l, spec.d, q.device)
    mod.nsa_window_bwd_dkv_kernel[(key_tiles.shape[0], spec.H)](
        q, k, v, do, lse, delta, dk, dv, key_tiles, DOT_PRECISION=prec, **dkv_launch_options(config))
    return dq, dk, dv


class WindowFunction(torch.autograd.Function):
    """Sliding-window attention, differentiable in q, k, v."""

    @staticmethod
    def forward(ctx, q, k, v, spec, fwd_config, bwd_config, cu_seqlens):
        o, lse = window_fwd(q, k, v, spec, fwd_config, cu_seqlens)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
        ctx.spec, ctx.bwd_config = spec, bwd_config
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = window_bwd(q, k, v, o, lse, do, ctx.spec, ctx.bwd_config, cu_seqlens)
        return dq, dk, dv, None, None, None, None
