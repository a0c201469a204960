"""Per-kernel test cases: fresh random inputs, the launcher call, the fp32 reference and the
error between them. Shared by `nsa-gen verify`, the tuner's correctness gate and the tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from . import naive
from .config import Config
from .kernels import kernel_def, num_cmp_blocks
from .spec import BRANCHES, NSASpec

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def tolerance(dtype: torch.dtype, device: torch.device | str) -> float:
    """Relative-error bound: fp32 on the GPU runs tl.dot in tf32 (~3e-4 typical)."""
    on_gpu = torch.device(device).type == "cuda"
    return {torch.float32: 2e-3 if on_gpu else 1e-4, torch.float16: 1e-2,
            torch.bfloat16: 2e-2}[dtype]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64; NaN or unwritten (poisoned) elements give inf."""
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 0 else 1.0)


def worst_error(outs: tuple, refs: tuple) -> float:
    """The largest `rel_error` over paired outputs (e.g. dq, dk, dv)."""
    return max(rel_error(o, r) for o, r in zip(outs, refs))


@dataclass
class Case:
    """One kernel on one shape: `run(config)` launches it, `rel_error(outputs)` compares
    the outputs with the fp32 reference (computed once, lazily)."""

    stem: str
    spec: NSASpec
    B: int
    T: int
    dtype: torch.dtype
    device: torch.device
    inputs: dict
    _launch: Callable[[Config], tuple]
    _reference: Callable[[], tuple]
    _compare: Callable[[tuple, tuple], float]
    _ref: tuple | None = field(default=None, repr=False)

    @property
    def tolerance(self) -> float:
        return tolerance(self.dtype, self.device)

    def run(self, config: Config | None = None) -> tuple:
        if config is None and self.stem not in (OP, OP_VARLEN, OP_DECODE):
            config = kernel_def(self.stem).default(self.spec, self.T)
        return self._launch(config)

    def reference(self) -> tuple:
        if self._ref is None:
            self._ref = self._reference()
        return self._ref

    def rel_error(self, outputs: tuple) -> float:
        return self._compare(outputs, self.reference())


def _f32(*xs):
    return [x.float() for x in xs]


def _qkv(spec: NSASpec, B: int, T: int, dtype, device, gen) -> tuple:
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype=dtype)
    return rnd(B, T, spec.HQ, spec.DK), rnd(B, T, spec.H, spec.DK), rnd(B, T, spec.H, spec.DV)


def _random_indices(spec: NSASpec, B: int, T: int, device, gen) -> torch.Tensor:
    """Realistic block indices (forced blocks, -1 padding): the reference top-n of random
    scores, in topn's canonical form (ascending, each block once, -1 slots last). int32
    [B, T, H, S] on `device`."""
    rnd = torch.rand(B, T, spec.H, -(-T // spec.BS), generator=gen, device=device)
    idx = naive.naive_topn(rnd, spec.BS, spec.S, spec.initial_blocks, spec.local_blocks)
    return idx.to(device=device, dtype=torch.int32)


def _cmp_lse(q, k_cmp, spec: NSASpec) -> torch.Tensor:
    """Log-sum-exp of the compressed attention's logits (-inf where no block is visible)."""
    G, T, NC = spec.G, q.shape[1], k_cmp.shape[1]
    s = torch.einsum("bthd,bchd->bthc", q.float(), k_cmp.float().repeat_interleave(G, 2))
    vis = (torch.arange(NC, device=q.device) * spec.d + spec.l - 1)[None, :] <= \
        torch.arange(T, device=q.device)[:, None]
    s = (s * spec.softmax_scale).masked_fill(~vis[None, :, None, :], float("-inf"))
    return torch.logsumexp(s, -1)


def _scores_and_indices(spec: NSASpec, q, k) -> tuple[torch.Tensor, torch.Tensor]:
    k_cmp = naive.naive_compress(k.float(), spec.l, spec.d)
    v_dummy = k_cmp[..., :1].expand(*k_cmp.shape[:-1], 16)
    _, p = naive.naive_compressed_attention(q.float(), k_cmp, v_dummy, spec.l, spec.d,
                                            spec.softmax_scale)
    scores = naive.naive_group_scores(naive.naive_importance(p, spec.l, spec.d, spec.BS,
                                                             q.shape[1]), spec.H)
    return scores, naive.naive_topn(scores, spec.BS, spec.S, spec.initial_blocks,
                                    spec.local_blocks)


def chosen_score_error(idx: torch.Tensor, ref_idx: torch.Tensor, scores: torch.Tensor) -> float:
    """Top-n implementations may differ on near-ties; compare the scores they chose.
    Also any structural defect (bad order, out-of-range index, duplicate, wrong count of
    valid slots) makes the error inf."""
    idx, ref_idx, scores = idx.cpu().long(), ref_idx.cpu().long(), scores.cpu()
    valid = idx >= 0
    if (valid.sum(-1) != (ref_idx >= 0).sum(-1)).any():
        return float("inf")
    if (idx >= scores.shape[-1]).any() or (idx < -1).any():
        return float("inf")
    # ascending valid entries first, -1 last
    key = torch.where(valid, idx, torch.iinfo(torch.int64).max)
    if (key[..., 1:] < key[..., :-1]).any() or ((key[..., 1:] == key[..., :-1]) & valid[..., 1:]).any():
        return float("inf")

    def total(ix):
        g = torch.where(ix >= 0, ix, 0)
        return (scores.gather(-1, g) * (ix >= 0)).sum(-1)
    a, b = total(idx), total(ref_idx)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def make_case(stem: str, spec: NSASpec, T: int, *, B: int = 1, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu", seed: int = 0) -> Case:
    """A `Case` for kernel `stem` with fresh inputs drawn from `seed` (never zeros)."""
    from .ops import compression, selection, window  # noqa: F401 - launchers

    device = torch.device(device)
    # Drawn where they are used: on a GPU, drawing 64k-token inputs on the CPU took seconds
    # per tuning study. Same seed, same device type: same inputs.
    gen = torch.Generator(device=device).manual_seed(seed)
    if stem in ("decode_select", "decode_attend", OP_DECODE):
        # Queries of the new tokens only: [B, T, HQ, DK] would be 192 GiB in fp32 at B = 64,
        # T = 64k (deepseek-nsa), before the cast.
        return _decode_case(stem, spec, B, T, dtype, device, gen)
    q, k, v = _qkv(spec, B, T, dtype, device, gen)
    scale = spec.softmax_scale

    if stem == "selection_fwd":
        idx = _random_indices(spec, B, T, device, gen)
        # As nsa() runs it on topn's lists: canonical (no visible_blocks pass, which is not the
        # kernel's time: 1-8 ms at 64k) and holding every forced block.
        return Case(stem, spec, B, T, dtype, device, dict(q=q, k=k, v=v, block_indices=idx),
                    lambda c: selection.selection_fwd(q, k, v, idx, spec, c, canonical=True,
                                                      forced_listed=True),
                    lambda: (naive.naive_selection(*_f32(q, k, v), idx.long(), spec.BS, scale),),
                    lambda o, r: rel_error(o[0], r[0]))

    if stem == "selection_fwd_gated":
        return _gated_selection_case(spec, B, T, dtype, device, gen, q, k, v)

    if stem == "topn":
        k_cmp = naive.naive_compress(k.float(), spec.l, spec.d).to(dtype)
        if T <= 4096:
            lse = _cmp_lse(q, k_cmp, spec)
        else:  # the dense [T, NC] logits would not fit: take lse from the checked kernel
            v_cmp = naive.naive_compress(v.float(), spec.l, spec.d).to(dtype)
            lse = compression.compression_fwd(q, k_cmp, v_cmp, spec)[1]
        return Case(stem, spec, B, T, dtype, device, dict(q=q, k_cmp=k_cmp, lse=lse),
                    lambda c: (selection.topn(q, k_cmp, lse, spec, c),),
                    lambda: _scores_and_indices(spec, q.cpu(), k.cpu()),
                    lambda o, r: chosen_score_error(o[0], r[1], r[0]))

    if stem == "compress_mean":
        return _compress_mean_case(spec, B, T, dtype, device, k, v)

    if stem == "compression_fwd":
        k_cmp = naive.naive_compress(k.float(), spec.l, spec.d).to(dtype)
        v_cmp = naive.naive_compress(v.float(), spec.l, spec.d).to(dtype)
        # As nsa() without autograd runs it: with CUDNN = 1 at B = 1 the output stays in the
        # pieces cuDNN wrote (the tuner times what inference pays; autograd adds a copy).
        return Case(stem, spec, B, T, dtype, device, dict(q=q, k_cmp=k_cmp, v_cmp=v_cmp),
                    lambda c: compression.compression_fwd(q, k_cmp, v_cmp, spec, c, pieces=True),
                    lambda: naive.naive_compressed_attention(*_f32(q, k_cmp, v_cmp), spec.l,
                                                             spec.d, scale)[:1],
                    lambda o, r: rel_error(o[0].full() if isinstance(o[0], compression.RowPieces)
                                                 else o[0], r[0]))

    if stem == "window_fwd":
        return Case(stem, spec, B, T, dtype, device, dict(q=q, k=k, v=v),
                    lambda c: window.window_fwd(q, k, v, spec, c),
                    lambda: (naive.naive_window(*_f32(q, k, v), spec.w, scale),),
                    lambda o, r: rel_error(o[0], r[0]))

    if stem == "gate_fwd":
        return _gate_case(spec, B, T, dtype, device, gen)

    if stem.endswith("_bwd"):
        return _bwd_case(stem, spec, B, T, dtype, device, gen, q, k, v)

    if stem in (OP, OP_VARLEN):
        return _op_case(spec, B, T, dtype, device, gen, q, k, v, varlen=stem == OP_VARLEN)

    raise KeyError(f"no test case for kernel '{stem}'")


def _poison_on_change(*bufs: torch.Tensor) -> Callable[[Config], None]:
    """A hook for a case's launch: fills bufs with NaN whenever the config differs from the
    one it saw last, so an element a config never writes fails the comparison, also after
    another config filled the buffer correctly; repeated runs of one config (the tuner's timed
    runs) skip the fill, which would cost about as much as a streaming kernel's own store."""
    last: list = [object()]

    def poison(config: Config) -> None:
        if config != last[0]:
            for b in bufs:
                b.fill_(float("nan"))
            last[0] = config
    return poison


def _gated_selection_case(spec: NSASpec, B: int, T: int, dtype, device, gen, q, k, v) -> Case:
    """selection_fwd storing NSA's gated sum, as nsa() runs it without autograd: topn-form
    lists, a gate for each of the spec's branches, the other branches' outputs random
    normals (gates in (0, 1), as a sigmoid gives). Compared with the gated sum of
    naive_selection and those outputs."""
    from .ops import selection

    idx = _random_indices(spec, B, T, device, gen)
    shape = (B, T, spec.HQ)
    gates = {b: torch.rand(*shape, generator=gen, device=device).to(dtype=dtype)
             for b in spec.branches}
    outs = {b: torch.randn(*shape, spec.DV, generator=gen, device=device).to(dtype=dtype)
            for b in spec.branches if b != "slc"}

    def reference() -> tuple:
        o_slc = naive.naive_selection(*_f32(q, k, v), idx.long(), spec.BS, spec.softmax_scale)
        return (naive.naive_gate({"slc": o_slc, **{b: x.float() for b, x in outs.items()}},
                                 {b: g.float() for b, g in gates.items()}),)

    inputs = dict(q=q, k=k, v=v, block_indices=idx, **{f"o_{b}": x for b, x in outs.items()},
                  **{f"g_{b}": g for b, g in gates.items()})
    return Case("selection_fwd_gated", spec, B, T, dtype, device, inputs,
                lambda c: selection.selection_fwd(q, k, v, idx, spec, c, canonical=True,
                                                  forced_listed=True, gates=gates, outs=outs),
                reference, lambda o, r: rel_error(o[0], r[0]))


def _compress_mean_case(spec: NSASpec, B: int, T: int, dtype, device, k, v) -> Case:
    """compress_mean of k and of v (two launches, as nsa() makes them), into output buffers
    poisoned by _poison_on_change."""
    from .ops.compression import compress_mean

    NC = num_cmp_blocks(T, spec.l, spec.d)
    outs = [torch.empty(B, NC, spec.H, x.shape[-1], device=device, dtype=dtype) for x in (k, v)]
    poison = _poison_on_change(*outs)

    def launch(c: Config) -> tuple:
        poison(c)
        return tuple(compress_mean(x, spec, c, out=o)[0] for x, o in zip((k, v), outs))

    return Case("compress_mean", spec, B, T, dtype, device, dict(k=k, v=v), launch,
                lambda: (naive.naive_compress(k.float(), spec.l, spec.d),
                         naive.naive_compress(v.float(), spec.l, spec.d)),
                worst_error)


def _gate_case(spec: NSASpec, B: int, T: int, dtype, device, gen) -> Case:
    """gate_fwd over all of the spec's branches: random outputs (normals) and gates (in
    (0, 1), as a sigmoid gives), into an output buffer poisoned by _poison_on_change."""
    from .ops import gate

    shape = (B, T, spec.HQ, spec.DV)
    outs, gates = {}, {}
    for b in spec.branches:
        outs[b] = torch.randn(*shape, generator=gen, device=device).to(dtype=dtype)
        gates[b] = torch.rand(*shape[:3], generator=gen, device=device).to(dtype=dtype)
    out = torch.empty(shape, device=device, dtype=dtype)
    poison = _poison_on_change(out)

    def launch(c: Config) -> tuple:
        poison(c)
        return (gate.gate_fwd(outs, gates, spec, c, out=out),)

    inputs = {**{f"o_{b}": x for b, x in outs.items()}, **{f"g_{b}": g for b, g in gates.items()}}
    return Case("gate_fwd", spec, B, T, dtype, device, inputs, launch,
                lambda: (naive.naive_gate({b: x.float() for b, x in outs.items()},
                                          {b: g.float() for b, g in gates.items()}),),
                lambda o, r: rel_error(o[0], r[0]))


OP = "nsa"  # the composed op (all branches, gated), forward and backward
OP_VARLEN = "nsa_varlen"  # the same over packed sequences (cu_seqlens, B = 1)
OP_DECODE = "nsa_decode"  # decode against a cache filled by appends, all branches gated


def decode_lengths(B: int, T: int) -> list[int]:
    """Cache lengths of B decoding sequences with room for T tokens: T for the first, then
    shorter ones at odd places (about T - T * b / (B + 1) - b), all at least 2."""
    return [max(2, T - (T * b) // (B + 1) - b) for b in range(B)]


def _decode_case(stem: str, spec: NSASpec, B: int, T: int, dtype, device, gen) -> Case:
    """Decode of one token (two for OP_DECODE) per sequence against caches of
    `decode_lengths(B, T)` tokens, against naive_decode.
      decode_select: o_cmp (its splits merged by decode_attend's combine) and the top-n
        it leads to, checked by the scores of the chosen blocks (chosen_score_error);
      decode_attend: the selected and window branches, gated, on given indices (decode_topn
        of random group scores: forced blocks and -1 padding as topn makes them);
      OP_DECODE: nsa_decode end to end, the cache filled by a padded prompt append and
        then the new tokens' append; the reference attends to the op's blocks (near-ties)."""
    from .api import nsa_decode
    from .ops import decode

    Sq = 2 if stem == OP_DECODE else 1
    lengths = decode_lengths(B, T)
    lens = torch.tensor(lengths, device=device)

    def rnd(*shape):  # drawn in pieces: one fp32 draw of a whole 64k cache takes twice its size
        return torch.cat([torch.randn(1, *shape[1:], generator=gen, device=device).to(dtype=dtype)
                          for _ in range(shape[0])])
    k, v = rnd(B, T, spec.H, spec.DK), rnd(B, T, spec.H, spec.DV)
    q = rnd(B, Sq, spec.HQ, spec.DK)
    gates = {b: torch.rand(B, Sq, spec.HQ, generator=gen, device=device).to(dtype)
             for b in BRANCHES if spec.has(b)}
    cache = decode.NSACache(spec, B, T, device=device, dtype=dtype)
    if stem == OP_DECODE:
        cache.append(k, v, n_new=lens - Sq)  # the prompts, padded to T
        rows = (lens - Sq)[:, None] + torch.arange(Sq, device=device)
        b_idx = torch.arange(B, device=device)[:, None]
        cache.append(k[b_idx, rows], v[b_idx, rows])
    else:
        cache.append(k, v, n_new=lens)
    N, q2 = B * Sq, q.reshape(B * Sq, spec.HQ, spec.DK)
    inputs = dict(q=q, k=k, v=v)

    if stem == "decode_select":
        def o_cmp(out) -> torch.Tensor:
            ones = torch.ones(N, spec.HQ, device=device, dtype=dtype)
            return decode.decode_attend(q2, cache, Sq, None, out[:2], {"cmp": ones}).view(
                B, Sq, spec.HQ, spec.DV)

        def compare(out, ref) -> float:
            idx = decode.decode_topn(out[2], cache, Sq, cfg[0]).view(B, Sq, spec.H, spec.S)
            err = rel_error(o_cmp(out), ref[0])
            for b in range(B):  # each sequence has its own number of blocks
                err = max(err, chosen_score_error(idx[b:b + 1], ref[1][b:b + 1], ref[2][b]))
            return err

        def reference() -> tuple:
            ones = torch.ones(B, Sq, spec.HQ, device=device)
            _, aux = naive.naive_decode(spec, *_f32(q, k, v), lengths, ones,
                                        ones if spec.has("slc") else None, return_aux=True)
            return aux["o_cmp"], aux["indices"], aux["scores"]

        def compare_any(out, ref) -> float:
            return rel_error(o_cmp(out), ref[0]) if ref[1] is None else compare(out, ref)
        cfg = [None]  # the launch's config: the comparison runs decode_topn with it

        def launch(c):
            cfg[0] = c
            return decode.decode_select(q2, cache, Sq, c)
        return Case(stem, spec, B, T, dtype, device, inputs, launch, reference, compare_any)

    if stem == "decode_attend":
        idx = None
        if spec.has("slc"):
            n_cmp = cache.k_cmp.shape[1]
            gp = torch.rand(N, spec.H, n_cmp, generator=gen, device=device)
            idx = decode.decode_topn(gp, cache, Sq)
        on = {b: g.reshape(N, spec.HQ) for b, g in gates.items() if b != "cmp"}
        if not on:  # a compression-only spec: the combine alone, gating o_cmp's shares
            on = {"cmp": gates["cmp"].reshape(N, spec.HQ)}
        parts = decode.decode_select(q2, cache, Sq)[:2] if "cmp" in on else None

        def reference() -> tuple:
            g = {f"g_{b}": on[b].float().view(B, Sq, spec.HQ) if b in on else None
                 for b in BRANCHES}
            given = None if idx is None else idx.view(B, Sq, spec.H, spec.S)
            return (naive.naive_decode(spec, *_f32(q, k, v), lengths, **g, indices=given),)
        return Case(stem, spec, B, T, dtype, device, inputs,
                    lambda c: (decode.decode_attend(q2, cache, Sq, idx, parts, on, c)
                               .view(B, Sq, spec.HQ, spec.DV),),
                    reference, lambda o, r: rel_error(o[0], r[0]))

    g = [gates.get(b) for b in BRANCHES]

    def reference() -> tuple:
        idx = None
        if spec.has("slc"):
            idx = nsa_decode(q, cache, *g, return_aux=True)[1]["indices"]
        return (naive.naive_decode(spec, *_f32(q, k, v), lengths,
                                   *[None if x is None else x.float() for x in g], indices=idx),)
    return Case(stem, spec, B, T, dtype, device, inputs, lambda c: (nsa_decode(q, cache, *g),),
                reference, lambda o, r: rel_error(o[0], r[0]))


def varlen_offsets(T: int) -> list[int]:
    """cu_seqlens of three packed sequences filling T tokens, of uneven lengths (about 5/8,
    1/16 and the rest of T), so that blocks and windows meet sequence ends at odd places;
    one sequence when T < 3."""
    if T < 3:
        return [0, T]
    a = min(max(1, 5 * T // 8 + 3), T - 2)
    b = min(T - 1, a + max(1, T // 16))
    return [0, a, b, T]


def _op_case(spec, B, T, dtype, device, gen, q, k, v, varlen: bool = False) -> Case:
    """nsa() end to end: output (with autograd, and without), and the gradients of q, k, v
    and the gates, against autograd through naive_nsa. The configs come from the dispatcher
    (`run` ignores its argument). varlen: the B = 1 row holds the packed sequences of `varlen_offsets(T)`.
    The reference's selection branch attends to the blocks the op's top-n chose (the topn
    case checks that choice, by the scores it keeps): in 16-bit inputs near-ties of the
    scores pick other blocks than the fp32 reference for a share of tokens that grows with
    T (the gate gradient of the branch, dg_slc, reached 1.9e-2 to 2.2e-2 at 4k on an H200,
    RESULTS run 29), which is the scores' rounding, not an error of the other kernels."""
    from .api import nsa

    cu = None
    if varlen:
        if B != 1:
            raise ValueError(f"{OP_VARLEN} packs sequences into B = 1, got B = {B}")
        cu = torch.tensor(varlen_offsets(T), dtype=torch.int32, device=device)

    gates = [torch.rand(B, T, spec.HQ, generator=gen, device=device).to(dtype=dtype)
             if spec.has(b) else None for b in BRANCHES]
    do = torch.randn(B, T, spec.HQ, spec.DV, generator=gen, device=device).to(dtype=dtype)
    inputs = [q, k, v] + [g for g in gates if g is not None]

    def both(fn, cast, again: bool):
        leaves = [cast(x).detach().requires_grad_(True) for x in inputs]
        it = iter(leaves[3:])
        gl = [next(it) if g is not None else None for g in gates]
        out = fn(*leaves[:3], *gl)
        # Also the output without autograd, where nsa() may gate inside the selected kernel
        # (again=False: the reference computes it the same way, so `out` serves).
        infer = out.detach()
        if again:
            with torch.no_grad():
                infer = fn(*leaves[:3], *gl)
        return (out.detach(), infer, *torch.autograd.grad(out, leaves, cast(do)))

    def chosen() -> torch.Tensor | None:
        """The op's block indices on these inputs (topn is deterministic: the runs' own)."""
        if not spec.has("slc"):
            return None
        with torch.no_grad():
            return nsa(q, k, v, *gates, spec=spec, cu_seqlens=cu, return_aux=True)[1]["indices"]

    def reference() -> tuple:
        idx = chosen()
        return both(lambda *a: naive.naive_nsa(spec, *a, cu_seqlens=cu, indices=idx),
                    lambda x: x.float(), False)

    return Case(OP_VARLEN if varlen else OP, spec, B, T, dtype, device, dict(q=q, k=k, v=v),
                lambda c: both(lambda *a: nsa(*a, spec=spec, cu_seqlens=cu), lambda x: x, True),
                reference, worst_error)


def _grads(fn, inputs: list[torch.Tensor], do: torch.Tensor) -> tuple:
    """Autograd of the fp32 reference: d(inputs) for upstream gradient do."""
    leaves = [x.detach().float().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    return torch.autograd.grad(out, leaves, do.float())


def _bwd_case(stem, spec, B, T, dtype, device, gen, q, k, v) -> Case:
    """Backward kernels: the forward runs once (kernel), the case times and checks the
    backward launcher; the reference is autograd through naive.py."""
    from .ops import compression, selection, window  # noqa: F401 - launchers

    scale = spec.softmax_scale
    do = torch.randn(B, T, spec.HQ, spec.DV, generator=gen, device=device).to(dtype=dtype)

    if stem == "selection_bwd":
        idx = _random_indices(spec, B, T, device, gen)
        o, lse = selection.selection_fwd(q, k, v, idx, spec)
        return Case(stem, spec, B, T, dtype, device, dict(q=q, k=k, v=v, block_indices=idx, do=do),
                    lambda c: selection.selection_bwd(q, k, v, o, lse, do, idx, spec, c),
                    lambda: _grads(lambda a, b, c: naive.naive_selection(a, b, c, idx.long(), spec.BS, scale),
                                   [q, k, v], do), worst_error)

    if stem == "compression_bwd":
        k_cmp = naive.naive_compress(k.float(), spec.l, spec.d).to(dtype)
        v_cmp = naive.naive_compress(v.float(), spec.l, spec.d).to(dtype)
        o, lse = compression.compression_fwd(q, k_cmp, v_cmp, spec)
        return Case(stem, spec, B, T, dtype, device, dict(q=q, k_cmp=k_cmp, v_cmp=v_cmp, do=do),
                    lambda c: compression.compression_bwd(q, k_cmp, v_cmp, o, lse, do, spec, c),
                    lambda: _grads(lambda a, b, c: naive.naive_compressed_attention(
                        a, b, c, spec.l, spec.d, scale)[0], [q, k_cmp, v_cmp], do), worst_error)

    if stem == "window_bwd":
        o, lse = window.window_fwd(q, k, v, spec)
        return Case(stem, spec, B, T, dtype, device, dict(q=q, k=k, v=v, do=do),
                    lambda c: window.window_bwd(q, k, v, o, lse, do, spec, c),
                    lambda: _grads(lambda a, b, c: naive.naive_window(a, b, c, spec.w, scale),
                                   [q, k, v], do), worst_error)

    raise KeyError(f"no test case for kernel '{stem}'")
