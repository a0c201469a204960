"""Compressed attention (the `cmp` branch): mean compression and the attention launcher."""
from __future__ import annotations

import torch

from ..config import Config
from ..kernels import kernel_def, kernel_fn, kernel_module, num_cmp_blocks
from ..spec import NSASpec
from .common import (attention_math, attention_math_bwd, check, check_grad_inputs,
                     check_seqlens, check_tensor, cmp_seqlens, cmp_tile_table, cudnn_config,
                     cudnn_refused, dkv_launch_options, dot_precision, launch_options, outputs,
                     RowPieces, tile_table, token_tile_fwd)


def compress_mean(x: torch.Tensor, spec: NSASpec, config: Config | None = None,
                  cu_seqlens: torch.Tensor | None = None, out: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """phi = mean over spec's compressed blocks (block l, stride d): x [B, T, H, D] ->
    (x_cmp [B, NC, H, D] in x's dtype, cu_seqlens_cmp).

    Block i is the mean of x[i*d : i*d + l], NC = (T - l) // d + 1 (0 if T < l), summed in
    fp32 (templates/compress_mean.py.j2, one pass over x). With cu_seqlens (int [N+1], B = 1)
    blocks never cross a sequence boundary: each sequence contributes its own
    (len - l) // d + 1 blocks (or none), packed into [1, sum NC, H, D], and cu_seqlens_cmp
    (int32 [N+1]) says where each sequence's blocks start; without cu_seqlens it is None.
    H and D are x's own (keys and values may differ in D). config: defaults to the kernel's
    heuristic. out: optional contiguous tensor of x_cmp's shape and x's dtype to write into.
    Differentiable in x (CompressMeanFunction, backward in PyTorch).
    """
    check_tensor("x", x, (None, None, None, None))
    B, T, H, D = x.shape
    cu = check_seqlens(cu_seqlens, B, T, x.device)
    cu_cmp = None if cu is None else cmp_seqlens(cu, spec.l, spec.d)
    # Blocks of each sequence, or of all packed ones (one host sync, here only).
    NC = num_cmp_blocks(T, spec.l, spec.d) if cu is None else int(cu_cmp[-1])
    if out is not None:
        check_tensor("out", out, (B if cu is None else 1, NC, H, D), like=x)
        check(out.is_contiguous(), "out must be contiguous")
    return CompressMeanFunction.apply(x, spec, config, cu, cu_cmp, NC, out), cu_cmp


def _block_rows(cu: torch.Tensor, cu_cmp: torch.Tensor, d: int, NC: int) -> torch.Tensor:
    """int64 [NC]: the row of the packed x where each of the NC packed compressed blocks
    starts."""
    n_cmp = (cu_cmp[1:] - cu_cmp[:-1]).to(torch.int64)
    first = torch.repeat_interleave(cu[:-1], n_cmp, output_size=NC)
    i = torch.arange(NC, device=cu.device) - torch.repeat_interleave(
        cu_cmp[:-1].to(torch.int64), n_cmp, output_size=NC)
    return first + i * d


def _compress_mean_fwd(x, spec, config, cu, cu_cmp, NC, out) -> torch.Tensor:
    B, T, H, D = x.shape
    x = x.contiguous()
    if cu is None:
        n_blocks, rows = B * NC, x  # rows: unread without IS_VARLEN
    else:
        n_blocks, rows = NC, _block_rows(cu, cu_cmp, spec.d, NC)
    if out is None:
        out = x.new_empty(1 if cu is not None else B, NC, H, D)
    if n_blocks == 0 or H * D == 0:
        return out
    config = config or kernel_def("compress_mean").default(spec, T)
    grid = (-(-n_blocks // config["BLOCK_C"]), H, -(-D // config["BLOCK_DIM"]))
    kernel_fn("compress_mean", spec, config)[grid](
        x, out, rows, n_blocks, T, max(NC, 1), H, DIM=D, IS_VARLEN=cu is not None,
        **launch_options(config))
    return out


def compress_mean_bwd(dx_cmp: torch.Tensor, shape: torch.Size, l: int, d: int,  # noqa: E741
                      cu: torch.Tensor | None, cu_cmp: torch.Tensor | None) -> torch.Tensor:
    """Gradient of compress_mean: dx [B, T, H, D] (shape) in dx_cmp's dtype.

    A token gets the sum of dx_cmp / l over the l / d blocks that hold it, which is the same
    for the d tokens of a stride chunk: the chunk sums are formed in fp32 (one shifted add per
    chunk position of a block, whose chunks are distinct across blocks, so no atomics and a
    deterministic order), then written to their tokens once. Tokens in no block get 0."""
    B, T, H, D = shape
    m = l // d
    dx = torch.zeros(shape, device=dx_cmp.device, dtype=dx_cmp.dtype)
    NC = dx_cmp.shape[1]
    if NC == 0:
        return dx
    g = dx_cmp.float() / l
    if cu is None:
        dchunk = g.new_zeros(B, NC + m - 1, H, D)
        for j in range(m):
            dchunk[:, j:j + NC] += g
        dx[:, :(NC + m - 1) * d] = dchunk.to(dx.dtype).repeat_interleave(d, 1)
        return dx
    # Packed: a sequence with n blocks has n + m - 1 chunks, chunk c at row start + c * d;
    # its block i holds its chunks i .. i + m - 1.
    dev = dx.device
    n_cmp = (cu_cmp[1:] - cu_cmp[:-1]).to(torch.int64)
    n_chunks = torch.where(n_cmp > 0, n_cmp + m - 1, 0)
    cu_chunks = torch.cat([n_chunks.new_zeros(1), n_chunks.cumsum(0)])
    total = int(cu_chunks[-1])
    seqs = torch.arange(n_cmp.numel(), device=dev)
    blk_seq = torch.repeat_interleave(seqs, n_cmp, output_size=NC)
    first_chunk = cu_chunks[blk_seq] + torch.arange(NC, device=dev) - cu_cmp.to(torch.int64)[blk_seq]
    dchunk = g.new_zeros(total, H, D)
    for j in range(m):
        dchunk[first_chunk + j] += g[0]
    chunk_seq = torch.repeat_interleave(seqs, n_chunks, output_size=total)
    chunk_row = cu[chunk_seq] + (torch.arange(total, device=dev) - cu_chunks[chunk_seq]) * d
    rows = (chunk_row[:, None] + torch.arange(d, device=dev)).flatten()
    dx.view(B * T, H, D)[rows] = dchunk.to(dx.dtype).repeat_interleave(d, 0)
    return dx


class CompressMeanFunction(torch.autograd.Function):
    """compress_mean with autograd: the kernel forward, the backward in PyTorch (a scatter of
    dx_cmp / l, memory-bound and off the inference path)."""

    @staticmethod
    def forward(ctx, x, spec, config, cu, cu_cmp, NC, out):
        ctx.meta = (x.shape, spec.l, spec.d, cu, cu_cmp)
        return _compress_mean_fwd(x, spec, config, cu, cu_cmp, NC, out)

    @staticmethod
    def backward(ctx, dx_cmp):
        return compress_mean_bwd(dx_cmp, *ctx.meta), None, None, None, None, None, None


# The dk/dv partials of a token split take n_split * NC * H * (DK + DV) fp32 words: NC grows
# with T, so the number of splits is capped to keep that linear in T (16 splits of 4096
# tokens is 64k; at 128k the splits grow to 8192 tokens instead of doubling in number).
MAX_DKV_SPLITS = 16


def dkv_splits(T: int, split: int, block_t: int) -> tuple[int, int]:
    """(tokens per split, number of splits) of the dk/dv pass: `split` tokens (DKV_SPLIT_T)
    unless that needs more than MAX_DKV_SPLITS splits, then ceil(T / MAX_DKV_SPLITS) rounded
    up to a multiple of block_t (DKV_BLOCK_T: no token tile may straddle two splits)."""
    if -(-T // split) > MAX_DKV_SPLITS:
        split = -(-T // MAX_DKV_SPLITS)
        split = -(-split // block_t) * block_t
    return split, -(-T // split)


def _check_cmp_inputs(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, spec: NSASpec,
                      cu_seqlens: torch.Tensor | None, cu_seqlens_cmp: torch.Tensor | None) -> int:
    """Shape checks shared by the forward and backward launchers; returns NC (packed)."""
    check_tensor("q", q, (None, None, spec.HQ, spec.DK))
    B, T = q.shape[:2]
    if cu_seqlens is None:
        check(cu_seqlens_cmp is None, "cu_seqlens_cmp needs cu_seqlens")
        NC = num_cmp_blocks(T, spec.l, spec.d)
        check_tensor("k_cmp", k_cmp, (B, NC, spec.H, spec.DK), like=q)
    else:
        check_seqlens(cu_seqlens, B, T, q.device)
        cu_cmp = cmp_seqlens(cu_seqlens.to(q.device), spec.l, spec.d)
        if cu_seqlens_cmp is not None:
            check(torch.equal(cu_seqlens_cmp.to(cu_cmp), cu_cmp),
                  "cu_seqlens_cmp does not match cu_seqlens: sequence s must have "
                  "(len_s - l) // d + 1 compressed blocks (0 if len_s < l)")
        NC = int(cu_cmp[-1])
        check_tensor("k_cmp", k_cmp, (1, NC, spec.H, spec.DK), like=q)
    check_tensor("v_cmp", v_cmp, (B, NC, spec.H, spec.DV), like=q)
    return NC


def compression_fwd(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, spec: NSASpec,
                    config: Config | None = None, cu_seqlens: torch.Tensor | None = None,
                    cu_seqlens_cmp: torch.Tensor | None = None,
                    out: tuple[torch.Tensor, torch.Tensor] | None = None, pieces: bool = False,
                    ) -> tuple[torch.Tensor | RowPieces, torch.Tensor]:
    """Attention of each query over the compressed blocks wholly in its past: query t
    (position in its sequence) sees block i iff i * d + l - 1 <= t.

    q [B, T, HQ, DK]; k_cmp [B, NC, H, DK], v_cmp [B, NC, H, DV] with NC = (T - l) // d + 1
    (0 if T < l), e.g. from `compress_mean`. With cu_seqlens (int32 [N+1], B = 1) the
    compressed blocks are packed per sequence ([1, sum NC, H, *]); cu_seqlens_cmp, if given,
    must match (it is derived from cu_seqlens either way). config: defaults to the kernel's
    heuristic. out: optional (o, lse) to write into. Returns o [B, T, HQ, DV] (q's dtype;
    exactly 0 where no block is visible) and lse [B, T, HQ] (fp32, natural log; -inf there).
    config CUDNN = 1 runs it as batched causal attention through torch's cuDNN attention
    (`_residue_attention`; on the CPU, the same batching in fp32 math) instead of the
    generated kernel; it falls back to the kernel, with a warning, for packed sequences, fp32
    on CUDA, or when cuDNN refuses. pieces: with CUDNN = 1, B = 1 and no `out`, o comes back
    as RowPieces, where cuDNN wrote it (selection_fwd's gated sum reads it so; the copy into
    one tensor costs 0.27-0.54 ms at 64k on an H200); otherwise o is one tensor.
    """
    NC = _check_cmp_inputs(q, k_cmp, v_cmp, spec, cu_seqlens, cu_seqlens_cmp)
    B, T = q.shape[:2]
    config = config or kernel_def("compression_fwd").default(spec, T)
    q, k_cmp, v_cmp = q.contiguous(), k_cmp.contiguous(), v_cmp.contiguous()
    config = cudnn_config("compression_fwd", config, q, spec, cu_seqlens)
    cudnn = config.get("CUDNN", 0) and NC > 0
    o_shape = (B, T, spec.HQ, spec.DV)
    if cudnn and pieces and B == 1 and out is None:  # o stays where cuDNN writes it
        o, lse = None, torch.empty(o_shape[:3], device=q.device, dtype=torch.float32)
    else:
        o, lse = outputs(out, o_shape, o_shape[:3], q)
    if B * T == 0:
        return o, lse
    if NC == 0:  # no block anywhere: nothing to launch over
        return o.zero_(), lse.fill_(float("-inf"))
    if cudnn:
        try:
            rows = _residue_attention(q, k_cmp, v_cmp, spec, o, lse)
            return (o if o is not None else rows), lse
        except RuntimeError as e:
            config = cudnn_refused("compression_fwd", config, q, spec, e)
            o = o if o is not None else torch.empty(o_shape, device=q.device, dtype=q.dtype)
    token_tile_fwd("compression_fwd", q, k_cmp, v_cmp, o, lse, spec, config, cu_seqlens, "BLOCK_C")
    return o, lse


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with its log-sum-exp: q [N, HQ, Tq, DK], k [N, H, Tk, DK], v [N, H, Tk, DV]
    (H divides HQ; any strides with a unit last one) -> (o [N, HQ, Tq, DV] in q's dtype, lse
    [N, HQ, Tq] fp32, natural log). causal: Tq == Tk, query i sees keys 0..i. torch's cuDNN
    attention on CUDA; elsewhere (the interpreter's tests) the same math in fp32."""
    if q.is_cuda:
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal,
                                                                 False, scale=scale)
        return out[0], out[1].reshape(q.shape[:3])
    return attention_math(q, k, v, scale, q.shape[2] if causal else None)


def _attend_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                lse: torch.Tensor, do: torch.Tensor, scale: float, causal: bool,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `_attend`: q, k, v as there, o and do [N, HQ, Tq, DV] (the same strides,
    unit last), lse [N, HQ, Tq] (fp32, natural log) -> (dq [N, HQ, Tq, DK] with q's strides,
    dk [N, H, Tk, DK], dv [N, H, Tk, DV]), in q's dtype. torch's cuDNN attention backward on
    CUDA (it takes the log-sum-exp as its forward returns it, [N, HQ, Tq, 1]); elsewhere, and
    for one query over one key (cuDNN's backward refuses Tq = Tk = 1: "s_q = s_kv = 1 is not
    supported", cuDNN 9.19), the same math in fp32."""
    if q.is_cuda and (q.shape[2], k.shape[2]) != (1, 1):
        seed = torch.zeros((), dtype=torch.int64, device=q.device)  # unread: no dropout
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            do, q, k, v, o, lse.unsqueeze(-1).contiguous(), seed, seed, None, None, None,
            q.shape[2], k.shape[2], 0.0, causal, scale=scale)
    return attention_math_bwd(q, k, v, o, lse, do, scale, q.shape[2] if causal else None)


class _Residues:
    """The residue form of the compressed attention at T tokens (see _residue_attention):
    NCF = (T - l + 1) // d queries a residue, the batch's rows r0 = l - 1 .. r1 = r0 + NCF * d,
    and views of one sequence's tensors in it (no copies)."""

    def __init__(self, spec: NSASpec, T: int):
        self.d = spec.d
        self.ncf = max(0, (T - spec.l + 1) // spec.d)
        self.r0, self.r1 = spec.l - 1, spec.l - 1 + self.ncf * spec.d

    def main(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, HQ, *] -> the batch's rows as [d, HQ, NCF, *]: residue r, position p is row
        r0 + p * d + r. (lse [T, HQ] -> [d, HQ, NCF].)"""
        x = x[self.r0:self.r1]
        x = x.view(self.ncf, self.d, *x.shape[1:])
        return x.permute(1, 2, 0, *range(3, x.dim()))

    def main_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `main` for [d, HQ, NCF, D]: [NCF * d, HQ, D] in row order (a view
        when x's memory is in row order, as cuDNN writes it)."""
        return x.permute(2, 0, 1, 3).reshape(self.ncf * self.d, x.shape[1], x.shape[3])

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, HQ, *] -> the rows after the batch as [1, HQ, T - r1, *]."""
        return x[self.r1:].transpose(0, 1).unsqueeze(0)

    @staticmethod
    def blocks(x: torch.Tensor) -> torch.Tensor:
        """One sequence's k_cmp or v_cmp [NC, H, D] -> [1, H, NC, D]."""
        return x.permute(1, 0, 2).unsqueeze(0)

    def main_blocks(self, kv: list[torch.Tensor]) -> list[torch.Tensor]:
        """The batch's blocks, the first NCF, broadcast over the d residues (stride 0)."""
        return [x[:, :, :self.ncf].expand(self.d, -1, -1, -1) for x in kv]


def _residue_attention(q, k_cmp, v_cmp, spec: NSASpec, o: torch.Tensor | None,
                       lse: torch.Tensor) -> RowPieces | None:
    """compression_fwd as batched causal attention (config CUDNN=1): lse into `lse`, the output
    into o, or with o None (B = 1) left where the attention wrote it, as RowPieces.

    Query t sees block i iff i * d + l - 1 <= t. With t = l - 1 + p * d + r (0 <= r < d) that
    is i <= p for every r: the d residues are a batch of plain causal attentions of NCF
    queries over the first NCF blocks, NCF = (T - l + 1) // d. The queries are a strided view
    of q ([d, HQ, NCF, DK], no copy) and the blocks are broadcast over the batch (stride 0),
    so a vendor kernel runs it whole; cuDNN's output comes in token order ([NCF, d, HQ, DV] in
    memory: the pieces' main rows without a copy). The < d tokens after those see every block
    (one non-causal call); those before l - 1 see none (o = 0, lse = -inf)."""
    B, T = q.shape[:2]
    check(o is not None or B == 1, "RowPieces hold one sequence: B must be 1 without o")
    rv = _Residues(spec, T)
    lse[:, :rv.r0].fill_(float("-inf"))
    for b in range(B):  # the residue view cannot fold a second batch dim into the first
        kv = [rv.blocks(x[b]) for x in (k_cmp, v_cmp)]
        main = tail = q.new_empty(0, spec.HQ, spec.DV)
        if rv.ncf:
            ob, lb = _attend(rv.main(q[b]), *rv.main_blocks(kv), spec.softmax_scale, causal=True)
            main = rv.main_rows(ob)  # a view where cuDNN wrote it
            rv.main(lse[b]).copy_(lb)
        if rv.r1 < T:
            ob, lb = _attend(rv.tail(q[b]), *kv, spec.softmax_scale, causal=False)
            tail = ob[0].permute(1, 0, 2).contiguous()
            rv.tail(lse[b]).copy_(lb)
        rows = RowPieces(main, tail, rv.r0, rv.r1, T)
        if o is None:
            return rows
        rows.write(o[b])
    return None


def _residue_attention_bwd(q, k_cmp, v_cmp, o, lse, do, spec: NSASpec, dq: torch.Tensor,
                           dk_cmp: torch.Tensor, dv_cmp: torch.Tensor) -> None:
    """compression_bwd in the residue form (config CUDNN=1), into dq, dk_cmp, dv_cmp: the
    attention backward of the forward's batch and of its tail (see _residue_attention), from
    any forward's o and lse. A block's gradient is the sum over the residues that see it
    (each residue's comes separately: the blocks are broadcast) and the tail's, in fp32."""
    B, T = q.shape[:2]
    rv = _Residues(spec, T)
    dq[:, :rv.r0].zero_()
    for b in range(B):
        kv = [rv.blocks(x[b]) for x in (k_cmp, v_cmp)]
        dkv = [torch.zeros(x.shape[1:], device=q.device, dtype=torch.float32) for x in kv]
        if rv.ncf:
            gq, *gkv = _attend_bwd(rv.main(q[b]), *rv.main_blocks(kv), rv.main(o[b]),
                                   rv.main(lse[b]), rv.main(do[b]), spec.softmax_scale, causal=True)
            dq[b, rv.r0:rv.r1] = rv.main_rows(gq)
            for acc, g in zip(dkv, gkv):
                acc[:, :rv.ncf] += g.float().sum(0)
        if rv.r1 < T:
            gq, *gkv = _attend_bwd(rv.tail(q[b]), *kv, rv.tail(o[b]), rv.tail(lse[b]),
                                   rv.tail(do[b]), spec.softmax_scale, causal=False)
            rv.tail(dq[b]).copy_(gq)
            for acc, g in zip(dkv, gkv):
                acc += g[0].float()
        for out, acc in zip((dk_cmp, dv_cmp), dkv):
            out[b] = acc.permute(1, 0, 2)


def compression_bwd(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, o: torch.Tensor,
                    lse: torch.Tensor, do: torch.Tensor, spec: NSASpec,
                    config: Config | None = None, cu_seqlens: torch.Tensor | None = None,
                    cu_seqlens_cmp: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `compression_fwd`: (dq [B, T, HQ, DK], dk_cmp [B, NC, H, DK],
    dv_cmp [B, NC, H, DV]), in the inputs' dtypes.

    o [B, T, HQ, DV], lse [B, T, HQ] (fp32): the forward's outputs; do: dL/do, like o.
    Queries that see no block get dq = 0. Deterministic: no float atomics; each compressed
    block's dk/dv is summed by one program over the tokens that see it (see
    templates/compression_bwd.py.j2). Gradients reach k and v through `compress_mean`
    (plain torch) by autograd. config CUDNN = 1 runs the residue form's attention backward
    through torch's cuDNN attention instead (`_residue_attention_bwd`; on the CPU, fp32
    math), which is not deterministic (cuDNN accumulates dq with atomics); it falls back to
    the kernels, with a warning, where compression_fwd's CUDNN does, and under
    torch.use_deterministic_algorithms(True).
    """
    NC = _check_cmp_inputs(q, k_cmp, v_cmp, spec, cu_seqlens, cu_seqlens_cmp)
    B, T = q.shape[:2]
    check_grad_inputs(spec, q, o, lse, do)
    config = config or kernel_def("compression_bwd").default(spec, T)
    config = cudnn_config("compression_bwd", config, q, spec, cu_seqlens)
    q, k_cmp, v_cmp, o, do, lse = (x.contiguous() for x in (q, k_cmp, v_cmp, o, do, lse))
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk_cmp = torch.empty(k_cmp.shape, device=q.device, dtype=q.dtype)
    dv_cmp = torch.empty(v_cmp.shape, device=q.device, dtype=q.dtype)
    if B * T == 0:
        return dq, dk_cmp, dv_cmp
    if NC == 0:  # no query sees any block
        return dq.zero_(), dk_cmp, dv_cmp
    if config.get("CUDNN", 0):
        try:
            _residue_attention_bwd(q, k_cmp, v_cmp, o, lse, do, spec, dq, dk_cmp, dv_cmp)
            return dq, dk_cmp, dv_cmp
        except RuntimeError as e:  # the kernels below write every element again
            config = cudnn_refused("compression_bwd", config, q, spec, e)
    # delta = rowsum(o * do) in fp32, written by the dq kernel for the dk/dv kernel.
    delta = torch.empty(lse.shape, device=q.device, dtype=torch.float32)
    mod = kernel_module("compression_bwd", spec, config)
    dkv_opts, prec = dkv_launch_options(config), dot_precision(q)
    tiles = tile_table(cu_seqlens, B, T, config["BLOCK_T"], spec.l, spec.d, q.device)
    mod.nsa_compression_bwd_kernel[(tiles.shape[0], spec.H)](
        q, k_cmp, v_cmp, o, do, lse, delta, dq, tiles, DOT_PRECISION=prec,
        **launch_options(config))
    cmp_tiles = cmp_tile_table(cu_seqlens, B, T, config["DKV_BLOCK_C"], spec.l, spec.d, q.device)
    # Token-range splits write fp32 partials, summed in split order: deterministic. A
    # sequence has at most T tokens, so ceil(T / split_t) splits cover it; a split past its
    # sequence's end writes zeros (its loops are empty).
    split = config.get("DKV_SPLIT_T", 0)
    split_t, n_split = dkv_splits(T, split, config["DKV_BLOCK_T"]) if split else (0, 1)
    if n_split == 1:
        # Unsplit, or one split covering every sequence (split_t >= T, e.g. a long-sequence
        # config at short T): the whole token loop in one program, storing its sums straight
        # into dk_cmp / dv_cmp (fp32 -> dtype once, as the partials' sum would), with no
        # fp32 partials to allocate and sum.
        mod.nsa_compression_bwd_dkv_kernel[(cmp_tiles.shape[0], spec.H, 1)](
            q, k_cmp, v_cmp, do, lse, delta, dk_cmp, dv_cmp, cmp_tiles, B * NC, split_t,
            DOT_PRECISION=prec, **dkv_opts)
        return dq, dk_cmp, dv_cmp
    dk_part, dv_part = _dkv_partials(n_split, k_cmp, v_cmp)
    mod.nsa_compression_bwd_dkv_kernel[(cmp_tiles.shape[0], spec.H, n_split)](
        q, k_cmp, v_cmp, do, lse, delta, dk_part, dv_part, cmp_tiles, B * NC, split_t,
        DOT_PRECISION=prec, **dkv_opts)
    dk_cmp.copy_(dk_part.sum(0))
    dv_cmp.copy_(dv_part.sum(0))
    return dq, dk_cmp, dv_cmp


def _dkv_partials(n_split: int, k_cmp: torch.Tensor, v_cmp: torch.Tensor) -> tuple:
    """fp32 per-split partial sums of dk_cmp and dv_cmp: [n_split, *k_cmp.shape], ..."""
    return (torch.empty((n_split, *k_cmp.shape), device=k_cmp.device, dtype=torch.float32),
            torch.empty((n_split, *v_cmp.shape), device=v_cmp.device, dtype=torch.float32))


class CompressionFunction(torch.autograd.Function):
    """Compressed attention, differentiable in q, k_cmp and v_cmp. Returns (o, lse); lse is
    not differentiable (the selection branch's top-n reads it, and indices carry no
    gradient)."""

    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, spec, fwd_config, bwd_config, cu_seqlens, cu_seqlens_cmp):
        o, lse = compression_fwd(q, k_cmp, v_cmp, spec, fwd_config, cu_seqlens, cu_seqlens_cmp)
        ctx.save_for_backward(q, k_cmp, v_cmp, o, lse, cu_seqlens, cu_seqlens_cmp)
        ctx.spec, ctx.bwd_config = spec, bwd_config
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k_cmp, v_cmp, o, lse, cu_seqlens, cu_seqlens_cmp = ctx.saved_tensors
        dq, dk_cmp, dv_cmp = compression_bwd(q, k_cmp, v_cmp, o, lse, do, ctx.spec,
                                             ctx.bwd_config, cu_seqlens, cu_seqlens_cmp)
        return dq, dk_cmp, dv_cmp, None, None, None, None, None
