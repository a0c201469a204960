"""The public NSA op: all three branches, gated, with configs from the dispatcher."""
from __future__ import annotations

from typing import Callable

import torch

from .config import Config
from .db.dispatch import default_dispatcher
from .ops.common import check, check_tensor, mark
from .ops.compression import CompressionFunction, compress_mean, compression_fwd
from .ops.decode import NSACache, decode_attend, decode_select, decode_topn
from .ops.gate import GateFunction
from .ops.selection import SelectionFunction, selection_fwd, topn
from .ops.window import WindowFunction
from .spec import BRANCHES, NSASpec, load_spec

KV = tuple[torch.Tensor, torch.Tensor]


def _configs(spec: NSASpec, T: int, B: int, dispatcher) -> Callable[[str], Config]:
    dispatcher = dispatcher or default_dispatcher()
    return lambda stem: dispatcher.get(stem, spec, T, B)


def _checked_gates(spec: NSASpec, q: torch.Tensor, *gs: torch.Tensor | None) -> dict:
    """{branch: gate or None} of (g_cmp, g_slc, g_swa), each [*q.shape[:2], HQ] like q and of
    a branch the spec has; at least one given."""
    gates = dict(zip(BRANCHES, gs))
    for name, g in gates.items():
        if g is not None:
            check(spec.has(name), f"g_{name} given but the spec has no '{name}' branch")
            check_tensor(f"g_{name}", g, (*q.shape[:2], spec.HQ), like=q)
    check(any(g is not None for g in gates.values()), "no gate given: every branch is off")
    return gates


def compress(x: torch.Tensor, spec: NSASpec, mlp: torch.nn.Module | None = None,
             cu_seqlens: torch.Tensor | None = None, config: Config | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """phi over blocks of l tokens every d tokens: x [B, T, H, D] -> ([B, NC, H, D],
    cu_seqlens of the compressed sequence or None). `mean` pools (the compress_mean kernel,
    with `config` or its heuristic); `mlp` applies `mlp` to each block [..., l, D] (a
    `naive.CompressionMLP`, or any module of that shape)."""
    if spec.phi == "mean":
        return compress_mean(x, spec, config, cu_seqlens)
    check(mlp is not None, "spec has phi = mlp: pass the compression MLPs (mlp_k, mlp_v)")
    from .ops.common import cmp_seqlens
    p = next(mlp.parameters(), None)
    dtype = p.dtype if p is not None else x.dtype

    def phi(seq):  # seq [B, n, H, D] -> [B, NC, H, D]; unfold gives [B, NC, H, D, l]
        if seq.shape[1] < spec.l:
            return x.new_zeros(x.shape[0], 0, x.shape[2], x.shape[3])
        return mlp(seq.unfold(1, spec.l, spec.d).transpose(-1, -2).to(dtype)).to(x.dtype)

    if cu_seqlens is None:
        return phi(x), None
    cu = cu_seqlens.tolist()
    out = torch.cat([phi(x[:, a:b]) for a, b in zip(cu[:-1], cu[1:])], 1)
    return out, cmp_seqlens(cu_seqlens, spec.l, spec.d).to(cu_seqlens.device)


def nsa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g_cmp: torch.Tensor | None = None,
        g_slc: torch.Tensor | None = None, g_swa: torch.Tensor | None = None, *,
        spec: NSASpec | str, kv_cmp: KV | None = None, kv_slc: KV | None = None,
        kv_swa: KV | None = None, mlp_k: torch.nn.Module | None = None,
        mlp_v: torch.nn.Module | None = None, cu_seqlens: torch.Tensor | None = None,
        dispatcher=None, return_aux: bool = False):
    """Native Sparse Attention.

    q [B, T, HQ, DK]; k [B, T, H, DK], v [B, T, H, DV] shared by the branches unless a
    branch has its own pair in kv_cmp / kv_slc / kv_swa. Gates g_* [B, T, HQ] (e.g.
    sigmoid of a linear layer); a branch whose gate is None is skipped, but the selection
    branch still runs the compressed attention to score blocks. spec: an NSASpec or a
    built-in name. cu_seqlens (int32 [N+1]) packs N sequences with B = 1. mlp_k / mlp_v:
    the compression MLPs when spec.phi == "mlp". Returns o [B, T, HQ, DV] in q's dtype;
    with return_aux, also a dict of the branch outputs and the selected block indices.
    """
    spec = load_spec(spec) if isinstance(spec, str) else spec
    check_tensor("q", q, (None, None, spec.HQ, spec.DK))
    B, T = q.shape[:2]
    gates = _checked_gates(spec, q, g_cmp, g_slc, g_swa)
    pairs = {"cmp": kv_cmp or (k, v), "slc": kv_slc or (k, v), "swa": kv_swa or (k, v)}
    for name, (kk, vv) in pairs.items():
        check_tensor(f"k ({name})", kk, (B, T, spec.H, spec.DK), like=q)
        check_tensor(f"v ({name})", vv, (B, T, spec.H, spec.DV), like=q)
    config = _configs(spec, T, B, dispatcher)
    # Without autograd (inference), the selected kernel (the group-centric one, or the
    # query-batched one's combine) stores the gated sum itself, which saves the gate's pass
    # over every branch output (0.5-1 ms at 64k, H200).
    params = [p for m in (mlp_k, mlp_v) if m is not None for p in m.parameters()]
    leaves = [q, *(t for kv in pairs.values() for t in kv), *(g for g in gates.values() if g is not None),
              *params]
    fused = (g_slc is not None and not return_aux
             and not (torch.is_grad_enabled() and any(t.requires_grad for t in leaves)))

    aux: dict = {}
    outs: dict[str, torch.Tensor] = {}

    if g_cmp is not None or g_slc is not None:
        phi = config("compress_mean") if spec.phi == "mean" else None
        k_cmp, cu_cmp = compress(pairs["cmp"][0], spec, mlp_k, cu_seqlens, phi)
        v_cmp, _ = compress(pairs["cmp"][1], spec, mlp_v, cu_seqlens, phi)
        if fused:  # o_cmp may stay in the pieces cuDNN wrote (config CUDNN), which the gated
            # selected kernel reads as they are
            o_cmp, lse_cmp = compression_fwd(q, k_cmp, v_cmp, spec, config("compression_fwd"),
                                             cu_seqlens, cu_cmp, pieces=True)
        else:
            o_cmp, lse_cmp = CompressionFunction.apply(q, k_cmp, v_cmp, spec, config("compression_fwd"),
                                                       config("compression_bwd"), cu_seqlens, cu_cmp)
        aux.update(o_cmp=o_cmp, lse_cmp=lse_cmp, k_cmp=k_cmp, v_cmp=v_cmp)
        if g_cmp is not None:
            outs["cmp"] = o_cmp

    def window() -> None:
        outs["swa"] = aux["o_swa"] = WindowFunction.apply(q, *pairs["swa"], spec, config("window_fwd"),
                                                          config("window_bwd"), cu_seqlens)
    # The fused selected kernel reads o_swa, so the window goes before it (after top-n, so
    # that the query-batched kernel's block lists, built on a side stream from top-n's
    # output on, run beside it); otherwise last, so that o_swa is not held while the
    # query-batched selection keeps its partials (with the gate fused, the query-batched
    # forward holds both: peak memory is still linear in T).
    if g_slc is not None:
        # Block choice is discrete: no gradient flows through the indices (as in the paper).
        idx = topn(q.detach(), k_cmp.detach(), lse_cmp, spec, config("topn"), cu_seqlens=cu_seqlens)
        aux["indices"] = idx
        if fused:
            ready = mark(q.device)
            if g_swa is not None:
                window()
            # topn's lists are canonical and hold every forced block. The gated kernel has
            # its own tuning key (selection_fwd's entry where it has none).
            return selection_fwd(q, *pairs["slc"], idx, spec, config("selection_fwd_gated"),
                                 cu_seqlens, canonical=True, forced_listed=True,
                                 gates={b: gates[b] for b in (*outs, "slc")}, outs=outs,
                                 after=ready)[0]
        o_slc = SelectionFunction.apply(q, *pairs["slc"], idx, spec, config("selection_fwd"),
                                        config("selection_bwd"), cu_seqlens, True, True)
        aux["o_slc"] = o_slc
        outs["slc"] = o_slc
    if g_swa is not None and not fused:
        window()
    # One fused pass: reads each branch output and gate once, writes o once.
    names = tuple(b for b in BRANCHES if b in outs)
    o = GateFunction.apply(spec, config("gate_fwd"), names,
                           *(t for b in names for t in (outs[b], gates[b])))
    o = o.to(q.dtype)
    return (o, aux) if return_aux else o


def nsa_decode(q: torch.Tensor, cache: NSACache, g_cmp: torch.Tensor | None = None,
               g_slc: torch.Tensor | None = None, g_swa: torch.Tensor | None = None, *,
               dispatcher=None, return_aux: bool = False):
    """Native Sparse Attention for decode: the newest Sq tokens of each sequence against
    `cache`, which already holds them (`NSACache.append` first).

    q [B, Sq, HQ, DK], of the cache's dtype and device; gates g_* [B, Sq, HQ] as in `nsa`
    (a branch whose gate is None is skipped). Token i of sequence b sits at position
    cache.lengths[b] - Sq + i. Configs come from the dispatcher at T = cache.max_len and
    B = batch * Sq. Returns o [B, Sq, HQ, DV] in q's dtype; with return_aux also a dict with
    the chosen block indices ("indices", int32 [B, Sq, H, S]) when the selection runs.
    Inference only: nothing here is differentiable.
    """
    check(isinstance(cache, NSACache), "cache must be an NSACache")
    spec = cache.spec
    check_tensor("q", q, (cache.B, None, spec.HQ, spec.DK), like=cache.k_cmp)
    B, Sq = q.shape[:2]
    check(1 <= Sq <= cache.max_len, f"Sq = {Sq}: decode takes 1 to max_len new tokens")
    gates = _checked_gates(spec, q, g_cmp, g_slc, g_swa)
    dispatcher = dispatcher or default_dispatcher()
    N = B * Sq
    q2 = q.reshape(N, spec.HQ, spec.DK).contiguous()
    aux: dict = {}
    parts = idx = None
    with torch.no_grad():
        if g_cmp is not None or g_slc is not None:
            cfg = dispatcher.get("decode_select", spec, cache.max_len, N)
            *parts, gp = decode_select(q2, cache, Sq, cfg)
            if g_slc is not None:
                idx = decode_topn(gp, cache, Sq, cfg)
                aux["indices"] = idx.view(B, Sq, spec.H, spec.S)
        on = {b: g.reshape(N, spec.HQ).contiguous() for b, g in gates.items() if g is not None}
        o = decode_attend(q2, cache, Sq, idx, parts, on,
                          dispatcher.get("decode_attend", spec, cache.max_len, N))
    o = o.view(B, Sq, spec.HQ, spec.DV)
    return (o, aux) if return_aux else o


class DecodeGraph:
    """One decode step, `cache.append` then `nsa_decode`, captured in a CUDA graph and
    replayed: a step's five kernels and the append's small ops launch as one graph, without
    the 0.2-0.7 ms of host time an eager step costs (RESULTS run 36).

    step = DecodeGraph(cache, Sq=1, gates=("cmp", "slc", "swa"))
    o = step(q, k, v, g_cmp, g_slc, g_swa)   # as cache.append(k, v); nsa_decode(q, cache, ...)

    q [B, Sq, HQ, DK], k [B, Sq, H, DK], v [B, Sq, H, DV] (with per_branch_kv, k and v are
    dicts branch -> tensor for the cache's pairs), gates [B, Sq, HQ] for the branches named
    in `gates` (fixed at capture). Inputs are copied into the graph's buffers; the returned
    o [B, Sq, HQ, DV] is the graph's own buffer, overwritten by the next step (clone it to
    keep it). Configs are looked up once, at capture. Needs a CUDA device. The warm-up runs
    before the capture leave the cache as it was (lengths restored; rows past them are
    rewritten by the next appends). Without the copies: write the inputs into the buffers
    `q`, `k[pair]`, `v[pair]` (pair "shared", or the branch with per_branch_kv) and
    `g[branch]`, then call `replay()`.
    """

    def __init__(self, cache: NSACache, Sq: int = 1, gates: tuple[str, ...] = BRANCHES,
                 dispatcher=None, warmup: int = 2):
        check(cache.device.type == "cuda", "DecodeGraph needs a cache on a CUDA device")
        spec = cache.spec
        self.cache, self.Sq, self.gates = cache, Sq, tuple(b for b in BRANCHES if b in gates)
        check(len(self.gates) > 0, "no gate named: every branch is off")
        for b in self.gates:
            check(spec.has(b), f"gate '{b}' named but the spec has no '{b}' branch")
        dev, dt, B = cache.device, cache.dtype, cache.B
        self.q = torch.zeros(B, Sq, spec.HQ, spec.DK, device=dev, dtype=dt)
        pairs = cache.pairs if cache.per_branch_kv else ("shared",)
        self.k = {b: torch.zeros(B, Sq, spec.H, spec.DK, device=dev, dtype=dt) for b in pairs}
        self.v = {b: torch.zeros(B, Sq, spec.H, spec.DV, device=dev, dtype=dt) for b in pairs}
        self.g = {b: torch.zeros(B, Sq, spec.HQ, device=dev, dtype=dt) for b in self.gates}
        self.dispatcher = dispatcher or default_dispatcher()
        saved = cache.lengths.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream, as capture needs
            for _ in range(warmup):
                self._step()
                cache.lengths.copy_(saved)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.o = self._step()

    def _step(self) -> torch.Tensor:
        if self.cache.per_branch_kv:
            self.cache.append(**{f"kv_{b}": (self.k[b], self.v[b]) for b in self.k})
        else:
            self.cache.append(self.k["shared"], self.v["shared"])
        g = [self.g.get(b) for b in BRANCHES]
        return nsa_decode(self.q, self.cache, *g, dispatcher=self.dispatcher)

    def __call__(self, q: torch.Tensor, k, v, g_cmp: torch.Tensor | None = None,
                 g_slc: torch.Tensor | None = None, g_swa: torch.Tensor | None = None) -> torch.Tensor:
        ks = k if isinstance(k, dict) else {"shared": k}
        vs = v if isinstance(v, dict) else {"shared": v}
        check(set(ks) == set(self.k) and set(vs) == set(self.v),
              f"k and v must be {'dicts of the pairs ' + str(sorted(self.k)) if self.cache.per_branch_kv else 'tensors'}")
        given = {"cmp": g_cmp, "slc": g_slc, "swa": g_swa}
        for b in BRANCHES:
            check((given[b] is not None) == (b in self.g),
                  f"g_{b} must {'be given' if b in self.g else 'be None'}: the graph was captured "
                  f"with gates {self.gates}")
        for name, src, dst in [("q", q, self.q), *(("k", ks[b], self.k[b]) for b in ks),
                               *(("v", vs[b], self.v[b]) for b in vs),
                               *((f"g_{b}", given[b], self.g[b]) for b in self.g)]:
            check_tensor(name, src, tuple(dst.shape), like=dst)
            dst.copy_(src)
        return self.replay()

    def replay(self) -> torch.Tensor:
        """One step on what the input buffers hold; returns the output buffer."""
        self.graph.replay()
        return self.o


class NativeSparseAttention(torch.nn.Module):
    """NSA attention layer built from a spec: x [B, T, hidden] -> [B, T, hidden].

    q/k/v/o projections; gates g = sigmoid(gate(x)) per branch and query head (`gate` is a
    Linear, or a two-layer MLP with `gate_hidden`); phi's MLPs when spec.phi == "mlp";
    with `per_branch_kv`, each branch gets its own k/v projections (the paper's design).
    Positional encoding is the caller's: pass `rope`, a function (q [B, T, HQ, DK],
    k [B, T, heads, DK], cu_seqlens) -> (q, k), e.g. rotary embeddings applied per position
    (restart positions at each sequence start when cu_seqlens packs sequences). It is
    called once per forward, on the keys of every branch (heads = H, or H per branch with
    per_branch_kv), before compression, as position is part of a key.
    """

    def __init__(self, spec: NSASpec | str, hidden_size: int, *, per_branch_kv: bool = False,
                 gate_hidden: int | None = None, bias: bool = False, device=None, dtype=None):
        super().__init__()
        from .naive import CompressionMLP
        self.spec = spec = load_spec(spec) if isinstance(spec, str) else spec
        self.hidden_size = hidden_size
        self.per_branch_kv = per_branch_kv
        kw = dict(bias=bias, device=device, dtype=dtype)
        n_kv = len(spec.branches) if per_branch_kv else 1
        self.q_proj = torch.nn.Linear(hidden_size, spec.HQ * spec.DK, **kw)
        self.k_proj = torch.nn.Linear(hidden_size, n_kv * spec.H * spec.DK, **kw)
        self.v_proj = torch.nn.Linear(hidden_size, n_kv * spec.H * spec.DV, **kw)
        self.o_proj = torch.nn.Linear(spec.HQ * spec.DV, hidden_size, **kw)
        n_gate = len(spec.branches) * spec.HQ
        if gate_hidden:
            self.gate = torch.nn.Sequential(torch.nn.Linear(hidden_size, gate_hidden, **kw),
                                            torch.nn.SiLU(),
                                            torch.nn.Linear(gate_hidden, n_gate, **kw))
        else:
            self.gate = torch.nn.Linear(hidden_size, n_gate, **kw)
        self.mlp_k = self.mlp_v = None
        if spec.phi == "mlp":
            # fp32: phi runs in PyTorch on fp32 blocks (see api.compress).
            self.mlp_k = CompressionMLP(spec.l, spec.DK).to(device=device)
            self.mlp_v = CompressionMLP(spec.l, spec.DV).to(device=device)

    def new_cache(self, batch: int, max_len: int, *, device=None, dtype=None) -> NSACache:
        """An empty `NSACache` for this layer's spec, branch pairs and phi."""
        p = self.q_proj.weight
        return NSACache(self.spec, batch, max_len, device=device or p.device,
                        dtype=dtype or p.dtype, per_branch_kv=self.per_branch_kv,
                        mlp_k=self.mlp_k, mlp_v=self.mlp_v)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, rope=None,
                attention=None, cache: NSACache | None = None) -> torch.Tensor:
        """x [B, T, hidden]; cu_seqlens packs sequences (B = 1). `attention` replaces the op
        (same signature as `nsa`), e.g. `naive.naive_nsa`-based reference runs.
        cache (`new_cache`): decode. The T new tokens' keys and values are appended to it
        and the tokens attend to everything cached (`nsa_decode`); rope then gets the
        positions as a third argument, int32 [B, T], instead of cu_seqlens."""
        spec = self.spec
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, spec.HQ, spec.DK)
        n_kv = len(spec.branches) if self.per_branch_kv else 1
        # Every branch's keys in one [B, T, n_kv * H, DK] tensor: one rope call rotates q once.
        k = self.k_proj(x).view(B, T, n_kv * spec.H, spec.DK)
        if cache is not None:
            check(cu_seqlens is None, "decode with a cache takes a plain batch, not cu_seqlens")
            if rope is not None:
                pos = cache.lengths[:, None] + torch.arange(T, device=x.device, dtype=torch.int32)
                q, k = rope(q, k, pos)
        elif rope is not None:
            q, k = rope(q, k, cu_seqlens)
        ks = k.view(B, T, n_kv, spec.H, spec.DK).unbind(2)
        vs = self.v_proj(x).view(B, T, n_kv, spec.H, spec.DV).unbind(2)
        g = torch.sigmoid(self.gate(x)).view(B, T, len(spec.branches), spec.HQ).unbind(2)
        gates = dict(zip(spec.branches, g))
        kv = {}
        if self.per_branch_kv:
            kv = {f"kv_{b}": (ks[i], vs[i]) for i, b in enumerate(spec.branches)}
        if cache is not None:
            if self.per_branch_kv and "kv_cmp" not in kv and "cmp" in cache.pairs:
                kv["kv_cmp"] = (ks[0], vs[0])  # as nsa() scores without a compressed pair
            cache.append(ks[0], vs[0], **kv)
            o = nsa_decode(q.to(cache.dtype), cache, *(gates.get(b) for b in BRANCHES))
            return self.o_proj(o.reshape(B, T, spec.HQ * spec.DV).to(x.dtype))
        op = attention or nsa
        o = op(q, ks[0], vs[0], gates.get("cmp"), gates.get("slc"), gates.get("swa"), spec=spec,
               mlp_k=self.mlp_k, mlp_v=self.mlp_v, cu_seqlens=cu_seqlens, **kv)
        return self.o_proj(o.reshape(B, T, spec.HQ * spec.DV).to(x.dtype))


def reference_nsa(q, k, v, g_cmp=None, g_slc=None, g_swa=None, *, spec, **kwargs):
    """`naive.naive_nsa` with `nsa`'s signature (fp32 result cast to q's dtype): the
    reference a `NativeSparseAttention` can run with, for checks and training comparisons."""
    from .naive import naive_nsa
    spec = load_spec(spec) if isinstance(spec, str) else spec
    kwargs.pop("dispatcher", None)
    # The reference computes in fp32 also inside an autocast region.
    with torch.autocast(q.device.type, enabled=False):
        return naive_nsa(spec, q, k, v, g_cmp, g_slc, g_swa, **kwargs).to(q.dtype)
