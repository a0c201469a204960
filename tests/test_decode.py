"""Decode (nsa_decode, NSACache, the decode_select and decode_attend kernels) against
naive_decode: the forward pass's rows of the newest tokens, at their absolute positions."""
import pytest
import torch

from conftest import DEVICE, TOL, rel_err, shrink
from nsa_gen import naive
from nsa_gen.api import DecodeGraph, NativeSparseAttention, nsa_decode
from nsa_gen.config import Config
from nsa_gen.db.dispatch import Dispatcher
from nsa_gen.harness import chosen_score_error, decode_lengths, make_case
from nsa_gen.kernels import kernel_def
from nsa_gen.ops import decode

SMALL = dict(head_dim={"k": 48, "v": 16}, compression={"block": 16, "stride": 8},
             selection={"block": 16, "top_n": 4, "initial_blocks": 1, "local_blocks": 1}, window=24)
SPECS = {  # G in {1, 4, 16}, DK != DV, l = 2 d (overlapping blocks) and l = l' = d
    1: shrink("mqa", heads={"q": 2, "kv": 2}, **SMALL),
    4: shrink("small-group", heads={"q": 8, "kv": 2}, **SMALL),
    16: shrink("fla-compat", heads={"q": 16, "kv": 1}, head_dim={"k": 32, "v": 48},
               compression={"block": 16, "stride": 16},
               selection={"block": 16, "top_n": 4, "initial_blocks": 1, "local_blocks": 2}),
}


def rnd(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)


def f32(x):
    return None if x is None else x.float()


def gates_for(spec, g, B, Sq, dtype):
    return [torch.rand(B, Sq, spec.HQ, generator=g).to(dtype=dtype, device=DEVICE)
            if spec.has(b) else None for b in ("cmp", "slc", "swa")]


def filled(spec, B, T, lengths, Sq, dtype, seed, **cache_kw):
    """A cache of B sequences filled to `lengths`: the prompts (all but the last Sq tokens,
    padded) in one append, then the last Sq tokens in another; and the full k, v."""
    g = torch.Generator().manual_seed(seed)
    k, v = rnd(g, B, T, spec.H, spec.DK, dtype=dtype), rnd(g, B, T, spec.H, spec.DV, dtype=dtype)
    cache = decode.NSACache(spec, B, T, device=DEVICE, dtype=dtype, **cache_kw)
    lens = torch.tensor(lengths, device=DEVICE)
    cache.append(k, v, n_new=lens - Sq)
    rows = (lens - Sq)[:, None] + torch.arange(Sq, device=DEVICE)
    b = torch.arange(B, device=DEVICE)[:, None]
    cache.append(k[b, rows], v[b, rows])
    return cache, k, v, g


@pytest.mark.parametrize("G", [1, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Sq", [1, 3])
def test_decode_matches_reference(G, dtype, Sq, poison):
    """Ragged caches, one shorter than a compressed block (no block visible yet)."""
    spec = SPECS[G]
    B, T = 3, 97
    lengths = [97, 40, spec.l - 1 + Sq - 1]
    cache, k, v, g = filled(spec, B, T, lengths, Sq, dtype, seed=G + Sq)
    assert cache.lengths.tolist() == lengths
    q = rnd(g, B, Sq, spec.HQ, spec.DK, dtype=dtype)
    gates = gates_for(spec, g, B, Sq, dtype)
    o, aux = nsa_decode(q, cache, *gates, return_aux=True)
    assert o.shape == (B, Sq, spec.HQ, spec.DV) and o.dtype == dtype
    ref, raux = naive.naive_decode(spec, q.float(), k.float(), v.float(), lengths,
                                   *map(f32, gates), return_aux=True)
    # Top-n by the scores of the chosen blocks (near-ties), per sequence (NS differs).
    for b in range(B):
        assert chosen_score_error(aux["indices"][b:b + 1], raux["indices"][b:b + 1],
                                  raux["scores"][b]) < TOL[dtype]
    # The rest on the op's own blocks.
    ref = naive.naive_decode(spec, q.float(), k.float(), v.float(), lengths,
                             *map(f32, gates), indices=aux["indices"])
    assert rel_err(o, ref) < TOL[dtype]


@pytest.mark.parametrize("branches", [("cmp",), ("slc",), ("swa",), ("cmp", "swa")])
def test_decode_each_branch_alone(branches, poison):
    spec = SPECS[4]
    B, T, Sq = 2, 80, 1
    cache, k, v, g = filled(spec, B, T, [80, 51], Sq, torch.float32, seed=3)
    q = rnd(g, B, Sq, spec.HQ, spec.DK)
    gates = [rnd(g, B, Sq, spec.HQ).sigmoid() if b in branches else None
             for b in ("cmp", "slc", "swa")]
    o = nsa_decode(q, cache, *gates)
    ref = naive.naive_decode(spec, q, k, v, [80, 51], *gates)
    assert rel_err(o, ref) < 1e-4


def test_decode_spec_without_branches(poison):
    """A window-only spec keeps no compressed cache; a spec without a window skips it."""
    for branches in (["swa"], ["cmp", "slc"]):
        spec = SPECS[4].replace(branches=branches)
        cache, k, v, g = filled(spec, 2, 70, [70, 33], 1, torch.float32, seed=4)
        assert set(cache.pairs) == ({"swa"} if branches == ["swa"] else {"cmp", "slc"})
        q = rnd(g, 2, 1, spec.HQ, spec.DK)
        gates = gates_for(spec, g, 2, 1, torch.float32)
        o = nsa_decode(q, cache, *gates)
        assert rel_err(o, naive.naive_decode(spec, q, k, v, [70, 33], *gates)) < 1e-4


def test_decode_splits(poison):
    """Several splits of each kind: compressed blocks (SPLIT_C 64 over 74 blocks, tiles of
    16 and 32), selected blocks (one a split) and the window (64 keys a split of w = 150)."""
    spec = SPECS[4].replace(window=150)
    B, T, Sq = 2, 600, 1
    cache, k, v, g = filled(spec, B, T, [600, 431], Sq, torch.float32, seed=5)
    q = rnd(g, B, Sq, spec.HQ, spec.DK)
    gates = gates_for(spec, g, B, Sq, torch.float32)
    o_ref, aux = nsa_decode(q, cache, *gates, return_aux=True)
    ref = naive.naive_decode(spec, q, k, v, [600, 431], *gates, indices=aux["indices"])
    assert rel_err(o_ref, ref) < 1e-4
    for sel, att in ((dict(BLOCK_C=16, SPLIT_C=64), dict(BLOCK_N=16, SLOTS=1, W_SPLIT=64)),
                     (dict(BLOCK_C=32, SPLIT_C=1024), dict(BLOCK_N=16, SLOTS=8, W_SPLIT=512))):
        disp = _fixed({"decode_select": kernel_def("decode_select").default(spec, T).replace(**sel),
                       "decode_attend": kernel_def("decode_attend").default(spec, T).replace(**att)})
        o, aux2 = nsa_decode(q, cache, *gates, dispatcher=disp, return_aux=True)
        assert torch.equal(aux2["indices"], aux["indices"])
        assert rel_err(o, ref) < 1e-4


def test_decode_key_tiles_within_blocks(poison):
    """Selection blocks of 32 keys read in tiles of 16 (two a block) and of 32."""
    spec = SPECS[4].replace(selection={"block": 32, "top_n": 3, "initial_blocks": 1,
                                       "local_blocks": 1})
    B, T, Sq = 2, 150, 1
    cache, k, v, g = filled(spec, B, T, [150, 77], Sq, torch.float32, seed=9)
    q = rnd(g, B, Sq, spec.HQ, spec.DK)
    gates = gates_for(spec, g, B, Sq, torch.float32)
    for block_n in (16, 32):
        disp = _fixed({"decode_select": kernel_def("decode_select").default(spec, T),
                       "decode_attend": kernel_def("decode_attend").default(spec, T).replace(
                           BLOCK_N=block_n, SLOTS=1)})
        o, aux = nsa_decode(q, cache, *gates, dispatcher=disp, return_aux=True)
        ref = naive.naive_decode(spec, q, k, v, [150, 77], *gates, indices=aux["indices"])
        assert rel_err(o, ref) < 1e-4


@pytest.mark.parametrize("G", [4, 16])
def test_decode_topn_exact_ties(G, poison):
    """Small-integer group sums (exact in fp32, many ties) at positions on and off block
    edges: the same indices as naive_topn over Eq. 9's scores, ties to the lower block."""
    spec = SPECS[G]
    T = 200
    nc = naive.num_cmp_blocks(T, spec.l, spec.d)
    pos = torch.tensor([0, spec.l - 1, spec.BS, 77, 150, T - 1], dtype=torch.int32)
    g = torch.Generator().manual_seed(10)
    gp = torch.randint(0, 3, (len(pos), spec.H, nc + 1), generator=g).float()
    for n, t in enumerate(pos.tolist()):  # blocks a token does not see score 0
        gp[n, :, naive.num_cmp_blocks(t + 1, spec.l, spec.d):] = 0
    cache = decode.NSACache(spec, len(pos), T, device=DEVICE, dtype=torch.float32)
    cache.lengths.copy_(pos + 1)  # one new token a sequence, at pos
    idx = decode.decode_topn(gp.to(DEVICE), cache, 1)
    NS = -(-T // spec.BS)
    W = naive.overlap_weights(spec.l, spec.d, spec.BS, nc, NS)
    for n, t in enumerate(pos.tolist()):
        scores = torch.zeros(1, t + 1, spec.H, NS)
        scores[0, t] = gp[n, :, :nc] @ W
        want = naive.naive_topn(scores, spec.BS, spec.S, spec.initial_blocks, spec.local_blocks)
        assert torch.equal(idx[n].cpu(), want[0, t]), (t, idx[n], want[0, t])


class _fixed(Dispatcher):
    """A dispatcher that hands out the given configs."""

    def __init__(self, configs: dict[str, Config]):
        super().__init__(read_env=False, shipped=False)
        self.configs = configs

    def get(self, stem, spec, T, B=1, device=None):
        return self.configs[stem]


def test_cache_forms_compressed_blocks(poison):
    """After a padded prompt append and appends of 1, 5 and 17 tokens (blocks completed in
    between and several at once), every complete block is phi of its tokens."""
    spec = SPECS[4]
    B, T = 3, 120
    g = torch.Generator().manual_seed(6)
    k, v = rnd(g, B, T, spec.H, spec.DK), rnd(g, B, T, spec.H, spec.DV)
    cache = decode.NSACache(spec, B, T, device=DEVICE, dtype=torch.float32)
    lens = torch.tensor([30, 7, 0])
    cache.append(k, v, n_new=lens)
    for n in (1, 5, 17):
        rows = lens[:, None] + torch.arange(n)
        cache.append(k[torch.arange(B)[:, None], rows], v[torch.arange(B)[:, None], rows])
        lens = lens + n
        assert cache.lengths.tolist() == lens.tolist()
        for b in range(B):
            n_cmp = naive.num_cmp_blocks(int(lens[b]), spec.l, spec.d)
            want = naive.naive_compress(k[b:b + 1, :int(lens[b])], spec.l, spec.d)
            assert torch.allclose(cache.k_cmp[b:b + 1, :n_cmp], want, atol=1e-6)
            want = naive.naive_compress(v[b:b + 1, :int(lens[b])], spec.l, spec.d)
            assert torch.allclose(cache.v_cmp[b:b + 1, :n_cmp], want, atol=1e-6)
            assert torch.equal(cache.kv["slc"][0][b, :int(lens[b])], k[b, :int(lens[b])])


def test_decode_per_branch_kv_and_mlp(poison):
    """Each branch its own pair, and phi = mlp (the cache forms blocks with the modules)."""
    spec = SPECS[4].replace(compression={"block": 16, "stride": 8, "phi": "mlp"})
    B, T, Sq = 2, 64, 2
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    mlp_k = naive.CompressionMLP(spec.l, spec.DK)
    mlp_v = naive.CompressionMLP(spec.l, spec.DV)
    pairs = {b: (rnd(g, B, T, spec.H, spec.DK), rnd(g, B, T, spec.H, spec.DV))
             for b in ("cmp", "slc", "swa")}
    cache = decode.NSACache(spec, B, T, device=DEVICE, dtype=torch.float32, per_branch_kv=True,
                            mlp_k=mlp_k, mlp_v=mlp_v)
    lens = [64, 45]
    cache.append(kv_cmp=pairs["cmp"], kv_slc=pairs["slc"], kv_swa=pairs["swa"],
                 n_new=torch.tensor(lens))
    q = rnd(g, B, Sq, spec.HQ, spec.DK)
    gates = gates_for(spec, g, B, Sq, torch.float32)
    with torch.no_grad():
        o, aux = nsa_decode(q, cache, *gates, return_aux=True)
        ref = naive.naive_decode(spec, q, *pairs["slc"], lens, *gates, kv_cmp=pairs["cmp"],
                                 kv_swa=pairs["swa"], mlp_k=mlp_k, mlp_v=mlp_v,
                                 indices=aux["indices"])
    assert rel_err(o, ref) < 1e-4
    with pytest.raises(ValueError, match="kv_swa pair"):
        cache.append(kv_cmp=pairs["cmp"], kv_slc=pairs["slc"])


def test_module_decode_matches_forward(poison):
    """NativeSparseAttention: a prompt and then tokens one by one through a cache give the
    rows of one forward over the whole sequence."""
    torch.manual_seed(8)
    spec = SPECS[16]
    layer = NativeSparseAttention(spec, 24, per_branch_kv=True).to(DEVICE)
    B, T, P = 2, 40, 33
    x = torch.randn(B, T, 24, device=DEVICE)
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(B, T)
        outs = [layer(x[:, :P], cache=cache)]
        outs += [layer(x[:, t:t + 1], cache=cache) for t in range(P, T)]
    assert rel_err(torch.cat(outs, 1), full) < 1e-4


def test_decode_bad_inputs():
    spec = SPECS[4]
    cache = decode.NSACache(spec, 2, 50, device=DEVICE, dtype=torch.float32)
    k, v = torch.randn(2, 3, spec.H, spec.DK), torch.randn(2, 3, spec.H, spec.DV)
    cache.append(k, v)
    q = torch.randn(2, 1, spec.HQ, spec.DK)
    g = torch.rand(2, 1, spec.HQ)
    with pytest.raises(ValueError, match="no gate"):
        nsa_decode(q, cache)
    with pytest.raises(ValueError, match="q has shape"):
        nsa_decode(torch.randn(3, 1, spec.HQ, spec.DK), cache, g)
    with pytest.raises(TypeError, match="dtype"):
        nsa_decode(q.half(), cache, g)
    with pytest.raises(ValueError, match="g_slc has shape"):
        nsa_decode(q, cache, g, torch.rand(2, 2, spec.HQ))
    with pytest.raises(ValueError, match="no 'swa' branch"):
        nsa_decode(q, decode.NSACache(spec.replace(branches=["cmp"]), 2, 50, device=DEVICE,
                                      dtype=torch.float32), None, None, g)
    with pytest.raises(ValueError, match="k \\(cmp\\) has shape"):
        cache.append(k[:, :, :1], v)
    with pytest.raises(TypeError, match="dtype"):
        cache.append(k.half(), v.half())
    with pytest.raises(ValueError, match="must be >= 1"):
        decode.NSACache(spec, 0, 10, device=DEVICE)


@pytest.mark.parametrize("stem", ["decode_select", "decode_attend", "nsa_decode"])
def test_harness_cases(stem, poison):
    """The cases `nsa-gen verify` and the tuner's gate run: pass, and fail on a wrong output."""
    spec = SPECS[16]
    case = make_case(stem, spec, 70, B=2, dtype=torch.float32)
    out = case.run()
    assert case.rel_error(out) < case.tolerance
    bad = (out[0] * 1.1, *out[1:])  # o, or decode_select's unnormalised P.V
    assert case.rel_error(bad) > case.tolerance
    assert decode_lengths(3, 100) == [100, 74, 48]


def test_cache_stops_at_max_len():
    """Tokens past max_len are dropped: lengths stop there (nothing is read back to the host
    to report it), and no kernel reads past the cache."""
    spec = SPECS[4]
    cache = decode.NSACache(spec, 2, 40, device=DEVICE, dtype=torch.float32)
    k, v = torch.randn(2, 30, spec.H, spec.DK), torch.randn(2, 30, spec.H, spec.DV)
    cache.append(k, v)
    cache.append(k, v, n_new=torch.tensor([5, 30]))
    assert cache.lengths.tolist() == [35, 40]
    assert torch.equal(cache.kv["slc"][0][1, 30:40], k[1, :10])


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_decode_graph_matches_eager():
    """DecodeGraph (append + nsa_decode replayed from a CUDA graph) gives the eager steps'
    outputs, step after step, across compressed-block boundaries."""
    spec = SPECS[16]
    B, T, P = 3, 200, 57
    g = torch.Generator().manual_seed(11)
    prompt = rnd(g, B, P, spec.H, spec.DK), rnd(g, B, P, spec.H, spec.DV)
    caches = [decode.NSACache(spec, B, T, device=DEVICE, dtype=torch.float32) for _ in range(2)]
    for c in caches:
        c.append(*prompt)
    step = DecodeGraph(caches[1], Sq=1, gates=("cmp", "slc"))
    assert caches[1].lengths.tolist() == [P] * B  # the warm-up left the cache as it was
    for _ in range(20):
        q, k, v = (rnd(g, B, 1, spec.HQ, spec.DK), rnd(g, B, 1, spec.H, spec.DK),
                   rnd(g, B, 1, spec.H, spec.DV))
        gates = gates_for(spec, g, B, 1, torch.float32)
        caches[0].append(k, v)
        want = nsa_decode(q, caches[0], *gates)
        got = step(q, k, v, *gates)
        assert torch.equal(caches[0].lengths, caches[1].lengths)
        assert rel_err(got, want) < 1e-5
    # The zero-copy way: inputs written into the graph's buffers.
    q, k, v = (rnd(g, B, 1, spec.HQ, spec.DK), rnd(g, B, 1, spec.H, spec.DK),
               rnd(g, B, 1, spec.H, spec.DV))
    caches[0].append(k, v)
    want = nsa_decode(q, caches[0], *gates)
    step.q.copy_(q), step.k["shared"].copy_(k), step.v["shared"].copy_(v)
    step.g["cmp"].copy_(gates[0]), step.g["slc"].copy_(gates[1])
    assert rel_err(step.replay(), want) < 1e-5
    with pytest.raises(ValueError, match="g_swa must be None"):
        step(q, k, v, *gates[:2], torch.rand(B, 1, spec.HQ, device=DEVICE))
