"""Compressed attention (the `cmp` branch): mean compression and the attention launcher."""
from __future__ import annotations

import torch

from ..config import Config
from ..kernels import kernel_def, kernel_fn
from ..spec import NSASpec
from .common import (check, check_tensor, cmp_seqlens, dot_precision, launch_options,
                     num_cmp_blocks, outputs, seq_start, tile_table)


def compress_mean(x: torch.Tensor, l: int, d: int,  # noqa: E741 - the paper's names
                  cu_seqlens: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """phi = mean: x [B, T, H, D] -> (x_cmp [B, NC, H, D] in x's dtype, cu_seqlens_cmp).

    Block i is the mean of x[i*d : i*d + l], NC = (T - l) // d + 1 (0 if T < l). With
    cu_seqlens (int [N+1], B = 1) blocks never cross a sequence boundary: each sequence
    contributes its own (len - l) // d + 1 blocks (or none), packed into [1, sum NC, H, D],
    and cu_seqlens_cmp (int32 [N+1]) says where each sequence's blocks start; without
    cu_seqlens it is None.

    Sums run in fp32. Since d divides l, a block is l // d consecutive stride chunks: each
    chunk of d tokens is summed once and blocks add up chunk sums, so no [NC, l] copy of x
    is made (x is read about once, not l / d times).
    """
    check_tensor("x", x, (None, None, None, None))
    check(l >= 1 and d >= 1 and l % d == 0, f"compression stride d={d} must divide block l={l}")
    B, T, H, D = x.shape
    m = l // d
    if cu_seqlens is None:
        NC = num_cmp_blocks(T, l, d)
        if NC == 0:
            return x.new_zeros(B, 0, H, D), None
        n_chunks = NC + m - 1  # = T // d
        chunks = x[:, :n_chunks * d].reshape(B, n_chunks, d, H, D).sum(2, dtype=torch.float32)
        x_cmp = chunks.unfold(1, m, 1).sum(-1) / l  # [B, NC, H, D]
        return x_cmp.to(x.dtype), None

    seq_start(cu_seqlens, B, T, x.device)  # validates cu_seqlens
    cu = cu_seqlens.to(device=x.device, dtype=torch.int64)
    cu_cmp = cmp_seqlens(cu, l, d)
    n_cmp = (cu_cmp[1:] - cu_cmp[:-1]).to(torch.int64)
    NC = int(cu_cmp[-1])
    if NC == 0:
        return x.new_zeros(1, 0, H, D), cu_cmp
    # Only sequences with a block need their chunks: n_cmp + m - 1 of them each.
    n_chunks = torch.where(n_cmp > 0, n_cmp + m - 1, 0)
    cu_chunks = torch.cat([n_chunks.new_zeros(1), n_chunks.cumsum(0)])
    n_total = int(cu_chunks[-1])
    chunk_in_seq = (torch.arange(n_total, device=x.device)
                    - torch.repeat_interleave(cu_chunks[:-1], n_chunks))
    chunk_row = torch.repeat_interleave(cu[:-1], n_chunks) + chunk_in_seq * d
    tok = (chunk_row[:, None] + torch.arange(d, device=x.device)).flatten()
    chunks = x[0, tok].view(n_total, d, H, D).sum(1, dtype=torch.float32)
    # Block i of a sequence adds chunks i .. i + m - 1 of that sequence.
    cu_cmp64 = cu_cmp.to(torch.int64)
    blk_in_seq = torch.arange(NC, device=x.device) - torch.repeat_interleave(cu_cmp64[:-1], n_cmp)
    first_chunk = torch.repeat_interleave(cu_chunks[:-1], n_cmp) + blk_in_seq
    x_cmp = chunks[first_chunk[:, None] + torch.arange(m, device=x.device)].sum(1) / l
    return x_cmp.to(x.dtype)[None], cu_cmp


def compression_fwd(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, spec: NSASpec,
                    config: Config | None = None, cu_seqlens: torch.Tensor | None = None,
                    cu_seqlens_cmp: torch.Tensor | None = None,
                    out: tuple[torch.Tensor, torch.Tensor] | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over the compressed blocks wholly in its past: query t
    (position in its sequence) sees block i iff i * d + l - 1 <= t.

    q [B, T, HQ, DK]; k_cmp [B, NC, H, DK], v_cmp [B, NC, H, DV] with NC = (T - l) // d + 1
    (0 if T < l), e.g. from `compress_mean`. With cu_seqlens (int32 [N+1], B = 1) the
    compressed blocks are packed per sequence ([1, sum NC, H, *]); cu_seqlens_cmp, if given,
    must match (it is derived from cu_seqlens either way). config: defaults to the kernel's
    heuristic. out: optional (o, lse) to write into. Returns o [B, T, HQ, DV] (q's dtype;
    exactly 0 where no block is visible) and lse [B, T, HQ] (fp32, natural log; -inf there).
    """
    check_tensor("q", q, (None, None, spec.HQ, spec.DK))
    B, T = q.shape[:2]
    if cu_seqlens is None:
        check(cu_seqlens_cmp is None, "cu_seqlens_cmp needs cu_seqlens")
        NC = num_cmp_blocks(T, spec.l, spec.d)
        check_tensor("k_cmp", k_cmp, (B, NC, spec.H, spec.DK), like=q)
    else:
        seq_start(cu_seqlens, B, T, q.device)  # validates cu_seqlens
        cu_cmp = cmp_seqlens(cu_seqlens.to(q.device), spec.l, spec.d)
        if cu_seqlens_cmp is not None:
            check(torch.equal(cu_seqlens_cmp.to(cu_cmp), cu_cmp),
                  "cu_seqlens_cmp does not match cu_seqlens: sequence s must have "
                  "(len_s - l) // d + 1 compressed blocks (0 if len_s < l)")
        NC = int(cu_cmp[-1])
        check_tensor("k_cmp", k_cmp, (1, NC, spec.H, spec.DK), like=q)
    check_tensor("v_cmp", v_cmp, (B, NC, spec.H, spec.DV), like=q)
    config = config or kernel_def("compression_fwd").default(spec, T)
    q, k_cmp, v_cmp = q.contiguous(), k_cmp.contiguous(), v_cmp.contiguous()
    o, lse = outputs(out, (B, T, spec.HQ, spec.DV), (B, T, spec.HQ), q)
    if B * T == 0:
        return o, lse
    if NC == 0:  # no block anywhere: nothing to launch over
        return o.zero_(), lse.fill_(float("-inf"))
    tiles = tile_table(cu_seqlens, B, T, config["BLOCK_T"], spec.l, spec.d, q.device)
    fn = kernel_fn("compression_fwd", spec, config)
    fn[(tiles.shape[0], spec.H)](q, k_cmp, v_cmp, o, lse, tiles, DOT_PRECISION=dot_precision(q),
                                 **launch_options(config))
    return o, lse
