"""Decode: the key/value cache, the decode launchers and the block choice between them.

A decode step attends the newest Sq tokens of each of B sequences (Sq = 1 for generation,
a few for speculative decoding) to everything cached before and including them, with the
rules of the forward pass at each token's absolute position (NSA.md, Decode). Nothing here
reads a tensor back to the host, so a step can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch

from ..config import Config
from ..kernels import (decode_splits, group_pad, kernel_def, kernel_module, next_pow2,
                       num_cmp_blocks)
from ..spec import BRANCHES, NSASpec
from .common import check, check_tensor, dot_precision, launch_options

# Compressed blocks formed per step of NSACache.append: bounds its gather buffer
# ([B, blocks, l, H, D]) when a whole prompt is appended at once.
_APPEND_BLOCKS = 256


class NSACache:
    """Keys and values of B sequences of up to `max_len` tokens, with their compressed blocks.

    k, v [B, max_len + 1, H, DK / DV] for each branch pair (one pair shared by the branches,
    or with per_branch_kv one per branch, as nsa()'s kv_cmp / kv_slc / kv_swa), and k_cmp,
    v_cmp [B, NC_max + 1, H, D]: phi of every complete block of the compressed branch's
    pair, formed as tokens arrive (the last row of each is a scratch row). lengths int32 [B] (on `device`): tokens cached per sequence.
    mlp_k / mlp_v: phi's modules when spec.phi == "mlp" (as nsa() takes them).
    """

    def __init__(self, spec: NSASpec, batch: int, max_len: int, *, device, dtype=torch.bfloat16,
                 per_branch_kv: bool = False, mlp_k: torch.nn.Module | None = None,
                 mlp_v: torch.nn.Module | None = None):
        check(batch >= 1 and max_len >= 1, f"batch ({batch}) and max_len ({max_len}) must be >= 1")
        check(dtype in (torch.float32, torch.float16, torch.bfloat16),
              f"cache dtype {dtype} is not a float dtype the kernels take")
        check(spec.phi != "mlp" or (mlp_k is not None and mlp_v is not None),
              "spec has phi = mlp: pass the compression MLPs (mlp_k, mlp_v)")
        self.spec, self.B, self.max_len = spec, batch, max_len
        self.per_branch_kv, self.mlp_k, self.mlp_v = per_branch_kv, mlp_k, mlp_v
        # One trash row past the end of each sequence: appends write their padding and
        # not-yet-complete blocks there instead of branching on the host.
        H = spec.H

        def pair():
            return (torch.zeros(batch, max_len + 1, H, spec.DK, device=device, dtype=dtype),
                    torch.zeros(batch, max_len + 1, H, spec.DV, device=device, dtype=dtype))
        # The pairs the spec reads: the compressed branch's also scores the selection.
        self.pairs = tuple(b for b in BRANCHES
                           if spec.has(b) or (b == "cmp" and spec.has("slc")))
        shared = pair()
        self.kv = {b: (pair() if per_branch_kv else shared) for b in self.pairs}
        self.nc_max = num_cmp_blocks(max_len, spec.l, spec.d)
        self.k_cmp = torch.zeros(batch, self.nc_max + 1, H, spec.DK, device=device, dtype=dtype)
        self.v_cmp = torch.zeros(batch, self.nc_max + 1, H, spec.DV, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch, device=device, dtype=torch.int32)

    @property
    def device(self) -> torch.device:
        return self.lengths.device

    @property
    def dtype(self) -> torch.dtype:
        return self.k_cmp.dtype

    def reset(self) -> None:
        """Empty every sequence (the buffers are kept)."""
        self.lengths.zero_()

    def append(self, k: torch.Tensor | None = None, v: torch.Tensor | None = None, *,
               kv_cmp=None, kv_slc=None, kv_swa=None, n_new: torch.Tensor | None = None) -> None:
        """Add Sq tokens to every sequence: k [B, Sq, H, DK], v [B, Sq, H, DV] (the shared
        pair), or with per_branch_kv a (k, v) pair per branch in kv_cmp / kv_slc / kv_swa.
        n_new int [B] (default Sq for all): how many of the Sq rows are real for each
        sequence (a padded batch of prompts); the rest are ignored. Compressed blocks that
        these tokens complete are formed here. The caller keeps every sequence within
        max_len: lengths live on the device and are not read back, so tokens past max_len
        are dropped (lengths stop at max_len) rather than reported."""
        spec = self.spec
        given = {"cmp": kv_cmp, "slc": kv_slc, "swa": kv_swa}
        pairs = {b: given[b] if self.per_branch_kv else (k, v) for b in self.pairs}
        for name, p in pairs.items():
            check(p is not None and p[0] is not None and p[1] is not None,
                  f"append needs the {'kv_' + name + ' pair' if self.per_branch_kv else 'shared k, v'}")
        Sq = next(iter(pairs.values()))[0].shape[1]
        for name, (kk, vv) in pairs.items():
            check_tensor(f"k ({name})", kk, (self.B, Sq, spec.H, spec.DK), like=self.k_cmp)
            check_tensor(f"v ({name})", vv, (self.B, Sq, spec.H, spec.DV), like=self.k_cmp)
        check(Sq <= self.max_len, f"{Sq} tokens cannot fit a cache of {self.max_len}")
        dev = self.device
        n = (torch.full((self.B,), Sq, device=dev, dtype=torch.int32) if n_new is None
             else n_new.to(device=dev, dtype=torch.int32))
        check(n.shape == (self.B,), f"n_new must hold {self.B} counts")
        old = self.lengths.to(torch.int64)
        i = torch.arange(Sq, device=dev)
        rows = torch.where(i[None, :] < n[:, None], old[:, None] + i[None, :], self.max_len)
        rows = rows.clamp(max=self.max_len)
        b_idx = torch.arange(self.B, device=dev)[:, None].expand(-1, Sq)
        written = set()
        for name, (kk, vv) in pairs.items():
            dst = self.kv[name]
            if id(dst[0]) in written:
                continue
            written.add(id(dst[0]))
            dst[0][b_idx, rows] = kk
            dst[1][b_idx, rows] = vv
        new = torch.clamp(old + n.to(torch.int64), max=self.max_len)
        self._form_blocks(old, new, Sq)
        self.lengths.copy_(new.to(torch.int32))

    def _form_blocks(self, old: torch.Tensor, new: torch.Tensor, Sq: int) -> None:
        """phi of the compressed blocks complete at `new` tokens and not at `old`."""
        spec, dev = self.spec, self.device
        l, d = spec.l, spec.d  # noqa: E741

        def n_blocks(x):
            return torch.where(x >= l, torch.div(x - l, d, rounding_mode="floor") + 1, 0)
        if "cmp" not in self.kv:  # a window-only spec keeps no compressed blocks
            return
        first, last = n_blocks(old), n_blocks(new)
        k_src, v_src = self.kv["cmp"]
        j = torch.arange(l, device=dev)
        b_idx = torch.arange(self.B, device=dev)[:, None]
        # At most Sq // d + 1 blocks complete in one append (static: no host sync).
        for r0 in range(0, Sq // d + 1, _APPEND_BLOCKS):
            r = torch.arange(r0, min(r0 + _APPEND_BLOCKS, Sq // d + 1), device=dev)
            blk = first[:, None] + r[None, :]  # [B, K]
            ok = blk < last[:, None]
            tok = (blk[..., None] * d + j).clamp(max=self.max_len)  # [B, K, l]
            for src, dst, mlp in ((k_src, self.k_cmp, self.mlp_k), (v_src, self.v_cmp, self.mlp_v)):
                blocks = src[b_idx[..., None], tok]  # [B, K, l, H, D]
                if spec.phi == "mean":
                    out = blocks.float().mean(2)
                else:
                    p = next(mlp.parameters(), None)
                    x = blocks.transpose(2, 3).to(p.dtype if p is not None else blocks.dtype)
                    out = mlp(x)  # [B, K, H, D]
                dst[b_idx, torch.where(ok, blk, self.nc_max)] = out.to(dst.dtype)


def decode_select(q: torch.Tensor, cache: NSACache, Sq: int, config: Config | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compressed attention and block scores of decode queries.

    q [N, HQ, DK] (N = B * Sq, sequence-major: the last Sq tokens of each sequence).
    Returns (cmp_o, cmp_ml, gp): the compressed attention's splits, fp32 [N, H, SPLITS,
    G_PAD, DV] unnormalised and [N, H, SPLITS, G_PAD, 2] (max, sum; `decode_attend` merges
    them), and gp fp32 [N, H, NC_max + 1] (each compressed block's probability summed over
    the group's heads; 0 where not visible).
    """
    spec = cache.spec
    config = config or kernel_def("decode_select").default(spec, cache.max_len)
    N = q.shape[0]
    nc_rows = cache.k_cmp.shape[1]
    splits = -(-nc_rows // config["SPLIT_C"])
    gp_pad = group_pad(spec)
    dev = q.device
    sc = torch.empty(N, spec.HQ, nc_rows, device=dev, dtype=torch.float32)
    cmp_o = torch.empty(N, spec.H, splits, gp_pad, spec.DV, device=dev, dtype=torch.float32)
    cmp_ml = torch.empty(N, spec.H, splits, gp_pad, 2, device=dev, dtype=torch.float32)
    gp = torch.empty(N, spec.H, nc_rows, device=dev, dtype=torch.float32)
    if N == 0:
        return cmp_o, cmp_ml, gp
    mod = kernel_module("decode_select", spec, config)
    grid = (N, spec.H, splits)
    mod.nsa_decode_select_kernel[grid](q, cache.k_cmp, cache.v_cmp, cache.lengths, sc, cmp_o,
                                       cmp_ml, Sq, nc_rows, DOT_PRECISION=dot_precision(q),
                                       **launch_options(config))
    mod.nsa_decode_scores_kernel[grid](cache.lengths, sc, cmp_ml, gp, Sq, nc_rows,
                                       **launch_options(config))
    return cmp_o, cmp_ml, gp


def decode_topn(gp: torch.Tensor, cache: NSACache, Sq: int, config: Config | None = None
                ) -> torch.Tensor:
    """Top-n selection blocks of decode queries from `decode_select`'s gp [N, H, NC_rows]:
    Eq. 9's overlap weights over the group sums, forced initial and local blocks, ties to the
    lower block, -1 padding, ascending: int32 [N, H, S], as `topn` writes them. One program
    per query token and kv head (decode_select's module, its config)."""
    spec = cache.spec
    config = config or kernel_def("decode_select").default(spec, cache.max_len)
    N, H, nc_rows = gp.shape
    idx = torch.empty(N, H, spec.S, device=gp.device, dtype=torch.int32)
    if N == 0:
        return idx
    NS = -(-cache.max_len // spec.BS)
    mod = kernel_module("decode_select", spec, config)
    mod.nsa_decode_topn_kernel[(N, H)](gp, cache.lengths, idx, Sq, nc_rows, NS,
                                       NS_PAD=next_pow2(NS), num_warps=4)
    return idx


def decode_attend(q: torch.Tensor, cache: NSACache, Sq: int, block_idx: torch.Tensor | None,
                  cmp_parts: tuple[torch.Tensor, torch.Tensor] | None,
                  gates: dict[str, torch.Tensor], config: Config | None = None) -> torch.Tensor:
    """Selected and window attention of decode queries, and the gated sum with o_cmp.

    q [N, HQ, DK]; block_idx int32 [N, H, S] (`decode_topn`; needed with gates["slc"]);
    cmp_parts: (cmp_o, cmp_ml) from `decode_select` (needed with gates["cmp"]); gates:
    branch -> g [N, HQ] for the branches on. Returns o [N, HQ, DV] in q's dtype.
    """
    spec = cache.spec
    config = config or kernel_def("decode_attend").default(spec, cache.max_len)
    N = q.shape[0]
    n_slc, n_swa = decode_splits(spec, config)
    n_slc, n_swa = (n_slc if "slc" in gates else 0), (n_swa if "swa" in gates else 0)
    n_cmp = cmp_parts[0].shape[2] if "cmp" in gates else 0
    gp_pad = group_pad(spec)
    part_o = torch.empty(N, spec.H, n_slc + n_swa, gp_pad, spec.DV, device=q.device,
                         dtype=torch.float32)
    part_ml = torch.empty(N, spec.H, n_slc + n_swa, gp_pad, 2, device=q.device, dtype=torch.float32)
    o = torch.empty(N, spec.HQ, spec.DV, device=q.device, dtype=q.dtype)
    if N == 0:
        return o
    mod = kernel_module("decode_attend", spec, config)
    # A branch the spec lacks has no cache; any pair stands in (its splits are 0: unread).
    any_pair = next(iter(cache.kv.values()))
    (k_slc, v_slc), (k_swa, v_swa) = cache.kv.get("slc", any_pair), cache.kv.get("swa", any_pair)
    if n_slc + n_swa:
        idx = block_idx if n_slc else cache.lengths  # unread without selected splits
        mod.nsa_decode_attend_kernel[(N, spec.H, n_slc + n_swa)](
            q, k_slc, v_slc, k_swa, v_swa, idx, cache.lengths, part_o, part_ml, Sq,
            cache.max_len + 1, N_SLC=n_slc, DOT_PRECISION=dot_precision(q), **launch_options(config))
    g = {b: gates.get(b, q) for b in BRANCHES}  # q stands in for an absent gate: unread
    cmp_o, cmp_ml = cmp_parts if n_cmp else (part_o, part_ml)
    mod.nsa_decode_combine_kernel[(N, spec.H)](
        cmp_o, cmp_ml, part_o, part_ml, g["cmp"], g["slc"], g["swa"], o,
        N_CMP=n_cmp, N_SLC=n_slc, N_SWA=n_swa, num_warps=4)
    return o
