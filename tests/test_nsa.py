"""The whole op, forward and backward, against autograd through naive.py; and the module."""
import pytest
import torch

from conftest import rel_err as rel
from conftest import cudnn_config, shrink
from nsa_gen import naive
from nsa_gen.api import NativeSparseAttention, nsa, reference_nsa

SMALL = dict(head_dim={"k": 32, "v": 16}, compression={"block": 16, "stride": 8},
             selection={"block": 16, "top_n": 3, "initial_blocks": 1, "local_blocks": 1}, window=24)
SPECS = {  # G in {1, 4, 16}, DK != DV
    1: shrink("mqa", heads={"q": 2, "kv": 2}, **SMALL),
    4: shrink("small-group", heads={"q": 8, "kv": 2}, **SMALL),
    16: shrink("deepseek-nsa", heads={"q": 16, "kv": 1}, **SMALL),
}


def inputs(spec, B, T, seed, dtype=torch.float32, per_branch=False):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g).to(dtype).requires_grad_(True)
    q = r(B, T, spec.HQ, spec.DK)
    k, v = r(B, T, spec.H, spec.DK), r(B, T, spec.H, spec.DV)
    gates = [torch.rand(B, T, spec.HQ, generator=g).to(dtype).requires_grad_(True) for _ in range(3)]
    kv = {}
    if per_branch:
        kv = {f"kv_{b}": (r(B, T, spec.H, spec.DK), r(B, T, spec.H, spec.DV)) for b in ("slc", "swa")}
    return q, k, v, gates, kv


def grads_of(fn, tensors, do):
    for t in tensors:
        t.grad = None
    out = fn()
    out.backward(do)
    return out.detach(), [t.grad.clone() for t in tensors]




@pytest.mark.parametrize("G", [1, 4, 16])
def test_nsa_fwd_bwd(G, poison):
    spec = SPECS[G]
    B, T = 2, 61
    q, k, v, gates, _ = inputs(spec, B, T, seed=G)
    do = torch.randn(B, T, spec.HQ, spec.DV)
    leaves = [q, k, v, *gates]
    o, gr = grads_of(lambda: nsa(q, k, v, *gates, spec=spec), leaves, do)
    o_ref, gr_ref = grads_of(lambda: naive.naive_nsa(spec, q, k, v, *gates), leaves, do)
    assert rel(o, o_ref) < 1e-4
    for name, a, b in zip(["dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_swa"], gr, gr_ref):
        assert rel(a, b) < 1e-4, name


def test_nsa_per_branch_kv_and_fp16(poison):
    spec = SPECS[4]
    B, T = 1, 50
    q, k, v, gates, kv = inputs(spec, B, T, seed=7, per_branch=True)
    do = torch.randn(B, T, spec.HQ, spec.DV)
    leaves = [q, k, v, *kv["kv_slc"], *kv["kv_swa"]]
    o, gr = grads_of(lambda: nsa(q, k, v, *gates, spec=spec, **kv), leaves, do)
    o_ref, gr_ref = grads_of(lambda: naive.naive_nsa(spec, q, k, v, *gates, **kv), leaves, do)
    assert rel(o, o_ref) < 1e-4
    assert all(rel(a, b) < 1e-4 for a, b in zip(gr, gr_ref))
    # fp16 inputs, same op
    h = [t.detach().half() for t in (q, k, v, *gates)]
    o16 = nsa(*h, spec=spec)
    assert rel(o16.float(), naive.naive_nsa(spec, *[t.float() for t in h])) < 2e-2


def test_nsa_varlen(poison):
    spec = SPECS[4]
    cu = torch.tensor([0, 23, 30, 71], dtype=torch.int32)  # one sequence shorter than l
    q, k, v, gates, _ = inputs(spec, 1, 71, seed=3)
    do = torch.randn(1, 71, spec.HQ, spec.DV)
    leaves = [q, k, v, *gates]
    o, gr = grads_of(lambda: nsa(q, k, v, *gates, spec=spec, cu_seqlens=cu), leaves, do)
    o_ref, gr_ref = grads_of(lambda: naive.naive_nsa(spec, q, k, v, *gates, cu_seqlens=cu), leaves, do)
    assert rel(o, o_ref) < 1e-4
    assert all(rel(a, b) < 1e-4 for a, b in zip(gr, gr_ref))


def test_nsa_mlp_phi_gradients(poison):
    spec = SPECS[4].replace(compression={"block": 16, "stride": 8, "phi": "mlp"})
    torch.manual_seed(0)
    mlp_k, mlp_v = naive.CompressionMLP(spec.l, spec.DK), naive.CompressionMLP(spec.l, spec.DV)
    q, k, v, gates, _ = inputs(spec, 1, 40, seed=5)
    do = torch.randn(1, 40, spec.HQ, spec.DV)
    params = list(mlp_k.parameters()) + list(mlp_v.parameters())
    leaves = [q, k, v, *params]
    o, gr = grads_of(lambda: nsa(q, k, v, *gates, spec=spec, mlp_k=mlp_k, mlp_v=mlp_v), leaves, do)
    o_ref, gr_ref = grads_of(lambda: naive.naive_nsa(spec, q, k, v, *gates, mlp_k=mlp_k, mlp_v=mlp_v),
                             leaves, do)
    assert rel(o, o_ref) < 1e-4
    # The key MLP's output bias shifts every key of a query alike, which softmax ignores: its
    # true gradient is 0, so compare absolutely there.
    assert all((a - b).norm() <= 1e-4 * b.norm() + 1e-5 for a, b in zip(gr, gr_ref))
    assert sum(p.abs().sum() > 0 for p in gr_ref[3:]) >= len(params) - 1


def test_deterministic_gradients(poison):
    spec = SPECS[16]
    q, k, v, gates, _ = inputs(spec, 1, 64, seed=9)
    do = torch.randn(1, 64, spec.HQ, spec.DV)
    _, g1 = grads_of(lambda: nsa(q, k, v, *gates, spec=spec), [q, k, v], do)
    _, g2 = grads_of(lambda: nsa(q, k, v, *gates, spec=spec), [q, k, v], do)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_module_matches_reference(poison):
    spec = SPECS[4]
    torch.manual_seed(0)
    m = NativeSparseAttention(spec, 32, per_branch_kv=True, gate_hidden=16)
    x = torch.randn(2, 37, 32, requires_grad=True)
    y = m(x)
    y.sum().backward()
    gx = x.grad.clone()
    gp = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    x.grad = None
    y_ref = m(x, attention=reference_nsa)
    y_ref.sum().backward()
    assert rel(y, y_ref) < 1e-4 and rel(gx, x.grad) < 1e-4
    assert all(rel(a, p.grad) < 1e-4 for a, p in zip(gp, m.parameters()))


def test_module_rope_hook_runs_once_on_every_branch(poison):
    spec = SPECS[4]
    torch.manual_seed(0)
    m = NativeSparseAttention(spec, 32, per_branch_kv=True)
    calls, seen = [], {}

    def rope(q, k, cu_seqlens):  # a position-dependent rotation of pairs of dims
        calls.append(k.shape)
        ang = torch.arange(q.shape[1], dtype=q.dtype)[None, :, None, None] * 0.1

        def rot(x):
            a, b = x[..., 0::2], x[..., 1::2]
            return torch.stack([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()],
                               -1).flatten(-2)
        return rot(q), rot(k)

    def capture(q, k, v, *gates, **kw):
        seen.update(q=q, **{n: kw[n][0] for n in ("kv_cmp", "kv_slc", "kv_swa")})
        return reference_nsa(q, k, v, *gates, **kw)

    x = torch.randn(1, 24, 32)
    m(x, rope=rope, attention=capture)
    assert calls == [(1, 24, 3 * spec.H, spec.DK)]  # once, with the keys of all three branches
    q = m.q_proj(x).view(1, 24, spec.HQ, spec.DK)
    ks = m.k_proj(x).view(1, 24, 3, spec.H, spec.DK).unbind(2)
    for i, name in enumerate(("kv_cmp", "kv_slc", "kv_swa")):
        rq, rk = rope(q, ks[i], None)
        assert torch.allclose(seen[name], rk, atol=1e-6)
    assert torch.allclose(seen["q"], rq, atol=1e-6)


def test_bad_calls():
    spec = SPECS[4]
    q, k, v, gates, _ = inputs(spec, 1, 20, seed=1)
    with pytest.raises(ValueError, match="no gate"):
        nsa(q, k, v, spec=spec)
    with pytest.raises(ValueError, match="g_slc has shape"):
        nsa(q, k, v, gates[0], gates[1][:, :5], spec=spec)
    with pytest.raises(ValueError, match="no 'swa' branch"):
        nsa(q, k, v, *gates, spec=spec.replace(window=0, branches=["cmp", "slc"]))
    with pytest.raises(TypeError, match="dtype"):
        nsa(q, k.half(), v, *gates, spec=spec)
    from nsa_gen.ops.selection import selection_fwd, topn  # noqa: F401
    from nsa_gen.config import Config
    idx = torch.zeros(1, 20, spec.H, spec.S, dtype=torch.int32)
    batched = Config.make(BLOCK_N=16, BLOCK_Q=4, TMA=0, SHARE=1, FORCED=0)
    x = [t.detach() for t in (q, k, v, *gates)]
    for cfg in (None, batched):  # group-centric (the default here) and query-batched
        with pytest.raises(ValueError, match="branch 'cmp' has a gate but no output"):
            selection_fwd(*x[:3], idx, spec, cfg, gates={"slc": x[4], "cmp": x[3]}, outs={})
    with pytest.raises(ValueError, match="has an output but no gate \\(gates\\['slc'\\]"):
        selection_fwd(*x[:3], idx, spec, gates={"cmp": x[3]}, outs={"cmp": x[0][..., :spec.DV]})
    with pytest.raises(ValueError, match="this kernel computes o_slc"):
        selection_fwd(*x[:3], idx, spec, gates={"slc": x[4]}, outs={"slc": x[0][..., :spec.DV]})
    with pytest.raises(ValueError, match="gates\\['slc'\\] has shape"):
        selection_fwd(*x[:3], idx, spec, gates={"slc": x[4][:, :5]}, outs={})


def test_varlen_op_case_matches_reference(poison):
    """The verify target nsa_varlen: the composed op over packed sequences of uneven
    lengths (one shorter than a compression block) against naive_nsa with cu_seqlens."""
    from nsa_gen.harness import OP_VARLEN, make_case, varlen_offsets
    spec = shrink("small-group", heads={"q": 4, "kv": 2}, head_dim={"k": 32, "v": 16},
                  compression={"block": 16, "stride": 8},
                  selection={"block": 16, "top_n": 3}, window=16)
    cu = varlen_offsets(60)
    assert len(cu) == 4 and min(b - a for a, b in zip(cu, cu[1:])) < spec.l
    case = make_case(OP_VARLEN, spec, 60, dtype=torch.float32, seed=2)
    assert case.rel_error(case.run()) < 1e-4
    with pytest.raises(ValueError, match="B = 1"):
        make_case(OP_VARLEN, spec, 60, B=2, dtype=torch.float32)


class _Pinned:
    """A dispatcher: the kernels' heuristic defaults, selection_fwd's (and its gated key's)
    replaced by `slc` (if given), and with cudnn (cudnn_bwd), compression_fwd's
    (compression_bwd's) by its CUDNN = 1 variant. `asked` records the stems asked for."""

    def __init__(self, slc=None, cudnn=False, cudnn_bwd=False):
        self.slc = slc
        self.cudnn = {"compression_fwd": cudnn, "compression_bwd": cudnn_bwd}
        self.asked = []

    def get(self, stem, spec, T, B=1, device=None):
        from nsa_gen.kernels import kernel_def
        self.asked.append(stem)
        kd = kernel_def(stem)
        if self.cudnn.get(stem):
            return cudnn_config(stem, spec, T)
        if stem in ("selection_fwd", "selection_fwd_gated") and self.slc:
            return self.slc
        return kd.default(spec, T)


def test_nsa_asks_for_the_gated_key_only_without_autograd(poison):
    """nsa() without autograd launches the selected kernel storing the gated sum with
    selection_fwd_gated's config (its own tuning key); with autograd, selection_fwd's."""
    spec = SPECS[16]
    q, k, v, gates, _ = inputs(spec, 1, 40, seed=5)
    d = _Pinned()
    nsa(q.detach(), k.detach(), v.detach(), *(g.detach() for g in gates), spec=spec, dispatcher=d)
    assert "selection_fwd_gated" in d.asked and "selection_fwd" not in d.asked
    d = _Pinned()
    nsa(q, k, v, *gates, spec=spec, dispatcher=d)
    assert "selection_fwd" in d.asked and "selection_fwd_gated" not in d.asked


@pytest.mark.parametrize("G,slc,branches", [
    (16, dict(SHARE=1), (0, 1, 2)), (16, dict(SHARE=2), (0, 1, 2)),
    (16, dict(FORCED=64), (1,)), (4, dict(FORCED=64, TMA=1), (0, 1)), (4, dict(SHARE=4), (1, 2)),
    (4, dict(BLOCK_Q=4), (0, 1, 2)), (4, dict(BLOCK_Q=8, TMA=1, FORCED=64), (1, 2)),
    (16, dict(BLOCK_Q=1, FORCED=64), (0, 1))])
def test_nsa_inference_gates_in_the_selected_kernel(G, slc, branches, poison, monkeypatch):
    """Without autograd, the selected kernel stores the gated sum itself: the reference's
    numbers, with the gate pass never run (group-centric SHARE 1 and 2-4, FORCED; the
    query-batched combine kernel, FORCED too; any subset of branches with slc)."""
    from nsa_gen import api
    from nsa_gen.config import Config
    spec = SPECS[G]
    B, T = 2, 61
    q, k, v, gates, _ = inputs(spec, B, T, seed=20 + G)
    q, k, v = (x.detach() for x in (q, k, v))
    gates = [g.detach() if i in branches else None for i, g in enumerate(gates)]
    cfg = Config.make(**{**dict(BLOCK_N=16, BLOCK_Q=0, TMA=0, SHARE=1, FORCED=0), **slc},
                      num_warps=4, num_stages=1)
    ref = naive.naive_nsa(spec, q, k, v, *gates)
    runs = []
    real_gate = api.GateFunction.apply
    monkeypatch.setattr(api.GateFunction, "apply", lambda *a: runs.append(1) or real_gate(*a))
    o = nsa(q, k, v, *gates, spec=spec, dispatcher=_Pinned(cfg))
    assert rel(o, ref) < 1e-4
    assert not runs
    # With return_aux (branch outputs wanted), the gate pass runs: the same numbers.
    o_aux, aux = nsa(q, k, v, *gates, spec=spec, dispatcher=_Pinned(cfg), return_aux=True)
    assert "o_slc" in aux and rel(o, o_aux) < 1e-5


@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("slc", [dict(SHARE=1), dict(BLOCK_Q=4, FORCED=64)])
def test_nsa_inference_cmp_through_cudnn_in_pieces(B, slc, poison, monkeypatch):
    """compression_fwd's CUDNN variant in nsa() without autograd: at B = 1 its output stays in
    the pieces the attention wrote (RowPieces: rows before l - 1 zero, the residue batch, the
    tail) and the gated selected kernel reads them so (group-centric and query-batched
    combine); at B = 2 it is copied into one tensor. The reference's numbers either way."""
    from nsa_gen.config import Config
    from nsa_gen.ops import compression
    from nsa_gen.ops.common import RowPieces
    spec = SPECS[4]
    T = 61  # (T - l + 1) % d = 6: a tail of 6 tokens after the residue batch
    q, k, v, gates, _ = inputs(spec, B, T, seed=40 + B)
    q, k, v, *gates = (x.detach() for x in (q, k, v, *gates))
    cfg = Config.make(**{**dict(BLOCK_N=16, BLOCK_Q=0, TMA=0, SHARE=1, FORCED=0), **slc},
                      num_warps=4, num_stages=1)
    made = []
    real = compression._residue_attention
    monkeypatch.setattr(compression, "_residue_attention",
                        lambda *a: made.append(r := real(*a)) or r)
    o = nsa(q, k, v, *gates, spec=spec, dispatcher=_Pinned(cfg, cudnn=True))
    assert rel(o, naive.naive_nsa(spec, q, k, v, *gates)) < 1e-4
    assert len(made) == 1 and isinstance(made[0], RowPieces) == (B == 1)
    if B == 1:
        p = made[0]
        assert (p.r0, p.r1, p.tail.shape[0]) == (spec.l - 1, T - 6, 6)


@pytest.mark.parametrize("slc", [dict(SHARE=1), dict(SHARE=2), dict(BLOCK_Q=4),
                                 dict(BLOCK_Q=8, FORCED=64)])
def test_selection_gated_reads_cmp_pieces(slc, poison):
    """The gated selected kernels read o_cmp from RowPieces exactly as from the one tensor
    they stand for: zero rows before r0, main's rows, then the tail's (bit for bit)."""
    from nsa_gen.config import Config
    from nsa_gen.ops.common import RowPieces
    from nsa_gen.ops.selection import selection_fwd, topn
    from nsa_gen.ops.compression import compress_mean, compression_fwd
    spec = SPECS[4]
    T = 53
    q, k, v, gates, _ = inputs(spec, 1, T, seed=7)
    q, k, v, *gates = (x.detach() for x in (q, k, v, *gates))
    k_cmp, _ = compress_mean(k, spec)
    lse = compression_fwd(q, k_cmp, compress_mean(v, spec)[0], spec)[1]
    idx = topn(q, k_cmp, lse, spec)
    g = torch.Generator().manual_seed(3)
    r0, r1 = 5, 40
    pieces = RowPieces(torch.randn(r1 - r0, spec.HQ, spec.DV, generator=g),
                       torch.randn(T - r1, spec.HQ, spec.DV, generator=g), r0, r1, T)
    cfg = Config.make(**{**dict(BLOCK_N=16, BLOCK_Q=0, TMA=0, SHARE=1, FORCED=0), **slc},
                      num_warps=4, num_stages=1)
    kw = dict(canonical=True, forced_listed=True, gates={"cmp": gates[0], "slc": gates[1]})
    want = selection_fwd(q, k, v, idx, spec, cfg, outs={"cmp": pieces.full()}, **kw)[0]
    got = selection_fwd(q, k, v, idx, spec, cfg, outs={"cmp": pieces}, **kw)[0]
    assert torch.equal(got, want)
    # and the pieces do enter the sum: zeroing the tail changes the tail's rows only
    zeroed = RowPieces(pieces.main, torch.zeros_like(pieces.tail), r0, r1, T)
    other = selection_fwd(q, k, v, idx, spec, cfg, outs={"cmp": zeroed}, **kw)[0]
    assert torch.equal(other[:, :r1], want[:, :r1]) and not torch.equal(other[:, r1:], want[:, r1:])


@pytest.mark.parametrize("fwd,bwd", [(True, False), (False, True), (True, True)])
def test_nsa_fwd_bwd_with_cmp_through_cudnn(fwd, bwd, poison, monkeypatch):
    """With autograd, compression_fwd's CUDNN variant gives the compressed branch's backward
    the o and lse it needs in one tensor each, and compression_bwd's CUDNN variant takes them
    from either forward: the reference's output and gradients."""
    from nsa_gen.ops import compression
    calls = []
    for name in ("_attend", "_attend_bwd"):
        real = getattr(compression, name)
        monkeypatch.setattr(compression, name,
                            lambda *a, _n=name, _f=real, **kw: calls.append(_n) or _f(*a, **kw))
    spec = SPECS[4]
    B, T = 1, 61
    q, k, v, gates, _ = inputs(spec, B, T, seed=11)
    do = torch.randn(B, T, spec.HQ, spec.DV)
    leaves = [q, k, v, *gates]
    o, gr = grads_of(lambda: nsa(q, k, v, *gates, spec=spec,
                                 dispatcher=_Pinned(cudnn=fwd, cudnn_bwd=bwd)), leaves, do)
    # the residue batch and the tail, each way
    assert calls == ["_attend"] * 2 * fwd + ["_attend_bwd"] * 2 * bwd
    o_ref, gr_ref = grads_of(lambda: naive.naive_nsa(spec, q, k, v, *gates), leaves, do)
    assert rel(o, o_ref) < 1e-4
    for name, a, b in zip(["dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_swa"], gr, gr_ref):
        assert rel(a, b) < 1e-4, name
