"""selection_fwd (selected attention, given indices) and topn (block selection) against naive.py."""
import pytest
import torch

from conftest import shrink
from nsa_gen import naive
from nsa_gen.config import Config
from nsa_gen.harness import _cmp_lse, make_case, rel_error
from nsa_gen.kernels import kernel_def, kernel_source
from nsa_gen.ops.common import seq_start
from nsa_gen.ops.selection import selection_bwd, selection_fwd, topn, visible_blocks

# G in {1, 4, 16}, DK != DV, ragged T (not a multiple of l, d or l').
SPECS = {
    "G1": dict(name="mqa", heads={"q": 2, "kv": 2}, head_dim={"k": 32, "v": 16}),
    "G4": dict(name="small-group", heads={"q": 8, "kv": 2}, head_dim={"k": 48, "v": 32}),
    "G16": dict(name="deepseek-nsa", heads={"q": 16, "kv": 1}, head_dim={"k": 48, "v": 32}),
    "fla": dict(name="fla-compat", heads={"q": 16, "kv": 1}, head_dim={"k": 32, "v": 32},
                compression={"block": 16, "stride": 16}, selection={"block": 16, "top_n": 4}),
}


def make_spec(key, **extra):
    d = dict(SPECS[key])
    d.setdefault("compression", {"block": 16, "stride": 8})
    d.setdefault("selection", {"block": 32, "top_n": 4, "initial_blocks": 1, "local_blocks": 2})
    d.update(extra)
    return shrink(d.pop("name"), **d)


def variant(spec, block_q: int, block_n: int = 16, tma: int = 0, share: int = 1,
            forced: int = 0) -> Config:
    """BLOCK_Q 0: the group-centric kernel (share tokens a program; forced > 0: the forced
    blocks first in a pass of that many query rows a tile); n > 0: query-batched, n tokens
    a program. tma 1: K/V through tensor descriptors."""
    space = kernel_def("selection_fwd").space(spec)
    assert block_q in space["BLOCK_Q"] and forced in space["FORCED"]
    return Config.make(BLOCK_N=block_n, BLOCK_Q=block_q, TMA=tma, SHARE=share, FORCED=forced,
                       num_warps=4, num_stages=1)


def overlapping_indices(spec, B: int, T: int, g: torch.Generator) -> torch.Tensor:
    """Block lists as adjacent tokens of real attention tend to have them: the forced blocks,
    blocks common to runs of 3 tokens (runs not aligned with any program's tokens), and a
    few of each token's own; -1 padding where a token sees fewer blocks."""
    idx = torch.full((B, T, spec.H, spec.S), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(spec.H):
            common = []
            for t in range(T):
                cur = t // spec.BS
                if t % 3 == 0:
                    common = torch.randint(0, cur + 1, (spec.S // 2,), generator=g).tolist()
                own = torch.randint(0, cur + 1, (spec.S,), generator=g).tolist()
                blocks = []
                for j in [0, cur, cur - 1] + common + own:
                    if 0 <= j <= cur and j not in blocks:
                        blocks.append(j)
                blocks = sorted(blocks[: spec.S])
                idx[b, t, h, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    return idx


def packed_case(spec, seed: int):
    """Three packed sequences (37, 5 and 50 tokens) with top-n-like lists of their own:
    (q, k, v, block indices, cu_seqlens, naive_selection of each sequence, concatenated)."""
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, 37, 42, 92], dtype=torch.int32)
    T = int(cu[-1])
    q = torch.randn(1, T, spec.HQ, spec.DK, generator=g)
    k = torch.randn(1, T, spec.H, spec.DK, generator=g)
    v = torch.randn(1, T, spec.H, spec.DV, generator=g)
    parts, idxs = [], []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        n = b - a
        sc = torch.rand(1, n, spec.H, -(-n // spec.BS), generator=g)
        ix = naive.naive_topn(sc, spec.BS, spec.S, spec.initial_blocks, spec.local_blocks)
        idxs.append(ix)
        parts.append(naive.naive_selection(q[:, a:b], k[:, a:b], v[:, a:b], ix.long(), spec.BS))
    return q, k, v, torch.cat(idxs, 1).to(torch.int32), cu, torch.cat(parts, 1)


# The group-centric kernel and the query-batched one at its fewest (16 rows) and most tokens.
VARIANTS = {"G1": [0, 16, 128], "G4": [0, 4, 32], "G16": [0, 1, 8]}


@pytest.mark.parametrize("key", ["G1", "G4", "G16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("which", [0, 1, 2])
def test_selection_fwd(key, dtype, which, poison):
    spec = make_spec(key)
    case = make_case("selection_fwd", spec, 77, B=2, dtype=dtype, seed=hash(key) % 1000)
    assert (case.inputs["block_indices"] == -1).any(), "test must cover empty slots"
    err = case.rel_error(case.run(variant(spec, VARIANTS[key][which])))
    assert err < case.tolerance, err


@pytest.mark.parametrize("key,block_q,forced", [("G16", 0, 0), ("G16", 0, 64), ("G4", 4, 0),
                                                ("G4", 8, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_selection_fwd_gated_case(key, block_q, forced, dtype, poison):
    """selection_fwd_gated's case (what its tuning key times): the kernel storing the gated
    sum of all the spec's branches against naive_gate over naive_selection and the other
    outputs; a gate that is not read or a branch left out fails it."""
    spec = make_spec(key, window=8)
    assert spec.branches == ("cmp", "slc", "swa")
    case = make_case("selection_fwd_gated", spec, 77, B=2, dtype=dtype, seed=12)
    assert {"o_cmp", "o_swa", "g_cmp", "g_slc", "g_swa"} <= set(case.inputs)
    out = case.run(variant(spec, block_q, forced=forced))
    assert case.rel_error(out) < case.tolerance
    # Not the ungated output: the gates and the other branches are in it.
    plain = make_case("selection_fwd", spec, 77, B=2, dtype=dtype, seed=12)
    assert rel_error(out[0], plain.reference()[0]) > 0.1


@pytest.mark.parametrize("block_n,block_q", [(16, 0), (32, 0), (16, 4), (32, 8)])
def test_selection_fwd_tiles(block_n, block_q, poison):
    spec = make_spec("G4")
    case = make_case("selection_fwd", spec, 50, dtype=torch.float32, seed=3)
    assert case.rel_error(case.run(variant(spec, block_q, block_n))) < 1e-4


@pytest.mark.parametrize("key,share,tma", [("G16", 2, 0), ("G16", 4, 1), ("G4", 4, 0), ("G1", 2, 1)])
def test_selection_fwd_share(key, share, tma, poison):
    """SHARE tokens a group-centric program, each tile loaded once for every token that chose
    it: the reference's numbers, on random lists (little shared, T = 77 not a multiple of
    SHARE, two sequences of the batch) and on lists adjacent tokens largely share."""
    spec = make_spec(key)
    case = make_case("selection_fwd", spec, 77, B=2, dtype=torch.float32, seed=31)
    assert case.rel_error(case.run(variant(spec, 0, tma=tma, share=share))) < 1e-4
    g = torch.Generator().manual_seed(32)
    B, T = 2, 77
    q, k, v = (case.inputs[n] for n in "qkv")
    idx = overlapping_indices(spec, B, T, g)
    ref = naive.naive_selection(q, k, v, idx.long(), spec.BS, spec.softmax_scale)
    o = torch.full_like(ref, float("nan"))
    o, _ = selection_fwd(q, k, v, idx, spec, variant(spec, 0, tma=tma, share=share))
    assert (o - ref).norm() / ref.norm() < 1e-5


# (initial, local) forced blocks: the paper's, none initial, two initial (overlapping the
# local ones of early tokens), none local. Selection blocks of 16 tokens: T = 77 spans 5.
FORCED_LAYOUTS = [(1, 2), (0, 2), (2, 1), (1, 0)]


@pytest.mark.parametrize("key,rows,tma,dtype,block_q", [
    ("G16", 64, 0, torch.float32, 0), ("G16", 128, 1, torch.float16, 0),
    ("G4", 64, 1, torch.float32, 0), ("G1", 128, 0, torch.float16, 0),
    ("G16", 64, 1, torch.float32, 1), ("G4", 128, 0, torch.float16, 8),
    ("G1", 64, 1, torch.float32, 16)])
@pytest.mark.parametrize("forced", FORCED_LAYOUTS)
def test_selection_fwd_forced(key, rows, tma, dtype, block_q, forced, poison):
    """FORCED: the forced blocks in a token-tile pass; the rest in the group-centric loop that
    starts from its state (block_q 0), or as query-batched partials that the combine kernel
    merges with it. The reference's numbers on top-n-like lists (every forced block listed),
    in two sequences of the batch, with tiles (64 / 128 rows: 4-128 tokens) that cross
    selection blocks; each key counted once where initial and local blocks meet."""
    init, local = forced
    spec = make_spec(key, selection={"block": 16, "top_n": 5, "initial_blocks": init,
                                     "local_blocks": local})
    case = make_case("selection_fwd", spec, 77, B=2, dtype=dtype, seed=40 + init + 3 * local)
    err = case.rel_error(case.run(variant(spec, block_q, tma=tma, forced=rows)))
    assert err < (1e-5 if dtype == torch.float32 else case.tolerance), err


def test_selection_fwd_forced_varlen(poison):
    """Packed sequences: a forced tile never crosses into the next sequence, and each
    sequence's initial block is its own."""
    spec = make_spec("G4", selection={"block": 16, "top_n": 5, "initial_blocks": 1,
                                      "local_blocks": 2})
    q, k, v, idx, cu, ref = packed_case(spec, seed=12)
    for tma, block_q in ((0, 0), (1, 0), (0, 4), (1, 16)):
        o, _ = selection_fwd(q, k, v, idx, spec, variant(spec, block_q, tma=tma, forced=64),
                             cu_seqlens=cu, forced_listed=True)
        assert (o - ref).norm() / ref.norm() < 1e-5, (tma, block_q)


def test_selection_fwd_forced_needs_listed_blocks(poison, caplog):
    """Lists without their forced blocks (here: random blocks, never the token's own) must not
    get them added: without forced_listed, FORCED runs as 0, with one warning."""
    from nsa_gen.ops import common
    spec = make_spec("G4")
    g = torch.Generator().manual_seed(13)
    B, T = 1, 70
    q, k, v = (torch.randn(B, T, h, d, generator=g) for h, d in
               ((spec.HQ, spec.DK), (spec.H, spec.DK), (spec.H, spec.DV)))
    own = (torch.arange(T) // spec.BS)[None, :, None, None]
    idx = torch.randint(0, 3, (B, T, spec.H, spec.S), generator=g)
    idx = torch.where(idx < own, idx, -1).to(torch.int32)
    ref = naive.naive_selection(q, k, v, idx.long(), spec.BS, spec.softmax_scale)
    for block_q in (0, 4):
        common._FALLBACKS_WARNED.clear()
        with caplog.at_level("WARNING", logger="nsa_gen"):
            o, _ = selection_fwd(q, k, v, idx, spec, variant(spec, block_q, forced=64))
        assert (o - ref).norm() / ref.norm() < 1e-5
        assert "forced_listed" in caplog.text


@pytest.mark.parametrize("key,block_q", [("G4", 0), ("G4", 8), ("G1", 0), ("G16", 1)])
def test_selection_fwd_tma(key, block_q, poison):
    """K/V through tensor descriptors: the same numbers as through pointers (the extra rows
    a box loads are masked in the scores; extra columns meet zero query columns or are not
    stored), in two sequences so boxes cross from one into the next and past the end."""
    spec = make_spec(key)
    case = make_case("selection_fwd", spec, 77, B=2, dtype=torch.float32, seed=21)
    want = case.run(variant(spec, block_q))
    got = case.run(variant(spec, block_q, tma=1))
    assert case.rel_error(got) < 1e-4
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("forced", [0, 64])
def test_selection_fwd_query_chunks(forced, monkeypatch, poison):
    """Row chunks of the query-batched forward (partials kept within a byte budget) give the
    same result as one chunk: here 64-row chunks over 2 x 150 rows, the last one short; with
    FORCED, every chunk's combine starts from the one forced pass's state of its rows."""
    from nsa_gen.ops import selection as sel
    spec = make_spec("G4")
    case = make_case("selection_fwd", spec, 150, B=2, dtype=torch.float32, seed=8)
    whole = case.run(variant(spec, 8, forced=forced))[0]
    monkeypatch.setattr(sel, "QUERY_PART_BYTES", 1)
    assert sel.query_chunk_rows(spec, 4) == 64
    chunked = case.run(variant(spec, 8, forced=forced))[0]
    assert case.rel_error((chunked,)) < 1e-4
    # Not bitwise: in the interpreter tl.dot is numpy's matmul, whose summation order can
    # depend on which rows a tile batches together (chunks group a block's tokens
    # differently); 1-ulp differences were seen on one CPU and not on another.
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


def test_selection_fwd_lists_after_a_mark(monkeypatch, poison):
    """`after` (nsa() marks top-n's output) reaches the block lists' `ahead` only where the
    lists read nothing selection_fwd makes itself: canonical lists of unpacked sequences."""
    from nsa_gen.ops import selection as sel
    spec = make_spec("G4")
    case = make_case("selection_fwd", spec, 70, B=1, dtype=torch.float32, seed=4)
    q, k, v, idx = (case.inputs[n] for n in ("q", "k", "v", "block_indices"))
    seen = []
    real = sel.ahead
    monkeypatch.setattr(sel, "ahead", lambda *a, after=None, **kw: seen.append(after) or real(*a, **kw))
    token = object()
    cfg = variant(spec, 4, forced=64)
    ref = sel.selection_fwd(q, k, v, idx, spec, cfg, canonical=True, forced_listed=True)[0]
    o = sel.selection_fwd(q, k, v, idx, spec, cfg, canonical=True, forced_listed=True, after=token)[0]
    assert torch.equal(o, ref)
    sel.selection_fwd(q, k, v, idx, spec, cfg, forced_listed=True, after=token)  # not canonical
    cu = torch.tensor([0, 30, 70], dtype=torch.int32)
    sel.selection_fwd(q, k, v, idx, spec, cfg, cu, canonical=True, forced_listed=True, after=token)
    assert seen == [None, token, None, None]


def test_selection_fwd_query_future_and_repeated_blocks(poison):
    """Indices given by hand may name a block after the token or past the sequence (nothing
    visible: it adds nothing) or the same block twice (the list is a set): both variants
    agree with the reference, forward and backward."""
    spec = make_spec("G4")
    g = torch.Generator().manual_seed(6)
    B, T = 1, 70
    q, k, v = (torch.randn(B, T, h, d, generator=g) for h, d in
               ((spec.HQ, spec.DK), (spec.H, spec.DK), (spec.H, spec.DV)))
    idx = torch.full((B, T, spec.H, spec.S), -1, dtype=torch.int32)
    idx[..., 0] = 0
    idx[..., 1] = 1  # after tokens 0 .. 31
    idx[..., 2] = 0
    ref_idx = idx.long()
    ref = naive.naive_selection(q, k, v, ref_idx, spec.BS, spec.softmax_scale)
    idx[..., 3] = 1000  # past the end: the reference refuses it, the kernels ignore it
    for bq in (0, 4):
        o, _ = selection_fwd(q, k, v, idx, spec, variant(spec, bq))
        assert (o - ref).norm() / ref.norm() < 1e-5, bq
    do = torch.randn_like(ref)
    qkv = [x.clone().requires_grad_() for x in (q, k, v)]
    naive.naive_selection(*qkv, ref_idx, spec.BS, spec.softmax_scale).backward(do)
    o, lse = selection_fwd(q, k, v, idx, spec)
    got = selection_bwd(q, k, v, o, lse, do, idx, spec)
    for name, g, x in zip("qkv", got, qkv):
        assert (g - x.grad).norm() / x.grad.norm() < 1e-5, name


def test_visible_blocks_is_canonical():
    """Each block once, nothing after the token's own block; a second pass keeps the same
    list (SelectionFunction makes the list canonical once and tells both launchers so)."""
    spec = make_spec("G4")  # BS = 32
    idx = torch.tensor([[3, 0, -1, 0], [1, 2, 9, -5]], dtype=torch.int32)  # tokens 40, 70
    idx = idx.view(1, 2, 1, 4).expand(1, 2, spec.H, 4).contiguous()
    big = torch.full((1, 71, spec.H, 4), -1, dtype=torch.int32)
    big[0, 40], big[0, 70] = idx[0, 0], idx[0, 1]
    got = visible_blocks(big, spec, None)
    # topn's order: ascending, -1 slots last.
    assert got[0, 40, 0].tolist() == [0, -1, -1, -1]  # 3 is after token 40's block 1
    assert got[0, 70, 0].tolist() == [1, 2, -1, -1]
    assert torch.equal(visible_blocks(got, spec, None), got)


@pytest.mark.parametrize("key", ["G4", "G16"])
def test_case_indices_are_canonical(key):
    """The selection_fwd case (what verify and the tuner run) passes its lists as canonical,
    as nsa() passes topn's: they must be, or the kernels would see repeats and future blocks."""
    spec = make_spec(key)
    for B, T, seed in ((2, 77, 0), (1, 200, 3)):
        idx = make_case("selection_fwd", spec, T, B=B, seed=seed).inputs["block_indices"]
        assert (idx == -1).any() and (idx >= 0).any()
        assert torch.equal(visible_blocks(idx, spec, None), idx)


@pytest.mark.parametrize("block_q,share", [(0, 1), (4, 1), (0, 2)])
def test_selection_fwd_lse_and_empty_rows(block_q, share, poison):
    """lse is the log-sum-exp of the visible logits; a token with only -1 slots gets 0, -inf."""
    spec = make_spec("G4")
    g = torch.Generator().manual_seed(5)
    B, T = 1, 40
    q = torch.randn(B, T, spec.HQ, spec.DK, generator=g)
    k = torch.randn(B, T, spec.H, spec.DK, generator=g)
    v = torch.randn(B, T, spec.H, spec.DV, generator=g)
    idx = torch.full((B, T, spec.H, spec.S), -1, dtype=torch.int32)
    idx[:, :, :, 0] = 0
    idx[:, 7] = -1  # token 7: nothing to attend to
    o, lse = selection_fwd(q, k, v, idx, spec, variant(spec, block_q, share=share))
    assert torch.all(o[:, 7] == 0) and torch.all(lse[:, 7] == float("-inf"))
    t = 20
    kk = k[0, : t + 1].repeat_interleave(spec.G, 1)  # [t+1, HQ, DK]
    logits = torch.einsum("hd,nhd->hn", q[0, t], kk) * spec.softmax_scale
    torch.testing.assert_close(lse[0, t], torch.logsumexp(logits, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_q,share", [(0, 1), (4, 1), (0, 4)])
def test_selection_fwd_varlen(block_q, share, poison):
    spec = make_spec("G4")
    q, k, v, idx, cu, ref = packed_case(spec, seed=9)
    # SHARE 4: programs of tokens 36-39 and 40-43 cross into the next sequence.
    o, _ = selection_fwd(q, k, v, idx, spec, variant(spec, block_q, share=share), cu_seqlens=cu)
    assert (o - ref).norm() / ref.norm() < 1e-5


@pytest.mark.parametrize("key", ["G1", "G4", "G16", "fla"])
def test_topn(key, poison):
    spec = make_spec(key)
    case = make_case("topn", spec, 93, B=2, dtype=torch.float32, seed=11)
    idx = case.run()[0]
    scores, ref = case.reference()
    assert case.rel_error((idx,)) < 1e-4
    # Already canonical: nsa() hands topn's output to SelectionFunction with canonical=True.
    assert torch.equal(visible_blocks(idx, spec, None), idx)
    # Forced blocks are always there: block 0 and the block holding t (and the one before).
    t = torch.arange(93)
    cur = (t // spec.BS)[None, :, None]
    assert (idx == 0).any(-1).all()
    assert (idx == cur[..., None]).any(-1).all()
    # The block holding t is the last valid slot.
    last = idx.gather(-1, ((idx >= 0).sum(-1, keepdim=True) - 1).clamp_min(0)).squeeze(-1)
    assert (last == cur).all()


@pytest.mark.parametrize("key", ["G4", "fla"])
@pytest.mark.parametrize("width", [64, 32])
def test_topn_merge_variants(key, width, poison):
    """The bitonic, hcube and rank merges keep exactly what sorting the union keeps, at chunks
    of 16 and 32 blocks, over several chunks (600 tokens: 38 selection blocks of 16), with 64-
    and 32-bit keys."""
    spec = make_spec(key, selection={"block": 16, "top_n": 4, "initial_blocks": 1, "local_blocks": 2})
    case = make_case("topn", spec, 600, B=1, dtype=torch.float32, seed=5)
    space = kernel_def("topn").space(spec)
    for bj in space["BJ"][:2]:  # R = 1's 64-block chunks: test_topn_wide_chunks
        base = dict(kernel_def("topn").default(spec, 93).as_dict(), BJ=bj, KEY=width)
        got = {m: case.run(Config.from_dict(dict(base, MERGE=m)))[0] for m in space["MERGE"]}
        assert case.rel_error((got["bitonic"],)) < 1e-4
        for merge in space["MERGE"]:
            assert torch.equal(got[merge], got["sort"]), (merge, bj)


@pytest.mark.parametrize("l,d", [(8, 4), (16, 4), (4, 4), (16, 16)])
def test_topn_importance_variants(l, d, poison):  # noqa: E741
    """IMP "sum" (group sum first, then Eq. 9's weights as per-block sums and a shifted
    spill-over) selects what the reference selects, and what IMP "dot" selects, for every
    overlap geometry of l' = 16: R = 4 with M = 2 (spill into the next block), M = R = 4
    (l = l', the most spill), M = 1 (none), and R = 1 (compressed and selection blocks equal).
    300 tokens are 19 selection blocks: the spill crosses a 16-block chunk boundary too."""
    spec = make_spec("G4", compression={"block": l, "stride": d},
                     selection={"block": 16, "top_n": 4, "initial_blocks": 1, "local_blocks": 2})
    case = make_case("topn", spec, 300, B=1, dtype=torch.float32, seed=8)
    base = kernel_def("topn").default(spec, 300).replace(BJ=16)  # (the default at R = 1: 32)
    got = case.run(base.replace(IMP="sum"))[0]
    assert case.rel_error((got,)) < 1e-4
    assert torch.equal(got, case.run(base.replace(IMP="dot"))[0])
    assert torch.equal(got, case.run(base.replace(IMP="tsum"))[0])
    # "mma" sums the heads in tl.dot's order: a near-tie may break the other way.
    assert case.rel_error(case.run(base.replace(IMP="mma"))) < 1e-4


def test_topn_wide_chunks(poison):
    """At R = 1 the space offers chunks of 4 * 16 = 64 selection blocks, which put the
    transposed tile's chunk side on wgmma's 64 rows. IMP "mma" with them, as fla-compat's 64k
    entry runs it (the full sort, up to 8 insertions), selects what the reference selects.
    One chunk (38 blocks): the chunk-to-chunk logic does not depend on BJ and is tested at 16
    and 32 (test_topn_merge_variants, test_topn_importance_variants); this run alone costs
    the interpreter a minute."""
    spec = make_spec("G4", heads={"q": 4, "kv": 1}, compression={"block": 16, "stride": 16},
                     selection={"block": 16, "top_n": 6, "initial_blocks": 1, "local_blocks": 2})
    assert 64 in kernel_def("topn").space(spec)["BJ"]
    case = make_case("topn", spec, 600, B=1, dtype=torch.float32, seed=11)
    cfg = kernel_def("topn").default(spec, 600).replace(BJ=64, IMP="mma", MERGE="sort", INSERT=8)
    assert case.rel_error(case.run(cfg)) < 1e-4


def test_topn_narrow_list(poison):
    """LIST = 1 keeps the running list next_pow2(S) keys wide instead of BJ: with S = 4 and
    32-block chunks the sort merge (with up to 2 insertions) and the bitonic merge keep
    exactly what the BJ-wide sort merge keeps (and the hcube merge, with and without
    insertions), over several chunks (600 tokens: 38 selection blocks). LIST is unread by the
    rank merge."""
    spec = make_spec("G4", selection={"block": 16, "top_n": 4, "initial_blocks": 1, "local_blocks": 2})
    kd = kernel_def("topn")
    assert 32 in kd.space(spec)["BJ"]
    case = make_case("topn", spec, 600, B=1, dtype=torch.float32, seed=6)
    base = kd.default(spec, 93).replace(BJ=32, MERGE="sort", INSERT=0, LIST=0)
    want = case.run(base)[0]
    assert case.rel_error((want,)) < 1e-4
    for merge, insert in (("sort", 2), ("bitonic", 0), ("hcube", 0), ("hcube", 2)):
        got = case.run(base.replace(MERGE=merge, INSERT=insert, LIST=1))[0]
        assert torch.equal(got, want), (merge, insert)
    assert kd.canonical(spec, base.replace(MERGE="rank", LIST=1))["LIST"] == 0
    assert "SL = tl.constexpr(4)" in kernel_source("topn", spec, base.replace(LIST=1))
    assert "SL = tl.constexpr" not in kernel_source("topn", spec, base)


@pytest.mark.parametrize("scale", [1.0, 6.0])
def test_topn_mma_fp16_probabilities(scale, poison):
    """IMP "mma" in 16-bit inputs sums fp16 probabilities (scaled by 2^P_SHIFT) on the tensor
    cores: it must rank as the fp32 sums of "tsum" do, up to rare near-ties, on a flat
    (scale 1) and a peaked (q x 6: most probabilities tiny) softmax, with every block
    scored (no forced blocks) and 16 of 64 blocks chosen, so the ranking reaches its tail.
    (At these lengths no probability needs the 2^P_SHIFT scale to stay normal in fp16; it
    matters past ~16k visible blocks of a flat softmax.)"""
    spec = make_spec("G4", compression={"block": 8, "stride": 4},
                     selection={"block": 16, "top_n": 16, "initial_blocks": 0, "local_blocks": 0})
    case = make_case("topn", spec, 1024, B=1, dtype=torch.float16, seed=4)
    q = case.inputs["q"]
    q.mul_(scale)
    k_cmp = case.inputs["k_cmp"]
    lse = _cmp_lse(q, k_cmp, spec)
    base = kernel_def("topn").default(spec, 1024).replace(BJ=16)
    want = topn(q, k_cmp, lse, spec, base.replace(IMP="tsum"))
    got = topn(q, k_cmp, lse, spec, base.replace(IMP="mma"))
    assert (got == want).all(-1).float().mean() >= 0.99
    assert case.rel_error((got,)) < 1e-3  # the reference's scores of its choice (q scaled in place)


def test_topn_register_cap_is_a_launch_option():
    """MAXNREG > 0 reaches the launch as ptxas' register cap; 0 (or no such param) leaves
    the compiler's choice."""
    from nsa_gen.ops.common import launch_options
    cfg = kernel_def("topn").default(make_spec("G4"), 4096)
    assert cfg["MAXNREG"] == 0 and "maxnreg" not in launch_options(cfg)
    assert launch_options(cfg.replace(MAXNREG=168, num_stages=1)) == {
        "num_warps": cfg.num_warps, "num_stages": 1, "maxnreg": 168}
    assert "maxnreg" not in launch_options(Config.make(BLOCK_T=4))


@pytest.mark.parametrize("local", [0, 1])
@pytest.mark.parametrize("l,d", [(16, 4), (16, 16)])
def test_topn_diagonal_visibility(l, d, local, poison):  # noqa: E741
    """Few forced local blocks: a compressed block not yet complete for a token overlaps a
    selection block that is a candidate, so a chunk on the diagonal scored without its mask
    would rank it by a probability the token never had. (With 2 local blocks, the default,
    every such block falls in a forced or future selection block.) d = l' puts a chunk
    boundary every 16 blocks, where the tiles' first rows meet it."""
    spec = make_spec("G4", compression={"block": l, "stride": d},
                     selection={"block": 16, "top_n": 4, "initial_blocks": 1, "local_blocks": local})
    case = make_case("topn", spec, 300, B=1, dtype=torch.float32, seed=9)
    base = kernel_def("topn").default(spec, 300).replace(BJ=16)
    for imp in ("dot", "sum", "tsum", "mma"):
        got = case.run(base.replace(IMP=imp))[0]
        assert case.rel_error((got,)) < 1e-4, imp


@pytest.mark.parametrize("forced", [(1, 2), (0, 0)])
def test_topn_insert_path(forced, poison):
    """Chunks merged by insertion (INSERT: when no token of the tile has more than that many
    keys above its S-th best) keep exactly what sorting the union keeps. INSERT = BJ takes the
    insertion path for every chunk, the first ones (every key new) included. Without forced
    blocks every slot is scored, so a threshold one entry too high drops keys."""
    spec = make_spec("G4", selection={"block": 16, "top_n": 4, "initial_blocks": forced[0],
                                      "local_blocks": forced[1]})
    case = make_case("topn", spec, 600, B=1, dtype=torch.float32, seed=5)
    base = kernel_def("topn").default(spec, 93)
    want = case.run(base.replace(MERGE="sort"))[0]
    for merge, insert in (("bitonic", base["BJ"]), ("bitonic", 2), ("hcube", 2), ("rank", base["BJ"])):
        for width in (64, 32):
            got = case.run(base.replace(MERGE=merge, INSERT=insert, KEY=width))[0]
            assert torch.equal(got, want), (merge, insert, width)


@pytest.mark.parametrize("width", [64, 32])
def test_topn_ties_and_padding(width, poison):
    """Identical keys make every score tie: ties go to the lowest block indices."""
    # l = d = l': every complete block gets exactly the same importance.
    spec = make_spec("G4", compression={"block": 16, "stride": 16},
                     selection={"block": 16, "top_n": 4, "initial_blocks": 0, "local_blocks": 1})
    B, T = 1, 90
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, T, spec.HQ, spec.DK, generator=g)
    k_row = torch.randn(spec.H, spec.DK, generator=g)
    k = k_row.expand(B, T, spec.H, spec.DK).contiguous()
    k_cmp = naive.naive_compress(k, spec.l, spec.d)
    from nsa_gen.harness import _cmp_lse
    config = kernel_def("topn").default(spec, T).replace(KEY=width)
    idx = topn(q, k_cmp, _cmp_lse(q, k_cmp, spec), spec, config)
    for t in (0, 20, 47, 89):
        cur = t // spec.BS
        cands = list(range(cur + 1))
        # the block holding t is forced; the rest go to the lowest indices (all tie at equal scores)
        want = sorted(set([cur] + [j for j in cands if j != cur][: spec.S - 1]))
        got = [j for j in idx[0, t, 0].tolist() if j >= 0]
        assert got == want, (t, got, want)
        assert idx[0, t, 0].tolist()[len(got):] == [-1] * (spec.S - len(got))


def test_topn_key32_precision_and_fallback(poison, monkeypatch, caplog):
    """32-bit keys keep 23 - index_bits mantissa bits: scores that differ in the low bits
    tie (lower index first), and a T needing more than TOPN_INDEX_BITS index bits falls back
    to 64-bit keys with a warning, logged once however often it happens."""
    from nsa_gen.kernels import topn_index_bits
    assert [topn_index_bits(T, 64) for T in (1, 64, 65, 65536, 1 << 21)] == [1, 1, 2, 11, 16]
    spec = make_spec("G4", selection={"block": 16, "top_n": 4, "initial_blocks": 1, "local_blocks": 2})
    case = make_case("topn", spec, 300, B=1, dtype=torch.float32, seed=2)
    base = kernel_def("topn").default(spec, 300)
    want = case.run(base)[0]
    got = case.run(base.replace(KEY=32))[0]
    assert case.rel_error((got,)) < 1e-5
    from nsa_gen.ops import common as ops_common
    from nsa_gen.ops import selection as ops_selection
    monkeypatch.setattr(ops_selection, "TOPN_INDEX_BITS", 2)  # 300 tokens: 19 blocks, 5 bits
    monkeypatch.setattr(ops_common, "_FALLBACKS_WARNED", set())
    with caplog.at_level("WARNING", logger="nsa_gen"):
        for _ in range(2):
            assert torch.equal(case.run(base.replace(KEY=32))[0], want)
    warnings = [r.getMessage() for r in caplog.records if "KEY=64" in r.getMessage()]
    assert len(warnings) == 1 and "300 tokens: 5 bits" in warnings[0], caplog.text


def test_tma_falls_back_on_misaligned_inputs(poison, monkeypatch, caplog):
    """TMA descriptors need 16-byte aligned tensors: a misaligned input (a view 4 bytes into
    its storage) is loaded through pointers instead, with one warning, and the same result."""
    from nsa_gen.ops import common as ops_common
    monkeypatch.setattr(ops_common, "_FALLBACKS_WARNED", set())
    spec = make_spec("G4")
    case = make_case("topn", spec, 40, B=1, dtype=torch.float32, seed=3)
    q, k_cmp, lse = (case.inputs[n] for n in ("q", "k_cmp", "lse"))
    shifted = torch.empty(k_cmp.numel() + 1, dtype=k_cmp.dtype)[1:].view(k_cmp.shape)
    shifted.copy_(k_cmp)
    assert shifted.data_ptr() % 16 and shifted.is_contiguous()
    base = kernel_def("topn").default(spec, 40)
    want = topn(q, k_cmp, lse, spec, base.replace(TMA=0))
    with caplog.at_level("WARNING", logger="nsa_gen"):
        for _ in range(2):
            assert torch.equal(topn(q, shifted, lse, spec, base.replace(TMA=1)), want)
    warnings = [r.getMessage() for r in caplog.records if "TMA=0" in r.getMessage()]
    assert len(warnings) == 1 and "16-byte aligned" in warnings[0], caplog.text


def test_topn_varlen(poison):
    """Packed sequences score and select per sequence, as if run one by one."""
    spec = make_spec("G4")
    g = torch.Generator().manual_seed(4)
    cu = torch.tensor([0, 41, 45, 110], dtype=torch.int32)
    T = 110
    q = torch.randn(1, T, spec.HQ, spec.DK, generator=g)
    k = torch.randn(1, T, spec.H, spec.DK, generator=g)
    from nsa_gen.harness import _cmp_lse
    kcs, lses, refs = [], [], []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        kc = naive.naive_compress(k[:, a:b], spec.l, spec.d)
        kcs.append(kc)
        lses.append(_cmp_lse(q[:, a:b], kc, spec))
        refs.append(topn(q[:, a:b], kc, lses[-1], spec))
    idx = topn(q, torch.cat(kcs, 1), torch.cat(lses, 1), spec, cu_seqlens=cu)
    assert torch.equal(idx, torch.cat(refs, 1))
    # Compressed keys through tensor descriptors: boxes cross into the next sequence's blocks.
    tma = kernel_def("topn").default(spec, T).replace(TMA=1)
    assert torch.equal(topn(q, torch.cat(kcs, 1), torch.cat(lses, 1), spec, tma, cu_seqlens=cu), idx)
    assert torch.equal(visible_blocks(idx, spec, seq_start(cu, 1, T, idx.device)), idx)


def test_bad_inputs():
    spec = make_spec("G4")
    q = torch.randn(1, 8, spec.HQ, spec.DK)
    k = torch.randn(1, 8, spec.H, spec.DK)
    v = torch.randn(1, 8, spec.H, spec.DV)
    idx = torch.zeros(1, 8, spec.H, spec.S, dtype=torch.int32)
    with pytest.raises(ValueError, match="k has shape"):
        selection_fwd(q, k[:, :, :1], v, idx, spec)
    with pytest.raises(TypeError, match="block_indices has dtype"):
        selection_fwd(q, k, v, idx.long(), spec)
    with pytest.raises(TypeError, match="expected torch.float32"):
        selection_fwd(q, k.half(), v, idx, spec)
    with pytest.raises(ValueError, match="cu_seqlens"):
        selection_fwd(q, k, v, idx, spec, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))


@pytest.mark.parametrize("lens", [[200], [1] * 40 + [33, 70], [31, 1, 64, 2, 97], [0, 40, 0, 64]])
def test_block_table_numbers_every_block(lens):
    """block_table numbers each sequence's blocks in order, one after another: a token's
    block j is row_block + j, whose first key row is its sequence's row + j * BS and whose
    end row is its sequence's; numbers past the real blocks repeat the last one."""
    from nsa_gen.ops import selection as sel
    spec = make_spec("G4")  # BS = 32
    T = sum(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    table = sel.block_table(spec, 1, T, cu if len(lens) > 1 else None, "cpu")
    expect_first, expect_row, expect_end = [], [], []
    for start, n in zip(cu[:-1].tolist(), lens):
        expect_first += [len(expect_row)] * n
        for j in range(-(-n // spec.BS)):
            expect_row.append(start + j * spec.BS)
            expect_end.append(start + n)
    nb = len(expect_row)
    assert table.row_block.tolist() == expect_first
    assert table.key_row.numel() >= nb
    assert table.key_row[:nb].tolist() == expect_row and table.row_end[:nb].tolist() == expect_end
    assert (table.key_row[nb:] == expect_row[-1]).all() and (table.row_end[nb:] == expect_end[-1]).all()


def test_block_table_dense_batch():
    """Without cu_seqlens, batch b's block j is b * ceil(T / BS) + j, at key row b * T + j * BS."""
    from nsa_gen.ops import selection as sel
    spec = make_spec("G4")  # BS = 32
    B, T = 3, 70
    table = sel.block_table(spec, B, T, None, "cpu")
    nj = 3
    assert table.row_block.tolist() == [b * nj for b in range(B) for _ in range(T)]
    assert table.key_row.tolist() == [b * T + j * spec.BS for b in range(B) for j in range(nj)]
    assert table.row_end.tolist() == [b * T + T for b in range(B) for _ in range(nj)]


@pytest.mark.parametrize("lens,B,rows", [
    ([200], 1, (0, 200)), ([1] * 40 + [33, 70], 1, (0, 143)), ([31, 1, 64, 2, 97], 1, (64, 195)),
    ([150, 130], 1, (0, 280)), ([90], 3, (0, 270)), ([90], 3, (64, 192))])
@pytest.mark.parametrize("seg", [4, 16])
@pytest.mark.parametrize("forced", [0, 64])
@pytest.mark.parametrize("keys", ["int16", "int32"])
def test_query_lists_cover_every_pair_once(lens, B, rows, seg, forced, keys, poison, monkeypatch):
    """The query-batched forward's block lists (the list kernels), sized without reading the
    GPU: the segment table holds every (token, slot) pair of rows r0 .. r1 - 1 exactly once
    (with FORCED, every pair but the forced blocks'), at most `seg` a segment, tokens
    ascending, each in the right kv head, block and sequence; the rows past the real
    segments are empty. Packed sequences (lens) or B of T rows; keys: the sort's key type
    (int32 from 32k bins on)."""
    from nsa_gen.kernels import kernel_module
    from nsa_gen.ops import selection as sel
    if keys == "int32":
        monkeypatch.setattr(sel, "KEY_TYPES", sel.KEY_TYPES[1:])
    spec = make_spec("G4")  # BS = 32, S = 4
    T = sum(lens)
    packed = len(lens) > 1
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    g = torch.Generator().manual_seed(seg + len(lens))
    starts = sel.seq_start(cu, 1, T, "cpu") if packed else None
    table = sel.block_table(spec, 1, T, cu, "cpu") if packed else None
    raw = torch.randint(-1, 7, (B, T, spec.H, spec.S), generator=g, dtype=torch.int32)
    idx = sel.visible_blocks(raw, spec, starts)
    mod = kernel_module("selection_fwd", spec, variant(spec, seg, forced=forced))
    entries, segs = sel._query_lists(mod, idx, spec, T, table, starts, rows, seg)
    (r0, r1), HS = rows, spec.H * spec.S
    assert entries.shape == ((r1 - r0) * HS,)
    assert entries.dtype == torch.int32
    assert torch.equal(entries.sort().values, torch.arange(entries.numel(), dtype=torch.int32))
    n_tok = segs[:, 3]
    assert (n_tok >= 0).all() and int(n_tok.max()) <= seg
    real = segs[n_tok > 0]
    assert (segs[real.shape[0]:, 3] == 0).all()  # the real segments first
    covered = torch.cat([entries[int(s[2]): int(s[2]) + int(s[3])] for s in real]
                        + [entries[:0]]).long()
    row = torch.arange(B * T)
    row0 = starts.long() if packed else row - row % T
    flat = idx.reshape(B * T, spec.H, spec.S).long()
    own = ((row - row0) // spec.BS)[:, None, None]
    keep = flat >= 0
    if forced:
        keep &= (flat >= spec.initial_blocks) & (flat <= own - spec.local_blocks)
    assert torch.equal(covered.sort().values, keep[r0:r1].reshape(-1).nonzero().squeeze(1))
    end = cu[torch.searchsorted(cu, row, right=True)].long() if packed else row0 + T
    for s in real:
        e = entries[int(s[2]): int(s[2]) + int(s[3])].long()
        rows_e, h, slot = r0 + e // HS, (e // spec.S) % spec.H, e % spec.S
        assert (h == s[0]).all() and (rows_e[1:] > rows_e[:-1]).all() and s[4] == 0
        blocks = flat[rows_e, h, slot]
        assert (row0[rows_e] + blocks * spec.BS == s[1]).all()  # the segment's block
        assert (end[rows_e] == s[5]).all()  # and its sequence's end


@pytest.mark.parametrize("rows,chunk,want", [(16384, 16128, [(0, 16384)]),
                                             (65536, 16128, [(0, 16128), (16128, 32256),
                                                             (32256, 48384), (48384, 65536)]),
                                             (300, 64, [(0, 64), (64, 128), (128, 192),
                                                        (192, 256), (256, 300)]),
                                             (40, 64, [(0, 40)])])
def test_query_chunks_fold_a_short_tail(rows, chunk, want, monkeypatch):
    """Row chunks of query_chunk_rows each; a last one under 1/8 of that joins the one
    before (at small-group, 16k: 16128 + 256 rows became one chunk)."""
    from nsa_gen.ops import selection as sel
    monkeypatch.setattr(sel, "query_chunk_rows", lambda spec, size: chunk)
    assert sel.query_chunks(make_spec("G4"), rows, 2) == want


def test_ahead_builds_in_line_off_the_gpu():
    """Off CUDA (and with overlap=False) each build runs when its turn comes, in order."""
    from nsa_gen.ops.common import ahead
    calls = []

    def build(i):
        calls.append(i)
        return (torch.full((2,), i),)
    for overlap in (True, False):
        calls.clear()
        it = ahead(build, [3, 1, 2], torch.device("cpu"), overlap=overlap)
        assert calls == []
        got = [next(it)[0][0].item()]
        assert calls == [3]
        got += [x[0][0].item() for x in it]
        assert got == [3, 1, 2] and calls == [3, 1, 2]


class _FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits {other.name}")

    def wait_event(self, ev):
        self.log.append(f"{self.name} waits {ev.name}")


@pytest.fixture
def fake_streams(monkeypatch):
    """torch.cuda's streams and events faked (no GPU here), for the stream protocol of
    `ahead`: returns (log, on), `on()` the stream launches go to now."""
    from contextlib import contextmanager
    from nsa_gen.ops import common
    log, current = [], []
    main, side = _FakeStream("main", log), _FakeStream("side", log)

    class Event:
        n = 0

        def __init__(self):
            Event.n += 1
            self.name = f"ev{Event.n}"

        def record(self, stream):
            log.append(f"{stream.name} records {self.name}")

    @contextmanager
    def on(stream):
        current.append(stream.name)
        yield
        current.pop()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(common, "_side_stream", lambda device: side)
    return log, lambda: current[-1] if current else "main"


def test_ahead_on_cuda_enqueues_every_build_on_the_side_stream(fake_streams, monkeypatch):
    """The stream protocol of `ahead` (the GPU A/B, benchmarks/ahead_ab.py, checks the
    outputs bit for bit): the side stream first waits for the work queued so far; every
    build runs under it at the call, each followed by its event; the current stream waits
    for build i's event alone, just before i is yielded, and marks its tensors as used
    there; leaving early makes the current stream wait for the whole side stream."""
    from nsa_gen.ops import common
    log, on = fake_streams
    monkeypatch.setattr(torch.Tensor, "record_stream",
                        lambda self, s: log.append(f"t{int(self)} used on {s.name}"))

    def build(i):
        log.append(f"build {i} on {on()}")
        return (torch.tensor(i),)
    it = common.ahead(build, [0, 1, 2], torch.device("cuda"))
    assert log == ["side waits main", "build 0 on side", "side records ev1",
                   "build 1 on side", "side records ev2", "build 2 on side", "side records ev3"]
    log.clear()
    assert int(next(it)[0]) == 0
    assert log == ["main waits ev1", "t0 used on main"]
    log.clear()
    assert int(next(it)[0]) == 1
    assert log == ["main waits ev2", "t1 used on main"]
    log.clear()
    it.close()
    assert log == ["main waits side"]
    log.clear()
    assert [int(x[0]) for x in common.ahead(build, [5], torch.device("cuda"), overlap=False)] == [5]
    assert log == ["build 5 on main"]


def test_ahead_after_a_mark_and_plain_values(fake_streams):
    """With after=mark(...), the side stream waits for that event only (work queued after the
    mark, such as the backward's dq kernel, runs beside the build); plain values in a build's
    result are handed over as they are."""
    from nsa_gen.ops import common
    log, on = fake_streams
    ready = common.mark(torch.device("cuda"))
    log.append("dq on main")

    def build(_):
        log.append(f"invert on {on()}")
        return (7,)
    (n,), = common.ahead(build, [None], torch.device("cuda"), after=ready)
    assert n == 7
    assert log == ["main records ev1", "dq on main", "side waits ev1", "invert on side",
                   "side records ev2", "main waits ev2", "main waits side"]
    assert common.mark(torch.device("cpu")) is None
