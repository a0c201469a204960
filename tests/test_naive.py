"""Tests of the fp32 reference (nsa_gen/naive.py) against hand-computed values and
slow per-token loops written independently of it, following shared/NSA.md."""
from __future__ import annotations

import math
import types

import pytest
import torch

from nsa_gen.naive import (
    CompressionMLP,
    naive_compress,
    naive_compressed_attention,
    naive_group_scores,
    naive_importance,
    naive_nsa,
    naive_selection,
    naive_topn,
    naive_window,
    num_cmp_blocks,
    overlap_weights,
)

ATOL = 1e-5


def make_spec(HQ=4, H=2, DK=8, DV=6, l=4, d=2, BS=4, S=3, w=5, phi="mean",
              initial_blocks=1, local_blocks=2, scale=None, branches=("cmp", "slc", "swa")):
    """A stand-in for NSASpec with just the attributes naive_nsa reads."""
    return types.SimpleNamespace(
        HQ=HQ, H=H, G=HQ // H, DK=DK, DV=DV, l=l, d=d, BS=BS, S=S, w=w, phi=phi,
        initial_blocks=initial_blocks, local_blocks=local_blocks,
        softmax_scale=DK ** -0.5 if scale is None else scale,
        has=lambda b: b in branches)


def rand_qkv(spec, T, B=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, spec.HQ, spec.DK, generator=g)
    k = torch.randn(B, T, spec.H, spec.DK, generator=g)
    v = torch.randn(B, T, spec.H, spec.DV, generator=g)
    return q, k, v


def rand_gates(spec, T, B=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(B, T, spec.HQ, generator=g) for _ in range(3)]


# ----------------------------------------------------------------------------- slow loops


def loop_attend(qv, keys, vals, scale):
    """softmax(q . k * scale) @ v for one query over a Python list of keys; 0 if empty."""
    if not keys:
        return torch.zeros_like(vals[0]) if vals else None
    logits = [float(qv @ kk) * scale for kk in keys]
    m = max(logits)
    e = [math.exp(x - m) for x in logits]
    z = sum(e)
    return sum((ei / z) * vv for ei, vv in zip(e, vals))


def loop_nsa(spec, q, k, v, gates, kvs=None):
    """NSA for B = 1, one token and head at a time, straight from NSA.md's wording."""
    kvs = kvs or {}
    T = q.shape[1]
    G, scale, l, d, BS = spec.G, spec.softmax_scale, spec.l, spec.d, spec.BS
    kc, vc = kvs.get("cmp", (k, v))
    ks, vs = kvs.get("slc", (k, v))
    kw, vw = kvs.get("swa", (k, v))
    NC = (T - l) // d + 1 if T >= l else 0
    NS = -(-T // BS)
    k_cmp = [kc[0, i * d:i * d + l].mean(0) for i in range(NC)]  # each [H, DK]
    v_cmp = [vc[0, i * d:i * d + l].mean(0) for i in range(NC)]

    def c(i, j):  # shared d-chunks, counted chunk by chunk
        return sum(1 for m in range(T // d + l // d + 1)
                   if i * d <= m * d < i * d + l and j * BS <= m * d < (j + 1) * BS)

    o = torch.zeros(T, spec.HQ, spec.DV)
    for t in range(T):
        vis = [i for i in range(NC) if i * d + l - 1 <= t]
        scores = torch.zeros(spec.H, NS)
        for hq in range(spec.HQ):
            h = hq // G
            logits = torch.tensor([float(q[0, t, hq] @ k_cmp[i][h]) * scale for i in vis])
            p = torch.softmax(logits, 0) if vis else logits
            for j in range(NS):
                scores[h, j] += sum(float(p[n]) * c(i, j) for n, i in enumerate(vis))
        for hq in range(spec.HQ):
            h = hq // G
            qv = q[0, t, hq]
            if gates[0] is not None:
                oc = loop_attend(qv, [k_cmp[i][h] for i in vis], [v_cmp[i][h] for i in vis], scale)
                if oc is not None:
                    o[t, hq] += gates[0][0, t, hq] * oc
            if gates[1] is not None:
                cur = t // BS
                cands = list(range(cur + 1))
                forced = [j for j in cands if j < spec.initial_blocks or j > cur - spec.local_blocks]
                others = sorted((j for j in cands if j not in forced), key=lambda j: (-scores[h, j], j))
                chosen = forced + others[:spec.S - len(forced)]
                toks = [s for s in range(t + 1) if s // BS in chosen]
                o[t, hq] += gates[1][0, t, hq] * loop_attend(
                    qv, [ks[0, s, h] for s in toks], [vs[0, s, h] for s in toks], scale)
            if gates[2] is not None:
                toks = range(max(0, t - spec.w + 1), t + 1)
                o[t, hq] += gates[2][0, t, hq] * loop_attend(
                    qv, [kw[0, s, h] for s in toks], [vw[0, s, h] for s in toks], scale)
    return o[None]


# ----------------------------------------------------------------------------- block counts


def test_num_cmp_blocks():
    assert num_cmp_blocks(0, 32, 16) == 0
    assert num_cmp_blocks(31, 32, 16) == 0
    assert num_cmp_blocks(32, 32, 16) == 1
    assert num_cmp_blocks(47, 32, 16) == 1
    assert num_cmp_blocks(48, 32, 16) == 2
    assert num_cmp_blocks(100, 32, 16) == 5  # blocks start at 0,16,32,48,64 (64+32 = 96 <= 100)
    assert num_cmp_blocks(64, 64, 64) == 1
    assert num_cmp_blocks(127, 64, 64) == 1


def test_overlap_weights_paper_config():
    NC, NS = num_cmp_blocks(256, 32, 16), 4
    W = overlap_weights(32, 16, 64, NC, NS)
    assert W.shape == (15, 4) and W.dtype == torch.float32
    # Selection block 0 = chunks 0..3; compressed block i = chunks i, i+1.
    assert W[:, 0].tolist() == [2, 2, 2, 1] + [0] * 11
    for j in (1, 2, 3):
        col = torch.zeros(NC)
        for off, wgt in zip(range(-1, 4), (1, 2, 2, 2, 1)):
            if 0 <= 4 * j + off < NC:
                col[4 * j + off] = wgt
        assert torch.equal(W[:, j], col), j
    # Every compressed block lies inside [0, T): all l/d = 2 of its chunks are counted.
    assert torch.equal(W.sum(1), torch.full((NC,), 2.0))


def test_overlap_weights_identity():
    assert torch.equal(overlap_weights(4, 4, 4, 5, 5), torch.eye(5))
    assert torch.equal(overlap_weights(64, 64, 64, 3, 4), torch.eye(3, 4))


# ----------------------------------------------------------------------------- compression


def test_compress_mean_by_hand():
    x = torch.arange(10, dtype=torch.float32).reshape(1, 10, 1, 1).repeat(1, 1, 1, 2)
    kc = naive_compress(x, l=4, d=2)
    # Blocks [0,4), [2,6), [4,8), [6,10): means 1.5, 3.5, 5.5, 7.5.
    assert kc.shape == (1, 4, 1, 2)
    assert kc[0, :, 0, 0].tolist() == [1.5, 3.5, 5.5, 7.5]
    empty = naive_compress(torch.randn(2, 3, 2, 5), l=4, d=2)
    assert empty.shape == (2, 0, 2, 5)


def test_compress_mlp_matches_manual_block():
    torch.manual_seed(0)
    mlp = CompressionMLP(4, 3, hidden=5)
    x = torch.randn(2, 9, 2, 3)
    out = naive_compress(x, 4, 2, phi="mlp", mlp=mlp)
    assert out.shape == (2, 3, 2, 3)
    block = x[1, 2:6, 1]  # compressed block 1, batch 1, head 1: [l, D]
    want = mlp.mlp[2](mlp.mlp[1](mlp.mlp[0]((block + mlp.pos_emb).reshape(-1))))
    torch.testing.assert_close(out[1, 1, 1], want)
    with pytest.raises(ValueError):
        naive_compress(x, 4, 2, phi="mlp")


# ----------------------------------------------------------------------------- compressed attention


def test_compressed_attention_hand_computed():
    # l = d = 2: block 0 visible from t = 1, block 1 from t = 3. DK = DV = 1, scale 1.
    q = torch.ones(1, 4, 1, 1)
    k_cmp = torch.tensor([0.0, math.log(3.0)]).reshape(1, 2, 1, 1)
    v_cmp = torch.tensor([4.0, 8.0]).reshape(1, 2, 1, 1)
    o, p = naive_compressed_attention(q, k_cmp, v_cmp, l=2, d=2, scale=1.0)
    assert p.shape == (1, 4, 1, 2) and o.shape == (1, 4, 1, 1)
    torch.testing.assert_close(p[0, :, 0], torch.tensor([[0, 0], [1, 0], [1, 0], [0.25, 0.75]]))
    torch.testing.assert_close(o[0, :, 0, 0], torch.tensor([0.0, 4.0, 4.0, 1.0 + 6.0]))


def test_compressed_attention_causality_and_no_nan():
    torch.manual_seed(0)
    l, d, T = 4, 2, 11
    q = torch.randn(1, T, 4, 8)
    k = torch.randn(1, T, 2, 8)
    v = torch.randn(1, T, 2, 6)
    kc, vc = naive_compress(k, l, d), naive_compress(v, l, d)
    NC = kc.shape[1]
    assert NC == 4
    o, p = naive_compressed_attention(q, kc, vc, l, d)
    assert torch.isfinite(o).all() and torch.isfinite(p).all()
    assert (o[:, :l - 1] == 0).all() and (p[:, :l - 1] == 0).all()  # t < l - 1 sees nothing
    for i in range(NC):
        first = i * d + l - 1  # block i appears exactly here
        assert (p[0, :first, :, i] == 0).all()
        assert (p[0, first:, :, i] > 0).all()
    torch.testing.assert_close(p[0, l - 1:].sum(-1), torch.ones(T - l + 1, 4))


def test_compressed_attention_gqa_vs_loop():
    torch.manual_seed(1)
    q = torch.randn(1, 9, 4, 8)
    kc = torch.randn(1, 3, 2, 8)
    vc = torch.randn(1, 3, 2, 5)
    o, _ = naive_compressed_attention(q, kc, vc, l=4, d=2)
    for t in range(9):
        vis = [i for i in range(3) if 2 * i + 3 <= t]
        for hq in range(4):
            h = hq // 2
            want = loop_attend(q[0, t, hq], [kc[0, i, h] for i in vis], [vc[0, i, h] for i in vis], 8 ** -0.5)
            torch.testing.assert_close(o[0, t, hq], want if want is not None else torch.zeros(5))


def test_compressed_attention_no_nan_gradient():
    torch.manual_seed(2)
    q = torch.randn(1, 6, 2, 4, requires_grad=True)
    kc = torch.randn(1, 2, 1, 4, requires_grad=True)
    vc = torch.randn(1, 2, 1, 4, requires_grad=True)
    o, _ = naive_compressed_attention(q, kc, vc, l=4, d=2)
    o.sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[0, :3] == 0).all()
    assert torch.isfinite(kc.grad).all() and torch.isfinite(vc.grad).all()


# ----------------------------------------------------------------------------- importance, scores


def test_importance_by_hand():
    # l=4, d=2, BS=4, T=8: blocks [0,4) [2,6) [4,8); c = [[2,0],[1,1],[0,2]].
    p_cmp = torch.tensor([0.5, 0.3, 0.2]).reshape(1, 1, 1, 3).repeat(1, 8, 1, 1)
    p_slc = naive_importance(p_cmp, 4, 2, 4, 8)
    assert p_slc.shape == (1, 8, 1, 2)
    torch.testing.assert_close(p_slc[0, 5, 0], torch.tensor([1.3, 0.7]))
    # T=10 adds a partial third selection block that no compressed block reaches yet.
    p_cmp = torch.tensor([0.1, 0.2, 0.3, 0.4]).reshape(1, 1, 1, 4)
    p_slc = naive_importance(p_cmp.expand(1, 10, 1, 4), 4, 2, 4, 10)
    # c for NC=4 (4th block [6,10)): [[2,0,0],[1,1,0],[0,2,0],[0,1,1]]
    torch.testing.assert_close(p_slc[0, 0, 0], torch.tensor([0.2 + 0.2, 0.2 + 0.6 + 0.4, 0.4]))


def test_group_scores_by_hand():
    p = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]).reshape(1, 1, 4, 2)
    s = naive_group_scores(p, H=2)
    torch.testing.assert_close(s[0, 0], torch.tensor([[4.0, 6.0], [12.0, 14.0]]))
    torch.testing.assert_close(naive_group_scores(p, H=1)[0, 0], torch.tensor([[16.0, 20.0]]))


# ----------------------------------------------------------------------------- top-n


def topn_one(score_row, t, BS=4, S=4, **kw):
    """naive_topn for a single query t with the given score row [NS]."""
    NS = len(score_row)
    scores = torch.zeros(1, t + 1, 1, NS)
    scores[0, t, 0] = torch.tensor(score_row, dtype=torch.float32)
    return naive_topn(scores, BS, S, **kw)[0, t, 0].tolist()


def test_topn_forced_blocks_beat_high_scores():
    # t=23, BS=4: block holding t is 5; forced {0, 4, 5}; S=3 leaves no free slot.
    assert topn_one([0.0, 9.0, 9.0, 9.0, 0.0, 0.0], t=23, S=3) == [0, 4, 5]
    # S=4: one free slot, the best of {1, 2, 3}.
    assert topn_one([0.0, 0.1, 0.9, 0.2, 0.0, 0.0], t=23, S=4) == [0, 2, 4, 5]


def test_topn_tie_goes_to_lower_index():
    assert topn_one([0.0, 0.5, 0.9, 0.9, 0.0, 0.0], t=23, S=4) == [0, 2, 4, 5]
    assert topn_one([0.0, 0.7, 0.7, 0.7, 0.0, 0.0], t=23, S=5) == [0, 1, 2, 4, 5]


def test_topn_non_candidates_never_chosen_and_padding():
    row = [0.0, 0.0, 0.0, 5.0, 5.0, 5.0]  # high scores on future blocks
    assert topn_one(row, t=0) == [0, -1, -1, -1]
    assert topn_one(row, t=5) == [0, 1, -1, -1]  # candidates {0, 1}
    assert topn_one(row, t=9) == [0, 1, 2, -1]  # candidates {0, 1, 2}
    assert topn_one(row, t=13) == [0, 1, 2, 3]  # 1 is the only non-forced candidate


def test_topn_other_forced_counts():
    assert topn_one([3.0, 1.0, 2.0, 0.0, 0.0, 0.0], t=23, S=2, initial_blocks=0, local_blocks=1) == [0, 5]
    assert topn_one([0.0, 1.0, 2.0, 3.0, 0.0, 0.0], t=23, S=3, initial_blocks=2, local_blocks=1) == [0, 1, 5]
    with pytest.raises(ValueError):
        topn_one([0.0] * 6, t=23, S=2)  # 1 initial + 2 local forced blocks cannot fit in 2


def test_topn_order_and_last_valid_holds_t():
    torch.manual_seed(0)
    BS, S, T, H = 4, 3, 29, 2
    idx = naive_topn(torch.rand(2, T, H, 8), BS, S)
    assert idx.dtype == torch.int32 and idx.shape == (2, T, H, S)
    for t in range(T):
        for row in idx[:, t].reshape(-1, S).tolist():
            valid = [j for j in row if j >= 0]
            assert row == valid + [-1] * (S - len(valid))
            assert valid == sorted(set(valid))
            assert valid[-1] == t // BS and len(valid) == min(S, t // BS + 1)


# ----------------------------------------------------------------------------- selection, window


def test_selection_given_indices_vs_loop():
    torch.manual_seed(0)
    B, T, HQ, H, DK, DV, BS = 1, 10, 4, 2, 8, 6, 4
    q, k, v = torch.randn(B, T, HQ, DK), torch.randn(B, T, H, DK), torch.randn(B, T, H, DV)
    idx = torch.full((B, T, H, 3), -1, dtype=torch.int32)
    idx[0, 9, 0] = torch.tensor([0, 2, -1])  # tokens 0..3 and 8, 9
    idx[0, 9, 1] = torch.tensor([1, 2, 2])  # duplicate block counts once: tokens 4..7, 8, 9
    idx[0, 6, 1] = torch.tensor([0, 1, -1])  # block 1 causally cut at t=6: tokens 0..6
    o = naive_selection(q, k, v, idx, BS)
    scale = DK ** -0.5
    for t, h, toks in ((9, 0, [0, 1, 2, 3, 8, 9]), (9, 1, [4, 5, 6, 7, 8, 9]), (6, 1, list(range(7)))):
        for hq in (2 * h, 2 * h + 1):
            want = loop_attend(q[0, t, hq], [k[0, s, h] for s in toks], [v[0, s, h] for s in toks], scale)
            torch.testing.assert_close(o[0, t, hq], want)
    assert (o[0, 0] == 0).all()  # all -1: nothing to attend, zero not NaN
    assert torch.isfinite(o).all()


def test_window_w1_returns_v():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 7, 4, 8), torch.randn(2, 7, 2, 8), torch.randn(2, 7, 2, 6)
    o = naive_window(q, k, v, w=1)
    torch.testing.assert_close(o, v.repeat_interleave(2, dim=2))


def test_window_vs_loop():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 9, 2, 8), torch.randn(1, 9, 1, 8), torch.randn(1, 9, 1, 4)
    for w in (3, 100):
        o = naive_window(q, k, v, w, scale=0.3)
        for t in range(9):
            toks = range(max(0, t - w + 1), t + 1)
            for hq in range(2):
                want = loop_attend(q[0, t, hq], [k[0, s, 0] for s in toks], [v[0, s, 0] for s in toks], 0.3)
                torch.testing.assert_close(o[0, t, hq], want)


# ----------------------------------------------------------------------------- full NSA


@pytest.mark.parametrize("T,kw", [
    (13, {}),  # T a multiple of neither d, l nor BS
    (11, dict(l=4, d=2, BS=8, S=2, initial_blocks=1, local_blocks=1)),
    (10, dict(HQ=2, H=2, l=4, d=4, BS=4, S=3, w=2)),  # G = 1, l = d = BS
])
def test_nsa_vs_loop(T, kw):
    spec = make_spec(**kw)
    q, k, v = rand_qkv(spec, T)
    gates = rand_gates(spec, T)
    o, aux = naive_nsa(spec, q, k, v, *gates, return_aux=True)
    assert o.shape == (1, T, spec.HQ, spec.DV) and torch.isfinite(o).all()
    torch.testing.assert_close(o, loop_nsa(spec, q, k, v, gates), atol=ATOL, rtol=1e-4)
    NC = num_cmp_blocks(T, spec.l, spec.d)
    assert aux["k_cmp"].shape == (1, NC, spec.H, spec.DK)
    assert aux["p_cmp"].shape == (1, T, spec.HQ, NC)
    assert aux["indices"].shape == (1, T, spec.H, spec.S)
    assert aux["scores"].shape == (1, T, spec.H, -(-T // spec.BS))


def test_nsa_gating_and_skipped_branches():
    spec = make_spec()
    T = 12
    q, k, v = rand_qkv(spec, T)
    gc, gs, gw = rand_gates(spec, T)
    o, aux = naive_nsa(spec, q, k, v, gc, gs, gw, return_aux=True)
    want = gc[..., None] * aux["o_cmp"] + gs[..., None] * aux["o_slc"] + gw[..., None] * aux["o_swa"]
    torch.testing.assert_close(o, want)
    o_no_slc, aux2 = naive_nsa(spec, q, k, v, gc, None, gw, return_aux=True)
    torch.testing.assert_close(o_no_slc, want - gs[..., None] * aux["o_slc"])
    assert aux2["o_slc"] is None and aux2["indices"] is None
    only_swa = naive_nsa(spec, q, k, v, g_swa=gw)
    torch.testing.assert_close(only_swa, gw[..., None] * naive_window(q, k, v, spec.w))
    # Selection alone still needs (and computes) the compressed scores.
    only_slc, aux3 = naive_nsa(spec, q, k, v, g_slc=gs, return_aux=True)
    torch.testing.assert_close(only_slc, gs[..., None] * aux["o_slc"])
    assert torch.equal(aux3["indices"], aux["indices"])
    assert (naive_nsa(spec, q, k, v) == 0).all()
    with pytest.raises(ValueError):
        naive_nsa(make_spec(branches=("cmp", "slc")), q, k, v, gc, gs, gw)


def test_nsa_per_branch_kv():
    spec = make_spec(BS=4, S=3, initial_blocks=1, local_blocks=1)
    T = 20
    q, k, v = rand_qkv(spec, T, seed=0)
    gates = rand_gates(spec, T)
    _, k2, v2 = rand_qkv(spec, T, seed=5)
    _, k3, v3 = rand_qkv(spec, T, seed=6)
    _, k4, v4 = rand_qkv(spec, T, seed=7)
    kvs = {"cmp": (k2, v2), "slc": (k3, v3), "swa": (k4, v4)}
    o, aux = naive_nsa(spec, q, k, v, *gates, kv_cmp=kvs["cmp"], kv_slc=kvs["slc"],
                       kv_swa=kvs["swa"], return_aux=True)
    torch.testing.assert_close(o, loop_nsa(spec, q, k, v, gates, kvs), atol=ATOL, rtol=1e-4)
    o_shared, aux_shared = naive_nsa(spec, q, k, v, *gates, return_aux=True)
    assert (o - o_shared).abs().max() > 1e-2
    torch.testing.assert_close(aux["o_swa"], naive_window(q, k4, v4, spec.w))
    torch.testing.assert_close(aux["k_cmp"], naive_compress(k2, spec.l, spec.d))
    # Only kv_cmp changed: the indices (scored on compressed k2/v2) follow kv_cmp.
    _, aux_c = naive_nsa(spec, q, k, v, *gates, kv_cmp=(k2, v2), return_aux=True)
    assert torch.equal(aux_c["indices"], aux["indices"])
    assert not torch.equal(aux_c["indices"], aux_shared["indices"])


def test_nsa_varlen_equals_separate_runs():
    spec = make_spec()
    cu = torch.tensor([0, 7, 20, 23, 29], dtype=torch.int32)
    T = int(cu[-1])
    q, k, v = rand_qkv(spec, T)
    gates = rand_gates(spec, T)
    o, aux = naive_nsa(spec, q, k, v, *gates, cu_seqlens=cu, return_aux=True)
    assert o.shape == (1, T, spec.HQ, spec.DV) and torch.isfinite(o).all()
    for n, (bos, eos) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        sl = slice(bos, eos)
        o_i, aux_i = naive_nsa(spec, q[:, sl], k[:, sl], v[:, sl], *(g[:, sl] for g in gates),
                               return_aux=True)
        torch.testing.assert_close(o[:, sl], o_i)
        torch.testing.assert_close(o[:, sl], loop_nsa(spec, q[:, sl], k[:, sl], v[:, sl],
                                                      [g[:, sl] for g in gates]), atol=ATOL, rtol=1e-4)
        assert torch.equal(aux["indices"][:, sl], aux_i["indices"])
        assert torch.equal(aux["k_cmp"][n], aux_i["k_cmp"])
        # Block indices count from the sequence start: the first token holds block 0 only.
        assert aux["indices"][0, bos].tolist() == [[0, -1, -1]] * spec.H
    # The third sequence (3 tokens < l) has no compressed block, so o_cmp is 0 there.
    assert aux["k_cmp"][2].shape[1] == 0 and (aux["o_cmp"][:, 20:23] == 0).all()
    # Nothing crosses a boundary: perturbing sequence 0 leaves the others untouched.
    k_mod, v_mod = k.clone(), v.clone()
    k_mod[:, :7] += 3.0
    v_mod[:, :7] -= 2.0
    o_mod = naive_nsa(spec, q, k_mod, v_mod, *gates, cu_seqlens=cu)
    torch.testing.assert_close(o_mod[:, 7:], o[:, 7:])
    assert (o_mod[:, :7] - o[:, :7]).abs().max() > 1e-2
    with pytest.raises(ValueError):
        naive_nsa(spec, *rand_qkv(spec, T, B=2), cu_seqlens=cu)


def test_nsa_given_indices():
    """indices replaces the branch's own top-n (dense and packed): its own indices give the
    same output; others give the selected attention over those, the other branches and the
    scores unchanged; a wrong shape is an error."""
    spec = make_spec()
    T = 21
    q, k, v = rand_qkv(spec, T, B=2)
    gates = rand_gates(spec, T, B=2)
    o, aux = naive_nsa(spec, q, k, v, *gates, return_aux=True)
    o_same = naive_nsa(spec, q, k, v, *gates, indices=aux["indices"].to(torch.int32))
    assert torch.equal(o_same, o)
    # Each token's own block only: a valid list the top-n would not choose.
    own = (torch.arange(T) // spec.BS).view(1, T, 1, 1).expand(2, T, spec.H, 1)
    mine = torch.cat([own, torch.full((2, T, spec.H, spec.S - 1), -1)], -1).to(torch.int32)
    o2, aux2 = naive_nsa(spec, q, k, v, *gates, indices=mine, return_aux=True)
    assert torch.equal(aux2["indices"], mine.long()) and torch.equal(aux2["scores"], aux["scores"])
    torch.testing.assert_close(aux2["o_slc"], naive_selection(q, k, v, mine.long(), spec.BS))
    torch.testing.assert_close(aux2["o_swa"], aux["o_swa"])
    assert (o2 - o).abs().max() > 1e-3
    cu = torch.tensor([0, 9, T], dtype=torch.int32)
    q1, k1, v1 = (x[:1] for x in (q, k, v))
    g1 = [g[:1] for g in gates]
    _, aux_p = naive_nsa(spec, q1, k1, v1, *g1, cu_seqlens=cu, return_aux=True)
    o_p = naive_nsa(spec, q1, k1, v1, *g1, cu_seqlens=cu, indices=aux_p["indices"])
    torch.testing.assert_close(o_p, naive_nsa(spec, q1, k1, v1, *g1, cu_seqlens=cu))
    with pytest.raises(ValueError, match="indices has shape"):
        naive_nsa(spec, q, k, v, *gates, indices=mine[:, :5])


def test_nsa_mlp_phi_gradients():
    torch.manual_seed(0)
    spec = make_spec(phi="mlp")
    T = 14
    q, k, v = rand_qkv(spec, T)
    q.requires_grad_(True)
    gates = rand_gates(spec, T)
    mlp_k, mlp_v = CompressionMLP(spec.l, spec.DK), CompressionMLP(spec.l, spec.DV, hidden=16)
    o, aux = naive_nsa(spec, q, k, v, *gates, mlp_k=mlp_k, mlp_v=mlp_v, return_aux=True)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(aux["k_cmp"], naive_compress(k, spec.l, spec.d, "mlp", mlp_k))
    o.square().sum().backward()
    for mod in (mlp_k, mlp_v):
        for name, prm in mod.named_parameters():
            assert prm.grad is not None and torch.isfinite(prm.grad).all(), name
            assert prm.grad.abs().sum() > 0, name
    assert torch.isfinite(q.grad).all()
    with pytest.raises(ValueError):
        naive_nsa(spec, q, k, v, *gates)  # phi = mlp without the modules


def test_nsa_upcasts_low_precision_inputs():
    spec = make_spec()
    q, k, v = rand_qkv(spec, 9)
    gates = rand_gates(spec, 9)
    o16 = naive_nsa(spec, q.bfloat16(), k.bfloat16(), v.bfloat16(), *(g.bfloat16() for g in gates))
    assert o16.dtype == torch.float32
    o32 = naive_nsa(spec, q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(),
                    *(g.bfloat16().float() for g in gates))
    torch.testing.assert_close(o16, o32)
