"""Reference Native Sparse Attention in plain PyTorch, fp32.

This module is the executable form of `shared/NSA.md`: every kernel is checked
against it, so it favours being obviously right over being fast or lean. Inputs are
upcast to float32, masks are materialised as dense boolean tensors (O(T^2) memory),
and every function works on any device the inputs live on.

Vocabulary (see DESIGN.md): B batch, T tokens, HQ query heads, H key/value heads,
G = HQ // H group size (query head `hq` reads kv head `hq // G`), DK key dim, DV value
dim, l / d compression block / stride, BS selection block (the paper's l'), S blocks
selected per query (the paper's n), w sliding window, NC = (T - l) // d + 1 compressed
blocks (0 if T < l), NS = ceil(T / BS) selection blocks.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .spec import BRANCHES

__all__ = [
    "num_cmp_blocks",
    "num_slc_blocks",
    "overlap_weights",
    "CompressionMLP",
    "naive_compress",
    "naive_compressed_attention",
    "naive_importance",
    "naive_group_scores",
    "naive_topn",
    "naive_selection",
    "naive_window",
    "naive_gate",
    "naive_nsa",
    "naive_decode",
]



# ----------------------------------------------------------------------------- block counts


def num_cmp_blocks(T: int, l: int, d: int) -> int:  # noqa: E741 - the paper's name
    """Number of compressed blocks NC of a T-token sequence.

    Block `i` covers tokens `[i*d, i*d + l)`; only blocks lying wholly inside the
    sequence exist, so NC = (T - l) // d + 1 when T >= l, else 0.
    """
    return (T - l) // d + 1 if T >= l else 0


def num_slc_blocks(T: int, BS: int) -> int:
    """Number of selection blocks NS = ceil(T / BS); the last one may be partial."""
    return -(-T // BS)


def overlap_weights(l: int, d: int, BS: int, NC: int, NS: int) -> torch.Tensor:  # noqa: E741
    """Overlap matrix c(i, j) -> float32 [NC, NS] (on the CPU).

    c(i, j) is the number of stride-sized chunks (d tokens each) that compressed block
    `i` (tokens `[i*d, i*d + l)`) and selection block `j` (tokens `[j*BS, (j+1)*BS)`)
    have in common. For l=32, d=16, BS=64 the blocks i = 4j-1 .. 4j+3 get 1,2,2,2,1;
    for l = BS = d it is the identity. Requires d | l and d | BS (the spec enforces
    both), which makes every shared token range a whole number of chunks.
    """
    if l % d or BS % d:
        raise ValueError(f"overlap_weights needs d | l and d | BS (l={l}, d={d}, BS={BS})")
    i = torch.arange(NC)[:, None]
    j = torch.arange(NS)[None, :]
    shared_tokens = (torch.minimum(i * d + l, (j + 1) * BS) - torch.maximum(i * d, j * BS)).clamp(min=0)
    return (shared_tokens // d).to(torch.float32)


# ----------------------------------------------------------------------------- compression


class CompressionMLP(nn.Module):
    """phi = "mlp": learnable compression of one block of l tokens to one token.

    `pos_emb` [l, D] is a learnable intra-block position embedding (initialised small
    and random, so that blocks that are permutations of each other differ from the
    start); it is added to the block, which is then flattened and mapped
    Linear(l*D -> hidden) -> GELU -> Linear(hidden -> D). hidden defaults to D.

    forward(blocks [..., l, D]) -> [..., D]. The reference feeds it float32 blocks, so
    keep the module in float32 when calling the naive functions.
    """

    def __init__(self, l: int, D: int, hidden: int | None = None):  # noqa: E741
        super().__init__()
        self.l, self.D = l, D
        hidden = hidden or D
        self.pos_emb = nn.Parameter(0.02 * torch.randn(l, D))
        self.mlp = nn.Sequential(nn.Linear(l * D, hidden), nn.GELU(), nn.Linear(hidden, D))

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        if blocks.shape[-2:] != (self.l, self.D):
            raise ValueError(f"CompressionMLP expects [..., {self.l}, {self.D}] blocks, "
                             f"got {tuple(blocks.shape)}")
        return self.mlp((blocks + self.pos_emb).flatten(-2))


def naive_compress(x: torch.Tensor, l: int, d: int, phi: str = "mean",  # noqa: E741
                   mlp: nn.Module | None = None) -> torch.Tensor:
    """Compress keys or values: x [B, T, H, D] -> [B, NC, H, D] float32.

    Block `i` is `x[:, i*d : i*d + l]`; phi="mean" averages its l tokens, phi="mlp"
    applies `mlp` (a CompressionMLP, required) to it laid out as [B, NC, H, l, D].
    NC = 0 (T < l) gives an empty [B, 0, H, D] tensor.
    """
    x = x.float()
    B, T, H, D = x.shape
    NC = num_cmp_blocks(T, l, d)
    if NC == 0:
        return x.new_zeros(B, 0, H, D)
    # unfold windows the token axis: [B, NC, H, D, l], window position last.
    blocks = x.unfold(1, l, d)
    assert blocks.shape[1] == NC
    if phi == "mean":
        return blocks.mean(dim=-1)
    if phi == "mlp":
        if mlp is None:
            raise ValueError("phi='mlp' needs the CompressionMLP module (mlp=...)")
        return mlp(blocks.transpose(-1, -2))
    raise ValueError(f"unknown phi {phi!r} (expected 'mean' or 'mlp')")


# ----------------------------------------------------------------------------- attention core


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int]:
    """Validate GQA shapes; returns (H, G)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B, T, heads, dim]")
    HQ, H = q.shape[2], k.shape[2]
    if v.shape[2] != H or k.shape[:2] != v.shape[:2] or q.shape[0] != k.shape[0]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} disagree with each other or q")
    if HQ % H:
        raise ValueError(f"HQ={HQ} is not a multiple of H={H}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k head dims differ ({q.shape[3]} vs {k.shape[3]})")
    return H, HQ // H


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked GQA softmax attention.

    q [B, Tq, HQ, DK], k [B, N, H, DK], v [B, N, H, DV], mask bool broadcastable to
    [B, H, Tq, N] (True = may attend; per kv head, so dim 1 is H or 1).
    Returns o [B, Tq, HQ, DV] and p [B, HQ, Tq, N]. A query row with nothing to attend
    gets p = 0 and o = 0: the spec asks for zeros there, never NaN.
    """
    H, G = _check_qkv(q, k, v)
    q, k, v = q.float(), k.float(), v.float()
    # Expanding kv heads with repeat_interleave realises "query head hq reads kv head hq // G".
    k = k.repeat_interleave(G, dim=2)
    v = v.repeat_interleave(G, dim=2)
    if mask.dim() == 4 and mask.shape[1] == H and G > 1:
        mask = mask.repeat_interleave(G, dim=1)
    logits = torch.einsum("bthd,bnhd->bhtn", q, k) * scale
    mask = mask.expand_as(logits)
    any_visible = mask.any(dim=-1, keepdim=True)
    # Rows with no visible key would be softmax(all -inf) = NaN, and NaN leaks into
    # gradients even through torch.where; give them finite logits and zero p afterwards.
    logits = logits.masked_fill(~mask, float("-inf")).masked_fill(~any_visible, 0.0)
    p = torch.softmax(logits, dim=-1) * mask
    o = torch.einsum("bhtn,bnhd->bthd", p, v)
    return o, p


def _scale(scale: float | None, DK: int) -> float:
    return DK ** -0.5 if scale is None else float(scale)


def naive_compressed_attention(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
                               l: int, d: int, scale: float | None = None,  # noqa: E741
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over compressed blocks.

    q [B, T, HQ, DK], k_cmp [B, NC, H, DK], v_cmp [B, NC, H, DV] ->
    (o [B, T, HQ, DV], p_cmp [B, T, HQ, NC]), float32. scale defaults to DK ** -0.5.

    Query t sees block i iff the whole block is at or before it: i*d + l - 1 <= t.
    A query seeing no block (t < l - 1) gets o = 0 and an all-zero p_cmp row.
    """
    B, T, HQ, DK = q.shape
    NC = k_cmp.shape[1]
    t = torch.arange(T, device=q.device)[:, None]
    i = torch.arange(NC, device=q.device)[None, :]
    visible = (i * d + l - 1 <= t)[None, None]  # [1, 1, T, NC]
    o, p = _attend(q, k_cmp, v_cmp, visible, _scale(scale, DK))
    return o, p.permute(0, 2, 1, 3)


# ----------------------------------------------------------------------------- selection


def naive_importance(p_cmp: torch.Tensor, l: int, d: int, BS: int, T: int) -> torch.Tensor:  # noqa: E741
    """Selection-block importance (overlap-weighted Eq. 9 of the paper).

    p_cmp [B, T, HQ, NC] -> p_slc [B, T, HQ, NS] float32, NS = ceil(T / BS):
    p_slc[t, h, j] = sum_i p_cmp[t, h, i] * c(i, j), c = overlap_weights(l, d, BS, NC, NS).
    """
    NC = p_cmp.shape[-1]
    W = overlap_weights(l, d, BS, NC, num_slc_blocks(T, BS)).to(p_cmp.device)
    return p_cmp.float() @ W


def naive_group_scores(p_slc: torch.Tensor, H: int) -> torch.Tensor:
    """Group-shared block scores (Eq. 10): p_slc [B, T, HQ, NS] -> [B, T, H, NS].

    Sums the G = HQ // H query heads of each group (heads of a group are contiguous),
    so every head of a group selects the same blocks.
    """
    B, T, HQ, NS = p_slc.shape
    if HQ % H:
        raise ValueError(f"HQ={HQ} is not a multiple of H={H}")
    return p_slc.float().reshape(B, T, H, HQ // H, NS).sum(dim=3)


def naive_topn(scores: torch.Tensor, BS: int, S: int, initial_blocks: int = 1,
               local_blocks: int = 2) -> torch.Tensor:
    """Choose S selection blocks per query and kv head.

    scores [B, T, H, NS] -> indices int32 [B, T, H, S].

    Candidates of query t: blocks j with j*BS <= t. Forced (when candidates, and
    counting toward S): j < initial_blocks, and the local_blocks blocks ending at the
    block holding t, j in [t//BS - local_blocks + 1, t//BS]. The remaining slots go to
    the highest-scoring other candidates, ties to the lower block index. With fewer
    than S candidates the unused slots hold -1. Indices are sorted ascending with -1
    slots last, so the block holding t is the last valid index (when local_blocks >= 1).
    Requires S >= initial_blocks + local_blocks (as the spec does), otherwise the
    forced blocks could not all fit.
    """
    if S < initial_blocks + local_blocks:
        raise ValueError(f"S={S} < initial_blocks + local_blocks = {initial_blocks + local_blocks}")
    B, T, H, NS = scores.shape
    device = scores.device
    t = torch.arange(T, device=device)[:, None]
    # Pad with never-candidate columns so that there are always at least S to take.
    NSP = max(NS, S)
    j = torch.arange(NSP, device=device)[None, :]
    cur = t // BS
    candidate = (j <= cur) & (j < NS)  # [T, NSP]; j <= t // BS  <=>  j*BS <= t
    forced = candidate & ((j < initial_blocks) | (j > cur - local_blocks))
    key = F.pad(scores.float(), (0, NSP - NS))
    key = key.masked_fill(forced[None, :, None, :], float("inf"))
    key = key.masked_fill(~candidate[None, :, None, :], float("-inf"))
    # A stable descending sort keeps equal keys in index order: ties go to the lower block.
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :S]
    valid = candidate[None, :, None, :].expand(B, T, H, NSP).gather(-1, order)
    # NSP sorts after every real block index, so the -1 slots end up last.
    chosen = torch.where(valid, order, NSP).sort(dim=-1).values
    return torch.where(chosen == NSP, -1, chosen).to(torch.int32)


def naive_selection(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                    BS: int, scale: float | None = None) -> torch.Tensor:
    """Attention over the tokens of the selected blocks.

    q [B, T, HQ, DK], k [B, T, H, DK], v [B, T, H, DV], indices [B, T, H, S] (block
    indices, -1 = unused slot) -> o [B, T, HQ, DV] float32. scale defaults to DK ** -0.5.

    Query t, head hq attends to the tokens s <= t of the blocks indices[t, hq // G]. A
    block listed twice is attended once (the index list is a set). A query left with
    no token gets o = 0.
    """
    B, T, HQ, DK = q.shape
    H = k.shape[2]
    NS = num_slc_blocks(T, BS)
    if indices.shape[:3] != (B, T, H):
        raise ValueError(f"indices {tuple(indices.shape)} must be [B, T, H, S] = [{B}, {T}, {H}, S]")
    idx = indices.long()
    if idx.numel() and (idx.max() >= NS or idx.min() < -1):
        raise ValueError(f"indices must be in [-1, {NS}) for T={T}, BS={BS}")
    # One-hot of the chosen blocks; -1 slots are routed into a spare column and dropped.
    chosen = torch.zeros(B, T, H, NS + 1, dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, torch.where(idx < 0, NS, idx), True)
    chosen = chosen[..., :NS]
    s = torch.arange(T, device=q.device)
    in_chosen_block = chosen[..., s // BS]  # [B, T, H, T_key]
    causal = s[None, :] <= s[:, None]  # [T, T_key]
    mask = (in_chosen_block & causal[None, :, None, :]).permute(0, 2, 1, 3)  # [B, H, T, T_key]
    o, _ = _attend(q, k, v, mask, _scale(scale, DK))
    return o


def naive_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: int,
                 scale: float | None = None) -> torch.Tensor:
    """Sliding-window attention: q [B, T, HQ, DK], k [B, T, H, DK], v [B, T, H, DV] ->
    o [B, T, HQ, DV] float32; query t attends to tokens max(0, t - w + 1) .. t.
    scale defaults to DK ** -0.5.
    """
    if w < 1:
        raise ValueError(f"window w must be >= 1, got {w}")
    T = q.shape[1]
    s = torch.arange(T, device=q.device)
    delta = s[:, None] - s[None, :]  # query minus key position
    mask = ((delta >= 0) & (delta < w))[None, None]
    o, _ = _attend(q, k, v, mask, _scale(scale, q.shape[-1]))
    return o


# ----------------------------------------------------------------------------- gated sum


def naive_gate(outs: dict[str, torch.Tensor], gates: dict[str, torch.Tensor]) -> torch.Tensor:
    """NSA's output: o = sum over branches of gates[b][..., None] * outs[b], in fp32.

    outs: branch name (cmp, slc, swa) -> [B, T, HQ, DV]; gates: the same names -> [B, T, HQ].
    Summed in the order cmp, slc, swa. Returns o [B, T, HQ, DV] float32.
    """
    if set(outs) != set(gates) or not outs or not set(outs) <= set(BRANCHES):
        raise ValueError(f"outs and gates must name the same branches ({', '.join(BRANCHES)}), "
                         f"at least one; got {sorted(outs)} and {sorted(gates)}")
    o = None
    for b in (b for b in BRANCHES if b in outs):
        term = gates[b].float()[..., None] * outs[b].float()
        o = term if o is None else o + term
    return o


# ----------------------------------------------------------------------------- full NSA


def _nsa_dense(spec: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               gates: dict[str, torch.Tensor | None], kvs: dict[str, tuple | None],
               mlp_k: nn.Module | None, mlp_v: nn.Module | None,
               indices: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """naive_nsa for a padded batch [B, T, ...]: every sequence starts at position 0."""
    B, T = q.shape[:2]
    scale = spec.softmax_scale
    branch_kv = {b: (kvs[b] if kvs[b] is not None else (k, v)) for b in BRANCHES}
    aux: dict[str, Any] = dict.fromkeys(
        ("o_cmp", "o_slc", "o_swa", "p_cmp", "scores", "indices", "k_cmp", "v_cmp"))

    # Selection scores come from the compressed attention, so it runs whenever
    # either branch is on, even if the compression output itself is gated off.
    if gates["cmp"] is not None or gates["slc"] is not None:
        kc, vc = branch_kv["cmp"]
        mk, mv = (mlp_k, mlp_v) if spec.phi == "mlp" else (None, None)
        if spec.phi == "mlp" and (mk is None or mv is None):
            raise ValueError("spec.phi is 'mlp': pass mlp_k and mlp_v (CompressionMLP modules)")
        aux["k_cmp"] = naive_compress(kc, spec.l, spec.d, spec.phi, mk)
        aux["v_cmp"] = naive_compress(vc, spec.l, spec.d, spec.phi, mv)
        aux["o_cmp"], aux["p_cmp"] = naive_compressed_attention(
            q, aux["k_cmp"], aux["v_cmp"], spec.l, spec.d, scale)

    if gates["slc"] is not None:
        p_slc = naive_importance(aux["p_cmp"], spec.l, spec.d, spec.BS, T)
        aux["scores"] = naive_group_scores(p_slc, spec.H)
        aux["indices"] = indices.long() if indices is not None else naive_topn(
            aux["scores"], spec.BS, spec.S, spec.initial_blocks, spec.local_blocks)
        ks, vs = branch_kv["slc"]
        aux["o_slc"] = naive_selection(q, ks, vs, aux["indices"], spec.BS, scale)

    if gates["swa"] is not None:
        kw, vw = branch_kv["swa"]
        aux["o_swa"] = naive_window(q, kw, vw, spec.w, scale)

    on = [b for b in BRANCHES if gates[b] is not None]
    if not on:
        return q.new_zeros(B, T, spec.HQ, spec.DV, dtype=torch.float32), aux
    return naive_gate({b: aux[f"o_{b}"] for b in on}, {b: gates[b] for b in on}), aux


def naive_nsa(spec: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              g_cmp: torch.Tensor | None = None, g_slc: torch.Tensor | None = None,
              g_swa: torch.Tensor | None = None, *,
              kv_cmp: tuple[torch.Tensor, torch.Tensor] | None = None,
              kv_slc: tuple[torch.Tensor, torch.Tensor] | None = None,
              kv_swa: tuple[torch.Tensor, torch.Tensor] | None = None,
              mlp_k: nn.Module | None = None, mlp_v: nn.Module | None = None,
              cu_seqlens: torch.Tensor | Sequence[int] | None = None,
              indices: torch.Tensor | None = None, return_aux: bool = False):
    """Full NSA forward, fp32: o = sum over branches of gate[..., None] * o_branch.

    spec: an NSASpec (reads HQ, H, DK, DV, l, d, BS, S, w, phi, initial_blocks,
    local_blocks, softmax_scale, has()). q [B, T, HQ, DK], k [B, T, H, DK],
    v [B, T, H, DV]. Gates g_cmp / g_slc / g_swa are [B, T, HQ]; a branch whose gate is
    None is skipped; a gate for a branch the spec does not have is an error.
    kv_cmp / kv_slc / kv_swa: optional (k, v) pairs, shaped like k and v, replacing the
    shared pair for that branch. The selection branch's scores come from the
    compressed attention over the compression branch's k/v (kv_cmp if given),
    compressed with spec.phi; phi="mlp" needs mlp_k (DK) and mlp_v (DV) CompressionMLPs.

    cu_seqlens: int [N + 1] offsets of N packed sequences (B must be 1); each sequence
    is run on its own with positions from its start, so no block crosses a boundary.
    indices: block indices [B, T, H, S] (relative to each sequence's start, -1 = empty) the
    selection branch attends to instead of its own top-n, e.g. a kernel's choice, so the
    rest of the layer can be compared without the blocks that near-ties of the scores
    choose differently (NSA.md: test selection by its scores, the rest given indices).

    Returns o [B, T, HQ, DV] float32, or (o, aux) with return_aux=True. aux holds
    o_cmp, o_slc, o_swa ([B, T, HQ, DV]), indices (int32 [B, T, H, S], block indices
    relative to the sequence start), p_cmp ([B, T, HQ, NC]), scores (group scores
    [B, T, H, NS]), k_cmp ([B, NC, H, DK]) and v_cmp ([B, NC, H, DV]). An entry is None
    when nothing computed it (o_cmp / p_cmp / k_cmp / v_cmp exist whenever cmp or slc
    is on). With cu_seqlens, the per-token tensors o_* and indices are concatenated
    along T like o, while p_cmp, scores, k_cmp, v_cmp (whose NC / NS differ per
    sequence) are lists with one [1, ...] tensor per sequence.
    """
    gates = {"cmp": g_cmp, "slc": g_slc, "swa": g_swa}
    kvs = {"cmp": kv_cmp, "slc": kv_slc, "swa": kv_swa}
    B, T = q.shape[:2]
    expect = {"q": (q, (B, T, spec.HQ, spec.DK)), "k": (k, (B, T, spec.H, spec.DK)),
              "v": (v, (B, T, spec.H, spec.DV))}
    for b in BRANCHES:
        if gates[b] is not None:
            if not spec.has(b):
                raise ValueError(f"gate g_{b} given but the spec has no '{b}' branch")
            expect[f"g_{b}"] = (gates[b], (B, T, spec.HQ))
        if kvs[b] is not None:
            expect[f"kv_{b}[0]"] = (kvs[b][0], (B, T, spec.H, spec.DK))
            expect[f"kv_{b}[1]"] = (kvs[b][1], (B, T, spec.H, spec.DV))
    for name, (x, shape) in expect.items():
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {shape}")

    if indices is not None and tuple(indices.shape) != (B, T, spec.H, spec.S):
        raise ValueError(f"indices has shape {tuple(indices.shape)}, expected {(B, T, spec.H, spec.S)}")
    if cu_seqlens is None:
        o, aux = _nsa_dense(spec, q, k, v, gates, kvs, mlp_k, mlp_v, indices)
        return (o, aux) if return_aux else o

    if B != 1:
        raise ValueError(f"cu_seqlens needs B = 1 (packed sequences), got B = {B}")
    offsets = [int(x) for x in (cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else cu_seqlens)]
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != T or any(
            a > b for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T={T}, got {offsets}")

    def cut(x, bos, eos):
        return None if x is None else x[:, bos:eos]

    outs, auxes = [], []
    for bos, eos in zip(offsets, offsets[1:]):
        o_i, aux_i = _nsa_dense(
            spec, q[:, bos:eos], k[:, bos:eos], v[:, bos:eos],
            {b: cut(g, bos, eos) for b, g in gates.items()},
            {b: None if kv is None else (kv[0][:, bos:eos], kv[1][:, bos:eos])
             for b, kv in kvs.items()},
            mlp_k, mlp_v, cut(indices, bos, eos))
        outs.append(o_i)
        auxes.append(aux_i)
    o = torch.cat(outs, dim=1)
    if not return_aux:
        return o
    aux = {}
    for key in auxes[0]:
        parts = [a[key] for a in auxes]
        if parts[0] is None:
            aux[key] = None
        elif key in ("o_cmp", "o_slc", "o_swa", "indices"):
            aux[key] = torch.cat(parts, dim=1)
        else:
            aux[key] = parts
    return o, aux


# ----------------------------------------------------------------------------- decode


def naive_decode(spec: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 lengths: torch.Tensor | Sequence[int], g_cmp: torch.Tensor | None = None,
                 g_slc: torch.Tensor | None = None, g_swa: torch.Tensor | None = None, *,
                 kv_cmp: tuple[torch.Tensor, torch.Tensor] | None = None,
                 kv_slc: tuple[torch.Tensor, torch.Tensor] | None = None,
                 kv_swa: tuple[torch.Tensor, torch.Tensor] | None = None,
                 mlp_k: nn.Module | None = None, mlp_v: nn.Module | None = None,
                 indices: torch.Tensor | None = None, return_aux: bool = False):
    """NSA for the newest Sq tokens of each sequence against its cache (decode), fp32.

    q [B, Sq, HQ, DK]: the queries of the last Sq tokens of sequence b, at positions
    lengths[b] - Sq .. lengths[b] - 1. k [B, Tmax, H, DK], v [B, Tmax, H, DV]: the cache,
    valid up to lengths[b] (the new tokens' keys and values included); kv_* replace it for
    one branch, as in naive_nsa. Gates g_* [B, Sq, HQ]. indices [B, Sq, H, S]: the blocks
    the selection attends to instead of its own top-n (as naive_nsa's indices).

    By definition (NSA.md, Decode) each output row is naive_nsa's row of that token on the
    sequence's first lengths[b] tokens: this runs naive_nsa on each sequence, with the new
    queries in its last rows, and keeps those rows. Returns o [B, Sq, HQ, DV] float32, or
    (o, aux) with aux["o_cmp"] [B, Sq, HQ, DV] (the compressed branch's output, ungated),
    aux["indices"] int32 [B, Sq, H, S] and aux["scores"] (a list of the sequences'
    [1, Sq, H, NS] group scores); an entry is None when nothing computed it.
    """
    B, Sq = q.shape[:2]
    lens = [int(x) for x in (lengths.tolist() if torch.is_tensor(lengths) else lengths)]
    if len(lens) != B or any(n < Sq or n > k.shape[1] for n in lens):
        raise ValueError(f"lengths {lens} must hold B={B} values in [Sq={Sq}, Tmax={k.shape[1]}]")
    gates = {"cmp": g_cmp, "slc": g_slc, "swa": g_swa}
    outs, o_cmp, idx, scores = [], [], [], []
    for b, n in enumerate(lens):
        def place(x):  # [B, Sq, ...] -> [1, n, ...]: row b's tokens last, zeros before
            if x is None:
                return None
            full = x.new_zeros(1, n, *x.shape[2:])
            full[:, n - Sq:] = x[b:b + 1]
            return full

        def seq(pair):
            return None if pair is None else (pair[0][b:b + 1, :n], pair[1][b:b + 1, :n])

        given = None
        if indices is not None:  # earlier rows attend to no block (their output is dropped)
            given = torch.full((1, n, *indices.shape[2:]), -1, dtype=torch.long, device=q.device)
            given[:, n - Sq:] = indices[b:b + 1].to(given)
        o, aux = naive_nsa(spec, place(q), k[b:b + 1, :n], v[b:b + 1, :n],
                           **{f"g_{br}": place(g) for br, g in gates.items()},
                           kv_cmp=seq(kv_cmp), kv_slc=seq(kv_slc), kv_swa=seq(kv_swa),
                           mlp_k=mlp_k, mlp_v=mlp_v, indices=given, return_aux=True)
        outs.append(o[:, n - Sq:])
        if aux["o_cmp"] is not None:
            o_cmp.append(aux["o_cmp"][:, n - Sq:])
        if aux["indices"] is not None:
            idx.append(aux["indices"][:, n - Sq:])
            scores.append(aux["scores"][:, n - Sq:])
    o = torch.cat(outs, 0)
    if not return_aux:
        return o
    return o, {"o_cmp": torch.cat(o_cmp, 0) if o_cmp else None,
               "indices": torch.cat(idx, 0).to(torch.int32) if idx else None, "scores": scores}
