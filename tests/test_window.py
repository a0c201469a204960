"""window_fwd (sliding-window attention) against the fp32 reference naive_window.

Kernels run in the Triton interpreter (TRITON_INTERPRET=1, conftest's default) on the CPU,
where tl.dot on bf16 is not meaningful: bf16 runs only on a GPU (TRITON_INTERPRET=0).
Outputs are NaN-poisoned before each run, so an element the kernel never writes fails.
"""
from __future__ import annotations

import pytest
import torch

from conftest import check_cudnn_falls_back, CUDNN_DTYPE, DEVICE, DTYPES, TOL, cudnn_config, rel_err
from nsa_gen.config import Config
from nsa_gen.kernels import kernel_def
from nsa_gen.naive import naive_window
from nsa_gen.ops import common, window
from nsa_gen.ops.window import window_fwd
from nsa_gen.spec import load_spec


def make_spec(G: int, DK: int = 48, DV: int = 32, w: int = 24, H: int = 1):
    """The paper's spec scaled down; DK = 48 is cut into 32 + 16 tiles, DK != DV."""
    return load_spec("deepseek-nsa").replace(
        heads={"q": G * H, "kv": H}, head_dim={"k": DK, "v": DV},
        compression={"block": 8, "stride": 4, "phi": "mean"},
        selection={"block": 16, "top_n": 4, "initial_blocks": 1, "local_blocks": 2}, window=w)


def rand_qkv(spec, B: int, T: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, spec.HQ, spec.DK, generator=g)
    k = torch.randn(B, T, spec.H, spec.DK, generator=g)
    v = torch.randn(B, T, spec.H, spec.DV, generator=g)
    return [x.to(DEVICE, dtype) for x in (q, k, v)]


def poisoned(spec, B: int, T: int, dtype):
    o = torch.full((B, T, spec.HQ, spec.DV), float("nan"), device=DEVICE, dtype=dtype)
    lse = torch.full((B, T, spec.HQ), float("nan"), device=DEVICE, dtype=torch.float32)
    return o, lse


def ref_window(q, k, v, w: int, scale: float):
    """(o, lse) in fp32: naive_window for o, the log-sum-exp of the same masked logits."""
    o = naive_window(q, k, v, w, scale)
    G = q.shape[2] // k.shape[2]
    logits = torch.einsum("bthd,bshd->bhts", q.float(), k.float().repeat_interleave(G, 2)) * scale
    s = torch.arange(q.shape[1], device=q.device)
    delta = s[:, None] - s[None, :]
    lse = logits.masked_fill(~((delta >= 0) & (delta < w)), float("-inf")).logsumexp(-1)
    return o, lse.transpose(1, 2)


def ref_window_varlen(q, k, v, w: int, scale: float, cu: list[int]):
    outs = [ref_window(q[:, a:b], k[:, a:b], v[:, a:b], w, scale) for a, b in zip(cu, cu[1:])]
    return torch.cat([o for o, _ in outs], 1), torch.cat([x for _, x in outs], 1)


def check(o, lse, ref_o, ref_lse, dtype):
    assert not o.isnan().any() and not lse.isnan().any(), "unwritten (NaN-poisoned) outputs"
    assert rel_err(o, ref_o) < TOL[dtype]
    # Every query sees at least itself: lse is finite everywhere.
    assert torch.isfinite(lse).all()
    assert (lse - ref_lse).abs().max().item() < 50 * TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("G", [1, 4, 16])
def test_window_fwd(G, dtype):
    spec = make_spec(G, H=2 if G < 16 else 1)
    B, T = 2, 77  # ragged: no multiple of any tile
    q, k, v = rand_qkv(spec, B, T, dtype, seed=G)
    out = poisoned(spec, B, T, dtype)
    o, lse = window_fwd(q, k, v, spec, out=out)
    assert o is out[0] and lse is out[1]
    check(o, lse, *ref_window(q, k, v, spec.w, spec.softmax_scale), dtype)


# Tile shapes that exercise each loop phase: a head (window start inside the tile: w small
# against BLOCK_T), a body, and an edge of several key tiles; BLOCK_N > w too.
# TMA alternates: K/V tiles through tensor descriptors or pointers, at several tile shapes.
CONFIGS = [
    dict(BLOCK_T=16, BLOCK_N=16, TMA=0), dict(BLOCK_T=32, BLOCK_N=16, TMA=1),
    dict(BLOCK_T=4, BLOCK_N=32, TMA=0), dict(BLOCK_T=1, BLOCK_N=64, TMA=1),
    dict(BLOCK_T=64, BLOCK_N=128, TMA=0),
]


def cfg_id(c) -> str:
    return f"T{c['BLOCK_T']}-N{c['BLOCK_N']}-tma{c['TMA']}"


@pytest.mark.parametrize("w", [1, 5, 24, 1000])
@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_window_fwd_tiles(cfg, w):
    G = max(1, 16 // cfg["BLOCK_T"])  # the smallest group that fills tl.dot's 16 rows
    spec = make_spec(G, DK=32, DV=48, w=w)
    config = Config.make(num_warps=4, num_stages=2, CUDNN=0, **cfg)
    assert kernel_def("window_fwd").valid(spec, config)
    B, T = 1, 101
    q, k, v = rand_qkv(spec, B, T, torch.float32, seed=w)
    out = poisoned(spec, B, T, torch.float32)
    o, lse = window_fwd(q, k, v, spec, config=config, out=out)
    check(o, lse, *ref_window(q, k, v, w, spec.softmax_scale), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("G", [1, 4])
def test_window_fwd_varlen(G, dtype):
    """Three ragged sequences packed in one row; windows restart at each sequence."""
    spec = make_spec(G, H=2, w=20)
    cu = [0, 45, 50, 113]
    T = cu[-1]
    q, k, v = rand_qkv(spec, 1, T, dtype, seed=10 + G)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    runs = []
    for tma in (0, 1):  # TMA boxes cross from one sequence into the next
        config = Config.make(BLOCK_T=16 // G, BLOCK_N=16, TMA=tma, num_warps=4, num_stages=2)
        out = poisoned(spec, 1, T, dtype)
        runs.append(window_fwd(q, k, v, spec, config=config, cu_seqlens=cu_t, out=out))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    o, lse = runs[1]
    check(o, lse, *ref_window_varlen(q, k, v, spec.w, spec.softmax_scale, cu), dtype)


def test_window_fwd_rejects_bad_shapes():
    spec = make_spec(4, H=2)
    q, k, v = rand_qkv(spec, 1, 10, torch.float32, seed=0)
    with pytest.raises(ValueError):
        window_fwd(q, k[:, :9], v[:, :9], spec)
    with pytest.raises(ValueError):
        window_fwd(q, k, v, spec, cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32))


# ------------------------------------------------------ window_fwd through cuDNN's band (CUDNN)

def counting(monkeypatch, name: str) -> list:
    """Count the calls of window.<name> (one of the band's entry points), still running it."""
    calls, real = [], getattr(window, name)

    def counted(*a):
        calls.append(tuple(a[0].shape))
        return real(*a)
    monkeypatch.setattr(window, name, counted)
    return calls


@pytest.mark.parametrize("w,T", [(24, 77), (1, 40), (1000, 50), (16, 16)])
@pytest.mark.parametrize("G", [1, 4, 16])
def test_window_fwd_cudnn(G, w, T, monkeypatch):
    """CUDNN = 1: cuDNN's diagonal band (left bound w, right bound 0) over [B, heads, T, D]
    views of the inputs, B = 2, DK != DV, poisoned outputs; w = 1 and w > T at the edges. On
    the CPU the band is torch math; on a GPU, cuDNN's graph, with no fallback."""
    calls = counting(monkeypatch, "_band_fwd")
    monkeypatch.setattr(common, "_CUDNN_REFUSED", set())  # one refusal fails one case
    fell = common.FALLBACK_COUNTS.copy()
    spec = make_spec(G, w=w, H=2 if G < 16 else 1)
    q, k, v = rand_qkv(spec, 2, T, CUDNN_DTYPE, seed=T + G)
    out = poisoned(spec, 2, T, CUDNN_DTYPE)
    o, lse = window_fwd(q, k, v, spec, config=cudnn_config("window_fwd", spec, T), out=out)
    assert calls == [q.shape] and common.FALLBACK_COUNTS == fell
    check(o, lse, *ref_window(q, k, v, w, spec.softmax_scale), CUDNN_DTYPE)


@pytest.mark.parametrize("why", ["packed", "error"])
def test_window_fwd_cudnn_falls_back(why, monkeypatch, caplog):
    """The generated kernel instead, with a warning, for packed sequences and when cuDNN
    raises. (Refusals are remembered per launch shape in ops.common, shared with
    compression, whose tests check that.)"""
    spec = make_spec(4, H=2, w=20)
    q, k, v = rand_qkv(spec, 1, 113, CUDNN_DTYPE, seed=5)

    def run(cfg, cu):
        cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEVICE)
        return window_fwd(q, k, v, spec, cfg, cu_seqlens=cu_t)
    check_cudnn_falls_back("window_fwd", why, spec, run, (window, "_band_fwd"), monkeypatch, caplog)


def test_window_fwd_cudnn_needs_the_frontend_on_cuda(monkeypatch):
    """On CUDA without the cuDNN frontend a CUDNN config names why it cannot run (and
    falls back); off CUDA the fp32 math stands in, so nothing is missing."""
    monkeypatch.setattr(window, "_frontend", lambda: None)
    assert window._frontend_missing(torch.empty(1)) is None
    if torch.cuda.is_available():
        assert "nvidia-cudnn-frontend" in window._frontend_missing(torch.empty(1, device="cuda"))
