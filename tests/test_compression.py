"""compress_mean and compression_fwd (compressed attention) against the fp32 reference
(naive_compress, naive_compressed_attention).

Kernels run in the Triton interpreter (TRITON_INTERPRET=1, conftest's default) on the CPU,
where tl.dot on bf16 is not meaningful: bf16 runs only on a GPU (TRITON_INTERPRET=0).
Outputs are NaN-poisoned before each run, so an element the kernel never writes fails.
"""
from __future__ import annotations

import pytest
import torch

from conftest import check_cudnn_falls_back, cmp_spec, CUDNN_DTYPE, CUDNN_TOL, CUDNN_WRONG, DEVICE, DTYPES, TOL, cudnn_config, rel_err
from nsa_gen.config import Config
from nsa_gen.kernels import kernel_def
from nsa_gen.naive import naive_compress, naive_compressed_attention
from nsa_gen.ops import common
from nsa_gen.ops.compression import compress_mean, compression_fwd


make_spec = cmp_spec


def rand(shape, dtype, g):
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def rand_qkv(spec, B: int, T: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (rand((B, T, spec.HQ, spec.DK), dtype, g), rand((B, T, spec.H, spec.DK), dtype, g),
            rand((B, T, spec.H, spec.DV), dtype, g))


def poisoned(spec, B: int, T: int, dtype):
    o = torch.full((B, T, spec.HQ, spec.DV), float("nan"), device=DEVICE, dtype=dtype)
    lse = torch.full((B, T, spec.HQ), float("nan"), device=DEVICE, dtype=torch.float32)
    return o, lse


def ref_cmp(q, k_cmp, v_cmp, l: int, d: int, scale: float):  # noqa: E741
    """(o, lse) in fp32: naive_compressed_attention for o, the log-sum-exp of the same
    masked logits (-inf where no block is visible)."""
    o, _ = naive_compressed_attention(q, k_cmp, v_cmp, l, d, scale)
    G = q.shape[2] // k_cmp.shape[2]
    logits = torch.einsum("bthd,bnhd->bhtn", q.float(),
                          k_cmp.float().repeat_interleave(G, 2)) * scale
    t = torch.arange(q.shape[1], device=q.device)[:, None]
    i = torch.arange(k_cmp.shape[1], device=q.device)[None, :]
    lse = logits.masked_fill(~(i * d + l - 1 <= t), float("-inf")).logsumexp(-1)
    return o, lse.transpose(1, 2)


def check(o, lse, ref_o, ref_lse, dtype, T_blind):
    """T_blind: per sequence, the first positions (t < l - 1) that see no block."""
    assert not o.isnan().any() and not lse.isnan().any(), "unwritten (NaN-poisoned) outputs"
    assert rel_err(o, ref_o) < TOL[dtype]
    blind = torch.isinf(ref_lse)
    assert blind.sum().item() == T_blind * o.shape[0] * o.shape[2]
    # Queries that see nothing: o exactly 0 (not NaN), lse -inf.
    assert (o.float()[blind] == 0).all()
    assert (lse[blind] == float("-inf")).all()
    assert (lse[~blind] - ref_lse[~blind]).abs().max().item() < 50 * TOL[dtype]


# ----------------------------------------------------------------------------- compress_mean


def poisoned_cmp(shape, dtype):
    return torch.full(shape, float("nan"), device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("l,d", [(8, 4), (4, 4), (16, 4), (1, 1), (32, 8)])
@pytest.mark.parametrize("T", [3, 8, 37])
def test_compress_mean(T, l, d):  # noqa: E741
    """The kernel (templates/compress_mean.py.j2) at its default config, B = 2, every
    element written (the output is NaN-poisoned)."""
    spec = make_spec(1, l=l, d=d)
    g = torch.Generator().manual_seed(T * 100 + l)
    x = rand((2, T, 3, 16), torch.float32, g)
    ref = naive_compress(x, l, d)
    out = poisoned_cmp(ref.shape, x.dtype)
    x_cmp, cu_cmp = compress_mean(x, spec, out=out)
    assert cu_cmp is None and x_cmp.data_ptr() == out.data_ptr()  # written in place
    assert x_cmp.shape == ref.shape and x_cmp.dtype == x.dtype
    torch.testing.assert_close(x_cmp, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("l,d", [(32, 16), (64, 64)])
def test_compress_mean_configs(l, d, dtype):  # noqa: E741
    """Every tile of the space (BLOCK_C x BLOCK_DIM) and each warp count, a head dim that
    is no multiple of the widest column tile (48) and one that is (the built-in specs' 128)."""
    spec = make_spec(1, l=l, d=d)
    kd = kernel_def("compress_mean")
    space = kd.space(spec)
    g = torch.Generator().manual_seed(l + d)
    for D in (48, 128):
        x = rand((1, 3 * l + d + 5, 2, D), dtype, g)
        ref = naive_compress(x.float(), l, d)
        for bc in space["BLOCK_C"]:
            for bd in space["BLOCK_DIM"]:
                for nw in (1, 4):
                    cfg = Config.make(BLOCK_C=bc, BLOCK_DIM=bd, num_warps=nw, num_stages=1)
                    assert kd.valid(spec, cfg)
                    out = poisoned_cmp(ref.shape, dtype)
                    compress_mean(x, spec, cfg, out=out)
                    assert rel_err(out, ref) < TOL[dtype], (D, cfg)


def test_compress_mean_long_stride():
    """A stride chunk longer than one tile (d = 512 > 256 tokens) is summed in pieces."""
    spec = make_spec(1, l=512, d=512)
    g = torch.Generator().manual_seed(9)
    x = rand((1, 1100, 1, 16), torch.float32, g)
    ref = naive_compress(x, 512, 512)
    out = poisoned_cmp(ref.shape, x.dtype)
    compress_mean(x, spec, out=out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_compress_mean_16bit_accumulates_in_fp32():
    g = torch.Generator().manual_seed(3)
    x = (rand((1, 200, 2, 16), torch.float32, g) + 100).to(torch.bfloat16)
    x_cmp, _ = compress_mean(x, make_spec(1, l=64, d=16))
    assert x_cmp.dtype == torch.bfloat16
    torch.testing.assert_close(x_cmp.float(), naive_compress(x, 64, 16), rtol=8e-3, atol=0)


def test_compress_mean_varlen():
    """Blocks never cross a sequence boundary; a sequence shorter than l has none."""
    l, d = 8, 4  # noqa: E741
    cu = [0, 21, 26, 26, 60]
    g = torch.Generator().manual_seed(5)
    x = rand((1, cu[-1], 2, 16), torch.float32, g)
    refs = [naive_compress(x[:, a:b], l, d) for a, b in zip(cu, cu[1:])]
    out = poisoned_cmp((1, sum(r.shape[1] for r in refs), 2, 16), x.dtype)
    x_cmp, cu_cmp = compress_mean(x, make_spec(1, l=l, d=d), cu_seqlens=torch.tensor(cu, device=DEVICE),
                                  out=out)
    torch.testing.assert_close(x_cmp, torch.cat(refs, 1), rtol=1e-5, atol=1e-5)
    want = [0]
    for r in refs:
        want.append(want[-1] + r.shape[1])
    assert cu_cmp.dtype == torch.int32 and cu_cmp.tolist() == want == [0, 4, 4, 4, 11]


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("l,d", [(8, 4), (16, 4), (8, 8)])
def test_compress_mean_grad(l, d, varlen):  # noqa: E741
    """dx against autograd through naive_compress (fp32), B = 2 or packed sequences (one
    shorter than l, which gets no gradient)."""
    spec = make_spec(1, l=l, d=d)
    g = torch.Generator().manual_seed(l * 10 + d)
    T = 45
    x = rand((1 if varlen else 2, T, 3, 16), torch.float32, g).requires_grad_()
    cu = [0, 5, 30, T] if varlen else None
    x_cmp, _ = compress_mean(x, spec, cu_seqlens=torch.tensor(cu, device=DEVICE) if varlen else None)
    dy = rand(x_cmp.shape, torch.float32, g)
    (dx,) = torch.autograd.grad(x_cmp, x, dy)
    xr = x.detach().clone().requires_grad_()
    if varlen:
        ref = torch.cat([naive_compress(xr[:, a:b], l, d) for a, b in zip(cu, cu[1:])], 1)
    else:
        ref = naive_compress(xr, l, d)
    (dx_ref,) = torch.autograd.grad(ref, xr, dy)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)


def test_compress_mean_bad_out():
    spec = make_spec(1)
    x = torch.randn(1, 20, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="out has shape"):
        compress_mean(x, spec, out=torch.empty(1, 3, 2, 16, device=DEVICE))


# ----------------------------------------------------------------------------- compression_fwd


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("G", [1, 4, 16])
def test_compression_fwd(G, dtype):
    spec = make_spec(G, H=2 if G < 16 else 1)
    B, T = 2, 77  # ragged: no multiple of any tile, block or stride
    q, k, v = rand_qkv(spec, B, T, dtype, seed=G)
    k_cmp, _ = compress_mean(k, spec)
    v_cmp, _ = compress_mean(v, spec)
    out = poisoned(spec, B, T, dtype)
    o, lse = compression_fwd(q, k_cmp, v_cmp, spec, out=out)
    assert o is out[0] and lse is out[1]
    ref = ref_cmp(q, k_cmp, v_cmp, spec.l, spec.d, spec.softmax_scale)
    check(o, lse, *ref, dtype, T_blind=spec.l - 1)


# BLOCK_T against d decides whether tiles have an edge phase; BLOCK_C against NC whether
# there is a body; BLOCK_T = 1 runs one token per program.
# TMA alternates: K/V tiles through tensor descriptors or pointers, at several tile shapes.
CONFIGS = [
    dict(BLOCK_T=16, BLOCK_C=16, TMA=0, CUDNN=0), dict(BLOCK_T=32, BLOCK_C=16, TMA=1, CUDNN=0),
    dict(BLOCK_T=4, BLOCK_C=32, TMA=0, CUDNN=0), dict(BLOCK_T=1, BLOCK_C=16, TMA=1, CUDNN=0),
    dict(BLOCK_T=64, BLOCK_C=64, TMA=0, CUDNN=0),
]


def cfg_id(c) -> str:
    return f"T{c['BLOCK_T']}-C{c['BLOCK_C']}-tma{c['TMA']}"


@pytest.mark.parametrize("l,d", [(8, 4), (16, 16), (4, 1)])
@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_compression_fwd_tiles(cfg, l, d):  # noqa: E741
    G = max(1, 16 // cfg["BLOCK_T"])  # the smallest group that fills tl.dot's 16 rows
    spec = make_spec(G, DK=32, DV=48, l=l, d=d)
    config = Config.make(num_warps=4, num_stages=2, **cfg)
    assert kernel_def("compression_fwd").valid(spec, config)
    B, T = 1, 101
    q, k, v = rand_qkv(spec, B, T, torch.float32, seed=l + d)
    k_cmp, v_cmp = naive_compress(k, l, d), naive_compress(v, l, d)
    out = poisoned(spec, B, T, torch.float32)
    o, lse = compression_fwd(q, k_cmp, v_cmp, spec, config=config, out=out)
    ref = ref_cmp(q, k_cmp, v_cmp, l, d, spec.softmax_scale)
    check(o, lse, *ref, torch.float32, T_blind=l - 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("G", [1, 4])
def test_compression_fwd_varlen(G, dtype):
    """Ragged sequences packed in one row, one shorter than l (no block at all); a query
    tile never mixes sequences, and each sequence's blocks start at its own first token."""
    spec = make_spec(G, H=2)
    cu = [0, 45, 50, 113]
    T = cu[-1]
    q, k, v = rand_qkv(spec, 1, T, dtype, seed=20 + G)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    k_cmp, cu_cmp = compress_mean(k, spec, cu_seqlens=cu_t)
    v_cmp, _ = compress_mean(v, spec, cu_seqlens=cu_t)
    runs = []
    for tma in (0, 1):  # TMA boxes cross from one sequence's blocks into the next
        config = Config.make(BLOCK_T=16 // G, BLOCK_C=16, TMA=tma, CUDNN=0, num_warps=4, num_stages=2)
        out = poisoned(spec, 1, T, dtype)
        runs.append(compression_fwd(q, k_cmp, v_cmp, spec, config=config, cu_seqlens=cu_t,
                                    cu_seqlens_cmp=cu_cmp, out=out))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    o, lse = runs[1]
    refs = []
    for a, b, ca, cb in zip(cu, cu[1:], cu_cmp.tolist(), cu_cmp.tolist()[1:]):
        refs.append(ref_cmp(q[:, a:b], k_cmp[:, ca:cb], v_cmp[:, ca:cb], spec.l, spec.d,
                            spec.softmax_scale))
    ref_o, ref_lse = torch.cat([r[0] for r in refs], 1), torch.cat([r[1] for r in refs], 1)
    # Blind positions: l - 1 per sequence, all 5 of the short one.
    check(o, lse, ref_o, ref_lse, dtype, T_blind=2 * (spec.l - 1) + 5)


def test_compression_fwd_no_blocks():
    """T < l: no compressed block exists; o = 0 and lse = -inf everywhere."""
    spec = make_spec(4, H=2)
    q, k, v = rand_qkv(spec, 2, spec.l - 1, torch.float32, seed=1)
    k_cmp, _ = compress_mean(k, spec)
    v_cmp, _ = compress_mean(v, spec)
    assert k_cmp.shape[1] == 0
    out = poisoned(spec, 2, spec.l - 1, torch.float32)
    o, lse = compression_fwd(q, k_cmp, v_cmp, spec, out=out)
    assert (o == 0).all() and (lse == float("-inf")).all()


def test_compression_fwd_rejects_bad_shapes():
    spec = make_spec(4, H=2)
    q, k, v = rand_qkv(spec, 1, 30, torch.float32, seed=0)
    k_cmp, v_cmp = naive_compress(k, spec.l, spec.d), naive_compress(v, spec.l, spec.d)
    with pytest.raises(ValueError):  # one block short
        compression_fwd(q, k_cmp[:, 1:], v_cmp[:, 1:], spec)
    cu = torch.tensor([0, 10, 30], dtype=torch.int32, device=DEVICE)
    kc, cu_cmp = compress_mean(k, spec, cu_seqlens=cu)
    vc, _ = compress_mean(v, spec, cu_seqlens=cu)
    with pytest.raises(ValueError):  # cu_seqlens_cmp that disagrees with cu_seqlens
        compression_fwd(q, kc, vc, spec, cu_seqlens=cu, cu_seqlens_cmp=cu_cmp + 1)


# ---------------------------------------------------- compression_fwd as batched causal attention

@pytest.mark.parametrize("l,d,T", [(8, 4, 77), (8, 4, 79), (16, 16, 77), (4, 1, 40), (32, 8, 70),
                                   (8, 4, 9), (8, 8, 8)])
@pytest.mark.parametrize("G", [1, 4, 16])
def test_compression_fwd_cudnn(G, l, d, T, monkeypatch):  # noqa: E741
    """CUDNN = 1: the d residues of the queries as a batch of causal attentions over the
    blocks (a strided view, blocks broadcast), the tokens after them (T = 77: 2, 79: none, 9:
    all of them, NCF = 0) against every block, those before l - 1 against none. On the CPU
    the attention is torch math; on a GPU, cuDNN. (32, 8): four strides a block."""
    from nsa_gen.ops import compression
    calls = []

    def counted(q, k, v, scale, causal):
        calls.append((tuple(q.shape), causal))
        return attend(q, k, v, scale, causal)
    attend = compression._attend
    monkeypatch.setattr(compression, "_attend", counted)
    monkeypatch.setattr(common, "_CUDNN_REFUSED", set())  # one refusal fails one case
    spec = make_spec(G, H=2 if G < 16 else 1, l=l, d=d)
    dtype = CUDNN_DTYPE
    B = 2
    q, k, v = rand_qkv(spec, B, T, dtype, seed=T + G)
    k_cmp, v_cmp = naive_compress(k, l, d).to(dtype), naive_compress(v, l, d).to(dtype)
    out = poisoned(spec, B, T, dtype)
    o, lse = compression_fwd(q, k_cmp, v_cmp, spec, config=cudnn_config("compression_fwd", spec, T), out=out)
    ncf, tail = (T - l + 1) // d, (T - l + 1) % d
    per_seq = ([((d, spec.HQ, ncf, spec.DK), True)] if ncf else []) + \
        ([((1, spec.HQ, tail, spec.DK), False)] if tail else [])
    assert calls == per_seq * B
    check(o, lse, *ref_cmp(q, k_cmp, v_cmp, l, d, spec.softmax_scale), dtype, T_blind=l - 1)


def test_compression_fwd_cudnn_falls_back(monkeypatch, caplog):
    """Packed sequences run the generated kernel (their lengths would be read back), with a
    warning: the same numbers as CUDNN = 0."""
    spec = make_spec(4, H=2)
    q, k, v = rand_qkv(spec, 1, 113, CUDNN_DTYPE, seed=5)

    def run(cfg, cu):
        cu_t = torch.tensor(cu, dtype=torch.int32, device=DEVICE)
        k_cmp, cu_cmp = compress_mean(k, spec, cu_seqlens=cu_t)
        v_cmp, _ = compress_mean(v, spec, cu_seqlens=cu_t)
        return compression_fwd(q, k_cmp, v_cmp, spec, cfg, cu_seqlens=cu_t)
    check_cudnn_falls_back("compression_fwd", "packed", spec, run, (), monkeypatch, caplog)


def test_compression_fwd_case_times_the_pieces(monkeypatch):
    """The tuner's and verify's case runs a CUDNN config as nsa() without autograd does (B =
    1: the output in pieces, uncopied) and checks the pieces' rows against the reference; a
    wrong piece fails."""
    from nsa_gen.harness import make_case
    from nsa_gen.ops.common import RowPieces
    monkeypatch.setattr(common, "_CUDNN_REFUSED", set())
    spec = make_spec(4, H=2)
    case = make_case("compression_fwd", spec, 77, dtype=CUDNN_DTYPE, device=DEVICE, seed=3)
    out = case.run(cudnn_config("compression_fwd", spec, 77))
    assert isinstance(out[0], RowPieces) and case.rel_error(out) < CUDNN_TOL
    bad = RowPieces(out[0].main, torch.zeros_like(out[0].tail), out[0].r0, out[0].r1, out[0].T)
    assert case.rel_error((bad, out[1])) > CUDNN_WRONG
    assert case.rel_error(case.run(cudnn_config("compression_fwd", spec, 77).replace(CUDNN=0))) < CUDNN_TOL


def test_compression_fwd_cudnn_refusal_is_per_shape(monkeypatch):
    """A cuDNN refusal is remembered for those inputs' shape only: the same T then runs the
    kernel without trying cuDNN again, another T still tries it."""
    from nsa_gen.ops import compression
    monkeypatch.setattr(common, "_CUDNN_REFUSED", set())
    attend, tried = compression._attend, []

    def refuse_at_77(q, *a, **kw):
        tried.append(T)
        if T == 77:
            raise RuntimeError("cuDNN: no engine for this graph")
        return attend(q, *a, **kw)
    monkeypatch.setattr(compression, "_attend", refuse_at_77)
    spec = make_spec(4, H=2)
    # T = 77 tries cuDNN and is refused; again, it goes straight to the kernel; T = 113 tries
    for T, tries in ((77, True), (77, False), (113, True)):
        q, k, v = rand_qkv(spec, 1, T, CUDNN_DTYPE, seed=T)
        k_cmp, v_cmp = (naive_compress(x, spec.l, spec.d).to(CUDNN_DTYPE) for x in (k, v))
        cfg = cudnn_config("compression_fwd", spec, T)
        tried.clear()
        got = compression_fwd(q, k_cmp, v_cmp, spec, cfg)
        assert bool(tried) == tries, T
        want = compression_fwd(q, k_cmp, v_cmp, spec, cfg.replace(CUDNN=0))
        if T == 77:  # the kernel's numbers, bit for bit
            assert all(torch.equal(a, b) for a, b in zip(got, want))
        else:
            assert rel_err(got[0], want[0]) < CUDNN_TOL


@pytest.mark.parametrize("pieces", [False, True])
def test_compression_fwd_cudnn_error_falls_back(pieces, monkeypatch, caplog):
    """An error from the attention call (cuDNN refusing a GPU or shape) runs the generated
    kernel instead, with a warning: one tensor, the kernel's numbers, pieces asked or not."""
    from nsa_gen.ops import common, compression

    def refuse(*a, **kw):
        raise RuntimeError("cuDNN: no engine for this graph")
    monkeypatch.setattr(compression, "_attend", refuse)
    monkeypatch.setattr(common, "_CUDNN_REFUSED", set())
    common._FALLBACKS_WARNED.discard(("compression_fwd", "cuDNN attention failed"))
    spec = make_spec(4, H=2)
    q, k, v = rand_qkv(spec, 1, 77, CUDNN_DTYPE, seed=9)
    k_cmp, v_cmp = (naive_compress(x, spec.l, spec.d).to(CUDNN_DTYPE) for x in (k, v))
    cfg = cudnn_config("compression_fwd", spec, 77)
    with caplog.at_level("WARNING", logger="nsa_gen"):
        got = compression_fwd(q, k_cmp, v_cmp, spec, cfg, pieces=pieces)
    assert any("cuDNN attention failed" in r.getMessage() for r in caplog.records)
    want = compression_fwd(q, k_cmp, v_cmp, spec, cfg.replace(CUDNN=0))
    assert isinstance(got[0], torch.Tensor)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
