"""Sliding-window attention (the `swa` branch): launchers and autograd wrapper."""
from __future__ import annotations

import functools

import torch

from ..config import Config
from ..kernels import kernel_def, kernel_module
from ..spec import NSASpec
from .common import (attention_math, attention_math_bwd, check_grad_inputs, check_qkv,
                     check_seqlens, cudnn_config, cudnn_refused, dkv_launch_options,
                     dot_precision, launch_options, outputs, tile_table, token_tile_fwd)


def window_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: NSASpec,
               config: Config | None = None, cu_seqlens: torch.Tensor | None = None,
               out: tuple[torch.Tensor, torch.Tensor] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of query t over the keys max(0, t - w + 1) .. t of its sequence (w = spec.w).

    q [B, T, HQ, DK], k [B, T, H, DK], v [B, T, H, DV]; cu_seqlens (int32 [N+1], B = 1)
    packs sequences, positions counting from each sequence's start. config: defaults to
    the kernel's heuristic. out: optional (o, lse) to write into. Returns o [B, T, HQ, DV]
    (q's dtype) and lse [B, T, HQ] (fp32, natural log).
    config CUDNN = 1 runs it as cuDNN's own sliding-window attention (the cuDNN frontend's
    diagonal band, `_band_fwd`; off CUDA the same math in fp32) instead of the generated
    kernel; it falls back to the kernel, with a warning, for packed sequences, fp32 on CUDA,
    without the frontend installed, or when cuDNN refuses.
    """
    B, T = check_qkv(spec, q, k, v)
    config = config or kernel_def("window_fwd").default(spec, T)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    check_seqlens(cu_seqlens, B, T, q.device)
    o, lse = outputs(out, (B, T, spec.HQ, spec.DV), (B, T, spec.HQ), q)
    if B * T == 0:
        return o, lse
    config = cudnn_config("window_fwd", config, q, spec, cu_seqlens, _frontend_missing(q))
    if config.get("CUDNN", 0):
        try:
            _band_fwd(q, k, v, o, lse, spec)
            return o, lse
        except Exception as e:  # noqa: BLE001 - any cuDNN refusal runs the kernel instead
            config = cudnn_refused("window_fwd", config, q, spec, e)
    token_tile_fwd("window_fwd", q, k, v, o, lse, spec, config, cu_seqlens, "BLOCK_N")
    return o, lse


def window_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
               lse: torch.Tensor, do: torch.Tensor, spec: NSASpec, config: Config | None = None,
               cu_seqlens: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `window_fwd`: (dq [B, T, HQ, DK], dk [B, T, H, DK], dv [B, T, H, DV]),
    in the inputs' dtypes.

    o [B, T, HQ, DV], lse [B, T, HQ] (fp32): the forward's outputs; do: dL/do, like o.
    Deterministic: no float atomics; each key's dk/dv is summed by one program over the
    queries whose window holds it (see templates/window_bwd.py.j2). config CUDNN = 1 runs
    cuDNN's band backward instead (`_band_bwd`, from any forward's o and lse), which is not
    deterministic: it falls back to the kernels, with a warning, under
    torch.use_deterministic_algorithms, and where window_fwd's CUDNN does.
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
    config = cudnn_config("window_bwd", config, q, spec, cu_seqlens, _frontend_missing(q))
    if config.get("CUDNN", 0):
        try:
            _band_bwd(q, k, v, o, lse, do, (dq, dk, dv), spec)
            return dq, dk, dv
        except Exception as e:  # noqa: BLE001 - any cuDNN refusal runs the kernels instead
            config = cudnn_refused("window_bwd", config, q, spec, e)
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


# ------------------------------------------------------------- the CUDNN variant (cuDNN's band)
# cuDNN's fused attention has a diagonal band: with top-left alignment, left bound w and right
# bound 0, query t sees keys t - w < s <= t, NSA's window exactly, and cuDNN skips the tiles
# outside it. torch's cuDNN attention exposes no band, so this goes through the cuDNN frontend
# (`nvidia-cudnn-frontend`, imported as `cudnn`), an optional dependency. Its graphs see the
# [B, T, heads, D] tensors as [B, heads, T, D] views (no copies; GQA by head counts).
# H200, bf16, 64k, tuner medians (RESULTS run 40): forward -9% (deepseek-nsa) and -24%
# (small-group) against window_fwd, backward -26% and -29% against window_bwd.

# Built graphs by (direction, device, dtype, w, scale, each tensor's shape and strides):
# building one (heuristics, plans) costs far more than running it.
_GRAPHS: dict[tuple, tuple] = {}
_HANDLES: dict[torch.device, object] = {}


@functools.cache  # a failed import is not retried on every launch
def _frontend():
    """The cuDNN frontend module, or None where it is not installed."""
    try:
        import cudnn
    except ImportError:
        return None
    return cudnn


def _frontend_missing(q: torch.Tensor) -> str | None:
    """Why a CUDNN config cannot run on q's device, or None (off CUDA the math stands in)."""
    if q.is_cuda and _frontend() is None:
        return "the cuDNN frontend is not installed (pip install nvidia-cudnn-frontend)"
    return None


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    """[B, T, heads, D] -> the [B, heads, T, D] view cuDNN's graphs describe (no copy)."""
    return x.transpose(1, 2)


def _build(cudnn, spec: NSASpec, ins: dict, outs: dict) -> tuple:
    """cuDNN's band attention as a graph: forward (ins q, k, v; outs o, stats) or backward
    (ins q, k, v, o, do, stats; outs dq, dk, dv). Returns (graph, its tensors by name,
    workspace bytes)."""
    io = {torch.float16: cudnn.data_type.HALF, torch.bfloat16: cudnn.data_type.BFLOAT16}
    g = cudnn.pygraph(io_data_type=io[ins["q"].dtype], intermediate_data_type=cudnn.data_type.FLOAT,
                      compute_data_type=cudnn.data_type.FLOAT)
    t = {name: g.tensor_like(x) for name, x in ins.items()}
    band = dict(attn_scale=spec.softmax_scale, diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT,
                diagonal_band_left_bound=spec.w, diagonal_band_right_bound=0)
    if "do" in ins:
        got = g.sdpa_backward(name="window_bwd", q=t["q"], k=t["k"], v=t["v"], o=t["o"],
                              dO=t["do"], stats=t["stats"], **band)
    else:
        got = g.sdpa(name="window_fwd", q=t["q"], k=t["k"], v=t["v"], generate_stats=True, **band)
    for (name, x), gt in zip(outs.items(), got):
        gt.set_output(True)
        if x.dtype == torch.float32:
            gt.set_data_type(cudnn.data_type.FLOAT)
        gt.set_dim(list(x.shape)).set_stride(list(x.stride()))
        t[name] = gt
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    return g, t, g.get_workspace_size()


def _execute(spec: NSASpec, ins: dict, outs: dict) -> None:
    """Run cuDNN's band attention on ins into outs (see `_build`) on torch's current stream,
    building its graph the first time these shapes and strides come."""
    cudnn = _frontend()
    # Detached: the frontend refuses tensors that require grad (WindowFunction's inputs do).
    ins, outs = ({n: x.detach() for n, x in d.items()} for d in (ins, outs))
    q = ins["q"]
    key = ("do" in ins, q.device, q.dtype, spec.w, spec.softmax_scale,
           *((name, tuple(x.shape), tuple(x.stride())) for name, x in (*ins.items(), *outs.items())))
    if key not in _GRAPHS:
        if len(_GRAPHS) > 64:
            _GRAPHS.clear()
        with torch.cuda.device(q.device):
            _GRAPHS[key] = _build(cudnn, spec, ins, outs)
    g, tensors, ws_bytes = _GRAPHS[key]
    if q.device not in _HANDLES:
        with torch.cuda.device(q.device):
            _HANDLES[q.device] = cudnn.create_handle()
    handle = _HANDLES[q.device]
    cudnn.set_stream(handle, torch.cuda.current_stream(q.device).cuda_stream)
    ws = torch.empty(ws_bytes, device=q.device, dtype=torch.uint8)
    g.execute({tensors[name]: x for name, x in (*ins.items(), *outs.items())}, ws, handle=handle)


def _band_fwd(q, k, v, o, lse, spec: NSASpec) -> None:
    """window_fwd's CUDNN variant, into o and lse (shapes as window_fwd's)."""
    if not q.is_cuda:  # the interpreter's tests: the same band in fp32 math
        o4, lse3 = attention_math(_bhsd(q), _bhsd(k), _bhsd(v), spec.softmax_scale, spec.w)
        _bhsd(o).copy_(o4)
        lse.copy_(lse3.transpose(1, 2))
        return
    B, T = q.shape[:2]
    # cuDNN's stats ([B, HQ, T, 1], natural log) are lse laid out head-major.
    stats = torch.empty(B, spec.HQ, T, 1, device=q.device, dtype=torch.float32)
    _execute(spec, dict(q=_bhsd(q), k=_bhsd(k), v=_bhsd(v)), dict(o=_bhsd(o), stats=stats))
    lse.copy_(stats[..., 0].transpose(1, 2))


def _band_bwd(q, k, v, o, lse, do, grads: tuple, spec: NSASpec) -> None:
    """window_bwd's CUDNN variant, into grads = (dq, dk, dv) (shapes as window_bwd's)."""
    if not q.is_cuda:
        got = attention_math_bwd(_bhsd(q), _bhsd(k), _bhsd(v), _bhsd(o), lse.transpose(1, 2),
                                 _bhsd(do), spec.softmax_scale, spec.w)
        for x, y in zip(grads, got):
            _bhsd(x).copy_(y)
        return
    stats = lse.transpose(1, 2).unsqueeze(-1).contiguous()
    _execute(spec, dict(q=_bhsd(q), k=_bhsd(k), v=_bhsd(v), o=_bhsd(o), do=_bhsd(do), stats=stats),
             dict(dq=_bhsd(grads[0]), dk=_bhsd(grads[1]), dv=_bhsd(grads[2])))


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
