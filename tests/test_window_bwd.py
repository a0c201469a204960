"""window_bwd / WindowFunction (sliding-window attention, backward) against torch autograd
of the fp32 reference naive_window.

Kernels run in the Triton interpreter (TRITON_INTERPRET=1, conftest's default) on the CPU,
where tl.dot on bf16 is not meaningful: bf16 runs only on a GPU (TRITON_INTERPRET=0).
Launchers' torch.empty outputs are NaN-poisoned (the `poison` fixture), so an element the
kernels never write fails.
"""
from __future__ import annotations

import pytest
import torch

from conftest import (check_cudnn_falls_back, check_cudnn_matches_kernels, check_deterministic,
                      CUDNN_DTYPE, DEVICE, DTYPES, check_grads, cudnn_config, rand_inputs)
from nsa_gen.config import Config
from nsa_gen.kernels import kernel_def
from nsa_gen.naive import naive_window
from nsa_gen.ops import common, window
from nsa_gen.ops.window import WindowFunction, window_bwd, window_fwd
from nsa_gen.spec import load_spec


def make_spec(G: int, DK: int = 48, DV: int = 32, w: int = 24, H: int = 1):
    """The paper's spec scaled down; DK = 48 is cut into 32 + 16 tiles, DK != DV."""
    return load_spec("deepseek-nsa").replace(
        heads={"q": G * H, "kv": H}, head_dim={"k": DK, "v": DV},
        compression={"block": 8, "stride": 4, "phi": "mean"},
        selection={"block": 16, "top_n": 4, "initial_blocks": 1, "local_blocks": 2}, window=w)


def ref_grads(spec, q, k, v, do, cu: list[int] | None = None):
    """fp32 autograd of naive_window, per sequence when cu is given: o and the gradients of
    sum(o * do) w.r.t. q, k, v."""
    q, k, v = (x.detach().float().requires_grad_() for x in (q, k, v))
    bounds = [(0, q.shape[1])] if cu is None else list(zip(cu, cu[1:]))
    o = torch.cat([naive_window(q[:, a:b], k[:, a:b], v[:, a:b], spec.w, spec.softmax_scale)
                   for a, b in bounds], 1)
    (o * do.float()).sum().backward()
    return o.detach(), q.grad, k.grad, v.grad


def run_function(spec, q, k, v, do, config=None, cu: list[int] | None = None, fwd_config=None):
    """WindowFunction, backward of sum(o * do): (o, dq, dk, dv)."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    o = WindowFunction.apply(q, k, v, spec, fwd_config, config, cu_t)
    (o * do).sum().backward()
    return o, q.grad, k.grad, v.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# G = 3: padded heads (G_PAD = 4) must add nothing to dk and dv.
@pytest.mark.parametrize("G", [1, 3, 4, 16])
def test_window_bwd(G, dtype, poison):
    spec = make_spec(G, H=2 if G < 16 else 1, w=20)
    B, T = 2, 45  # ragged: no multiple of any tile
    q, k, v, do = rand_inputs(spec, B, T, dtype, seed=G)
    check_grads(run_function(spec, q, k, v, do), ref_grads(spec, q, k, v, do), dtype)


# dq: BLOCK_N against w and BLOCK_T decides the head / body / edge split (as in the forward).
# dk/dv: DKV_BLOCK_N against DKV_BLOCK_T sets the length of the diagonal phase, and against w
# whether there is a body at all (w < DKV_BLOCK_N: none) before the masked tail.
CONFIGS = [
    dict(BLOCK_T=16, BLOCK_N=16, DKV_BLOCK_N=16, DKV_BLOCK_T=16),
    dict(BLOCK_T=4, BLOCK_N=32, DKV_BLOCK_N=64, DKV_BLOCK_T=1),
    dict(BLOCK_T=1, BLOCK_N=64, DKV_BLOCK_N=16, DKV_BLOCK_T=4),
    dict(BLOCK_T=64, BLOCK_N=128, DKV_BLOCK_N=32, DKV_BLOCK_T=16),
    dict(BLOCK_T=2, BLOCK_N=16, DKV_BLOCK_N=16, DKV_BLOCK_T=1),
]


def cfg_id(c) -> str:
    return "-".join(f"{k.replace('BLOCK_', '')}{v}" for k, v in c.items())


# w = 27: the dk/dv body of 16-key tiles ends exactly at the window's reach with 1- and
# 4-token query tiles, one query off and the test catches it.
@pytest.mark.parametrize("w", [1, 5, 27, 1000])
@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_window_bwd_tiles(cfg, w, poison):
    # The smallest group that fills tl.dot's 16 rows in both kernels.
    G = max(1, 16 // min(cfg["BLOCK_T"], cfg["DKV_BLOCK_T"]))
    spec = make_spec(G, DK=32, DV=48, w=w)
    config = Config.make(num_warps=4, num_stages=2, DKV_WARPS=4, DKV_STAGES=2, CUDNN=0, **cfg)
    assert kernel_def("window_bwd").valid(spec, config)
    B, T = 1, 67
    q, k, v, do = rand_inputs(spec, B, T, torch.float32, seed=w)
    o, lse = window_fwd(q, k, v, spec)
    got = (o,) + window_bwd(q, k, v, o, lse, do, spec, config)
    check_grads(got, ref_grads(spec, q, k, v, do), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("G", [1, 4])
def test_window_bwd_varlen(G, dtype, poison):
    """Three ragged sequences packed in one row, one shorter than a tile: windows and key
    gradients never cross a sequence boundary."""
    spec = make_spec(G, H=2, w=20)
    cu = [0, 37, 42, 83]
    q, k, v, do = rand_inputs(spec, 1, cu[-1], dtype, seed=30 + G)
    config = Config.make(BLOCK_T=16 // G, BLOCK_N=16, DKV_BLOCK_N=16, DKV_BLOCK_T=16 // G,
                         num_warps=4, num_stages=2)
    check_grads(run_function(spec, q, k, v, do, config, cu), ref_grads(spec, q, k, v, do, cu),
                dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_window_bwd_deterministic(dtype):
    """No atomics: two runs give bit-for-bit equal gradients."""
    check_deterministic(make_spec(4, H=2, w=20), run_function, dtype)


# ------------------------------------------------------ window_bwd through cuDNN's band (CUDNN)

@pytest.mark.parametrize("w,T", [(20, 45), (1, 40), (1000, 50)])
@pytest.mark.parametrize("G", [1, 4, 16])
def test_window_bwd_cudnn(G, w, T, monkeypatch, poison):
    """CUDNN = 1 both ways (WindowFunction): cuDNN's band backward from its forward's o and
    lse, over [B, heads, T, D] views, B = 2, DK != DV; w = 1 and w > T at the edges. On the
    CPU the band is torch math; on a GPU, cuDNN's graphs, with no fallback."""
    calls = []
    real = window._band_bwd
    monkeypatch.setattr(window, "_band_bwd", lambda *a: (calls.append(1), real(*a))[1])
    monkeypatch.setattr(common, "_CUDNN_REFUSED", set())
    fell = common.FALLBACK_COUNTS.copy()
    spec = make_spec(G, H=2 if G < 16 else 1, w=w)
    q, k, v, do = rand_inputs(spec, 2, T, CUDNN_DTYPE, seed=T + G)
    got = run_function(spec, q, k, v, do, cudnn_config("window_bwd", spec, T),
                       fwd_config=cudnn_config("window_fwd", spec, T))
    assert calls == [1] and common.FALLBACK_COUNTS == fell
    check_grads(got, ref_grads(spec, q, k, v, do), CUDNN_DTYPE)


def test_window_bwd_cudnn_matches_kernels():
    """From the same forward outputs (the generated kernel's), cuDNN's band backward equals
    the generated kernels' to rounding (fp32's in the interpreter, fp16's on a GPU)."""
    spec = make_spec(4, H=2, w=20)
    q, k, v, do = rand_inputs(spec, 2, 61, CUDNN_DTYPE, seed=11)
    o, lse = window_fwd(q, k, v, spec)
    check_cudnn_matches_kernels(lambda cfg: window_bwd(q, k, v, o, lse, do, spec, cfg),
                                cudnn_config("window_bwd", spec, 61), ("dq", "dk", "dv"))


@pytest.mark.parametrize("why", ["packed", "deterministic", "error"])
def test_window_bwd_cudnn_falls_back(why, monkeypatch, caplog):
    """The generated kernels instead, with a warning, for packed sequences, under
    torch.use_deterministic_algorithms, and when cuDNN raises."""
    spec = make_spec(4, H=2, w=20)
    q, k, v, do = rand_inputs(spec, 1, 113, CUDNN_DTYPE, seed=5)
    check_cudnn_falls_back("window_bwd", why, spec,
                           lambda cfg, cu: run_function(spec, q, k, v, do, cfg, cu),
                           (window, "_band_bwd"), monkeypatch, caplog)
