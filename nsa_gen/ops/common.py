"""Checks and helpers shared by every launcher."""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

import torch

from ..kernels import dim_chunks, kernel_fn
from ..spec import NSASpec

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_tensor(name: str, x: torch.Tensor, shape: tuple, *, dtypes=FLOAT_DTYPES,
                 like: torch.Tensor | None = None) -> None:
    """`shape` entries are ints or None (any). `like` fixes device and dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != len(shape) or any(s is not None and s != xs for s, xs in zip(shape, x.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} has shape {list(x.shape)}, expected {want}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {x.dtype}, expected one of {', '.join(map(str, dtypes))}")
    if like is not None:
        if x.device != like.device:
            raise ValueError(f"{name} is on {x.device}, expected {like.device} (same as q)")
        if x.dtype in FLOAT_DTYPES and like.dtype in FLOAT_DTYPES and x.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {x.dtype}, expected {like.dtype} (same as q)")


def check_qkv(spec: NSASpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              kv_len: bool = True) -> tuple[int, int]:
    """q [B, T, HQ, DK], k [B, T, H, DK], v [B, T, H, DV] -> (B, T). With kv_len=False,
    k and v may have their own length (compressed keys)."""
    check_tensor("q", q, (None, None, spec.HQ, spec.DK))
    B, T = q.shape[:2]
    tk = T if kv_len else None
    check_tensor("k", k, (B, tk, spec.H, spec.DK), like=q)
    check_tensor("v", v, (B, k.shape[1], spec.H, spec.DV), like=q)
    return B, T


def check_grad_inputs(spec: NSASpec, q: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                      do: torch.Tensor) -> None:
    """A backward launcher's forward outputs and upstream gradient: o and do [B, T, HQ, DV]
    like q, lse [B, T, HQ] fp32."""
    B, T = q.shape[:2]
    check_tensor("o", o, (B, T, spec.HQ, spec.DV), like=q)
    check_tensor("do", do, (B, T, spec.HQ, spec.DV), like=q)
    check_tensor("lse", lse, (B, T, spec.HQ), dtypes=(torch.float32,))


def check_seqlens(cu_seqlens: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor | None:
    """Validate packed-sequence offsets (int32/int64 [N+1], 0 .. T, non-decreasing, B = 1);
    returns them as int64 on `device`, or None for a plain batch."""
    if cu_seqlens is None:
        return None
    check(B == 1, f"cu_seqlens needs B == 1 (packed sequences), got B = {B}")
    check_tensor("cu_seqlens", cu_seqlens, (None,), dtypes=(torch.int32, torch.int64))
    check(cu_seqlens.device == torch.device(device) or cu_seqlens.device.type == torch.device(device).type,
          f"cu_seqlens is on {cu_seqlens.device}, expected {device}")
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    check(cu.numel() >= 2 and int(cu[0]) == 0 and int(cu[-1]) == T,
          f"cu_seqlens must start at 0 and end at T = {T}")
    check(bool((cu[1:] >= cu[:-1]).all()), "cu_seqlens must be non-decreasing")
    return cu


def seq_start(cu_seqlens: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor | None:
    """For packed batches: int32 [T], the row of the first token of each token's sequence."""
    cu = check_seqlens(cu_seqlens, B, T, device)
    if cu is None:
        return None
    return torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=T).to(torch.int32)


# (kernel, reason) pairs fall_back has warned about: once each per process, not on every
# launch of a training loop.
_FALLBACKS_WARNED: set[tuple[str, str]] = set()
# Every fall_back, counted by (kernel, reason): the benchmark reports the launches that did
# not run the config it names (the warning above comes once; this counts all).
FALLBACK_COUNTS: collections.Counter[tuple[str, str]] = collections.Counter()


def fall_back(stem: str, config, why: str, detail: str = "", **changes):
    """`config` with `changes`, for a launch its config cannot serve as it is (`why` says
    why, `detail` adds this launch's numbers); logs a warning the first time a kernel falls
    back for that reason, and counts each time in FALLBACK_COUNTS."""
    FALLBACK_COUNTS[(stem, why)] += 1
    if (stem, why) not in _FALLBACKS_WARNED:
        _FALLBACKS_WARNED.add((stem, why))
        logging.getLogger("nsa_gen").warning(
            "%s: %s%s; launching with %s instead (warned once)", stem, why,
            f" ({detail})" if detail else "", " ".join(f"{k}={v}" for k, v in changes.items()))
    return config.replace(**changes)


# The CUDNN variants (compression_fwd/bwd through torch's cuDNN attention, window_fwd/bwd
# through the cuDNN frontend's band): the launches (kernel, device, dtype, heads, head dims,
# B, T) for which cuDNN raised go to the kernels from then on, without trying cuDNN again.
# Keyed by the whole shape, because cuDNN refuses shapes, not head dims alone (9.19's backward
# refuses one query over one key), and may take a shape forward and refuse it backward: one
# odd length must not switch the variant off for every other.
_CUDNN_REFUSED: set[tuple] = set()


def _cudnn_key(stem: str, q: torch.Tensor, spec: NSASpec) -> tuple:
    return (stem, q.device, q.dtype, spec.HQ, spec.H, spec.DK, spec.DV, *q.shape[:2])


def cudnn_refused(stem: str, config, q: torch.Tensor, spec: NSASpec, e: Exception):
    """cuDNN refused this GPU, shape or version: the kernels instead, for these inputs now
    and from now on."""
    _CUDNN_REFUSED.add(_cudnn_key(stem, q, spec))
    return fall_back(stem, config, "cuDNN attention failed", str(e)[:120], CUDNN=0)


def cudnn_config(stem: str, config, q: torch.Tensor, spec: NSASpec, cu_seqlens,
                 unavailable: str | None = None):
    """`config`, with CUDNN off (and a warning, once) where its cuDNN call cannot run:
    packed sequences (their lengths would be read back to the host), a CUDA input cuDNN
    attention does not take (fp32), `unavailable` (a reason, e.g. a library not installed),
    one it refused before, or, backward, under torch.use_deterministic_algorithms (cuDNN's
    backward accumulates dq with atomics)."""
    if not config.get("CUDNN", 0):
        return config
    if cu_seqlens is not None:
        return fall_back(stem, config, "CUDNN=1 runs without cu_seqlens", CUDNN=0)
    if q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16):
        return fall_back(stem, config, f"cuDNN attention needs 16-bit inputs, not {q.dtype}",
                         CUDNN=0)
    if unavailable:
        return fall_back(stem, config, unavailable, CUDNN=0)
    if stem.endswith("_bwd") and torch.are_deterministic_algorithms_enabled():
        return fall_back(stem, config, "deterministic algorithms requested", CUDNN=0)
    if _cudnn_key(stem, q, spec) in _CUDNN_REFUSED:
        return fall_back(stem, config, "cuDNN attention refused these inputs before", CUDNN=0)
    return config


def _math_scores(q, k, v, scale: float, window: int | None) -> tuple:
    """The math stand-in's fp32 scores [N, HQ, Tq, Tk] (-inf where hidden by `window`), with
    k and v in fp32 repeated to the query heads."""
    G = q.shape[1] // k.shape[1]
    kf, vf = k.float().repeat_interleave(G, 1), v.float().repeat_interleave(G, 1)
    s = q.float() @ kf.transpose(-1, -2) * scale
    if window is not None:
        i = torch.arange(s.shape[-2], device=s.device)[:, None]
        j = torch.arange(s.shape[-1], device=s.device)[None, :]
        s = s.masked_fill((j > i) | (j <= i - window), float("-inf"))
    return s, kf, vf


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention in fp32 math, the stand-in for a cuDNN call off CUDA (the interpreter's
    tests): q [N, HQ, Tq, DK], k [N, H, Tk, DK], v [N, H, Tk, DV] (H divides HQ) -> (o
    [N, HQ, Tq, DV] in q's dtype, lse [N, HQ, Tq] fp32, natural log). window: None, every
    key; w, query i sees keys i - w < j <= i (w >= Tq: causal). Every query must see a key."""
    s, _, vf = _math_scores(q, k, v, scale, window)
    lse = torch.logsumexp(s, -1)
    return (torch.exp(s - lse[..., None]) @ vf).to(q.dtype), lse


def attention_math_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, do: torch.Tensor, scale: float, window: int | None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `attention_math` from its o and lse: o and do [N, HQ, Tq, DV] -> (dq
    [N, HQ, Tq, DK] with q's strides, dk [N, H, Tk, DK], dv [N, H, Tk, DV]), in q's dtype."""
    N, H = q.shape[0], k.shape[1]
    G = q.shape[1] // H
    s, kf, vf = _math_scores(q, k, v, scale, window)
    qf = q.float()
    p = torch.exp(s - lse[..., None])
    dof = do.float()
    ds = p * (dof @ vf.transpose(-1, -2) - (dof * o.float()).sum(-1, keepdim=True))
    dq = torch.empty_like(q).copy_(ds @ kf * scale)  # empty_like keeps q's strides, as cuDNN's

    def group_sum(x):
        return x.view(N, H, G, *x.shape[2:]).sum(2).to(q.dtype)
    return dq, group_sum(ds.transpose(-1, -2) @ qf * scale), group_sum(p.transpose(-1, -2) @ dof)


def tma_config(stem: str, config, *tensors: torch.Tensor):
    """`config`, with TMA off (and a warning, once) when a tensor its descriptors would
    cover does not start 16-byte aligned, as the tensor memory accelerator needs."""
    if config.get("TMA", 0) and any(t.data_ptr() % 16 for t in tensors):
        return fall_back(stem, config, "an input is not 16-byte aligned", TMA=0)
    return config


def tile_descriptors(x: torch.Tensor, rows: int, widths) -> list:
    """Host TMA descriptors over a contiguous x [..., H, D] seen as [N, H*D], one for each
    width w in `widths`, each with boxes of [rows, w]. A kernel loads box (r, h * D + off):
    rows r.. of head h, columns off..; rows past N read as 0."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    x2 = x.view(-1, x.shape[-2] * x.shape[-1])
    return [TensorDescriptor(x2, list(x2.shape), list(x2.stride()), [rows, w]) for w in widths]


def tile_args(config, rows: int, *pairs: tuple[torch.Tensor, list[int]]) -> list:
    """A kernel's tile-loaded tensor arguments, from (tensor, widths) pairs: the tensors, or
    with config TMA, for each tensor one descriptor per width with `rows`-row boxes."""
    if not config["TMA"]:
        return [t for t, _ in pairs]
    return [d for t, widths in pairs for d in tile_descriptors(t, rows, widths)]


def dim_widths(D: int) -> list[int]:
    """The sizes of dim_chunks(D): a kernel's exact power-of-two pieces of a head dim."""
    return [w for _, w in dim_chunks(D)]


def kv_tile_args(k: torch.Tensor, v: torch.Tensor, spec: NSASpec, config, rows: int) -> list:
    """The K/V arguments of a token-tile kernel (compressed or window attention): k, v; with
    config TMA, descriptors with `rows`-row boxes, one per dim_chunks piece of DK, then DV."""
    return tile_args(config, rows, (k, dim_widths(spec.DK)), (v, dim_widths(spec.DV)))


def token_tile_fwd(stem: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, spec: NSASpec, config, cu_seqlens: torch.Tensor | None,
                   kv_rows: str) -> None:
    """Launch a token-tile attention forward (compression_fwd over the compressed keys,
    window_fwd over the keys) into o [B, T, HQ, DV] and lse [B, T, HQ]: one program per
    BLOCK_T-token tile and kv head; `kv_rows` names the config parameter that sizes the
    K/V boxes with TMA (BLOCK_C, BLOCK_N)."""
    B, T = q.shape[:2]
    tiles = tile_table(cu_seqlens, B, T, config["BLOCK_T"], spec.l, spec.d, q.device)
    config = tma_config(stem, config, k, v)
    kernel_fn(stem, spec, config)[(tiles.shape[0], spec.H)](
        q, *kv_tile_args(k, v, spec, config, config[kv_rows]), o, lse, tiles,
        DOT_PRECISION=dot_precision(q), **launch_options(config))


def launch_options(config) -> dict:
    """Triton launch options of a config: num_warps, num_stages, and ptxas' register cap
    `maxnreg` where the config has MAXNREG > 0 (a cap that lets one more program share an SM:
    a latency-bound kernel may gain more from the extra warps than it loses to spills)."""
    opts = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if config.get("MAXNREG", 0):
        opts["maxnreg"] = config["MAXNREG"]
    return opts


def dkv_launch_options(config) -> dict:
    """Launch options of a backward module's dk/dv kernel: its own DKV_WARPS and DKV_STAGES
    where the config has them (its tiles differ from the dq kernel's, and so do its best warp
    and stage counts)."""
    return {"num_warps": config.get("DKV_WARPS", config.num_warps),
            "num_stages": config.get("DKV_STAGES", config.num_stages)}


_SIDE_STREAMS: dict[int, "torch.cuda.Stream"] = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    """A high-priority stream of `device`, one per device for the process: its short kernels
    go ahead of the blocks a long kernel on the current stream has yet to place."""
    i = device.index if device.index is not None else torch.cuda.current_device()
    s = _SIDE_STREAMS.get(i)
    if s is None:
        # Lower is higher; torch maps a number past the range to its nearest end.
        s = _SIDE_STREAMS[i] = torch.cuda.Stream(i, priority=-1)
    return s


def mark(device) -> "torch.cuda.Event | None":
    """An event after the work the current stream of `device` has queued so far (None off
    CUDA), for `ahead(after=...)`."""
    if torch.device(device).type != "cuda":
        return None
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(device))
    return ev


def ahead(build, items, device, *, overlap: bool = True, after=None):
    """build(item) (a tuple of tensors and plain values) for each item, handed over in order
    by the iterator this returns. On a CUDA device with overlap, every build is enqueued now
    on a side stream, after the work the current stream has queued so far (or only up to the
    `mark` `after`), and the current stream waits for each build alone as the iterator
    yields it; elsewhere each build runs when its turn comes. For many small launches that
    depend only on inputs ready now (the query-batched block lists, the backward's inverted
    selection): they run beside the kernels the caller launches meanwhile, not between them.
    A build that reads a value to the host waits only for the side stream."""
    if device.type != "cuda" or not overlap:
        return (build(item) for item in items)
    main, side = torch.cuda.current_stream(device), _side_stream(device)
    if after is not None:
        side.wait_event(after)
    else:
        side.wait_stream(main)
    built = []
    with torch.cuda.stream(side):
        for item in items:
            out = build(item)
            done = torch.cuda.Event()
            done.record(side)
            built.append((out, done))
    return _hand_over(built, main, side)


def _hand_over(built: list, main, side):
    try:
        for out, done in built:
            main.wait_event(done)
            # Made on the side stream, read on this one: the allocator must not reuse them
            # until this stream is past its last use.
            for t in out:
                if isinstance(t, torch.Tensor):
                    t.record_stream(main)
            yield out
    finally:
        # On the way out, and above all when left early (an error in the caller, or a zip
        # that stops first): the side stream may still read the caller's inputs, which must
        # outlive that.
        main.wait_stream(side)


_TABLES: dict[tuple, torch.Tensor] = {}


def _table(build, cu_seqlens: torch.Tensor | None, B: int, T: int, block: int, l: int, d: int,
           device) -> torch.Tensor:
    """A batch of B equal sequences is the packed case with cu_seqlens = [0, T, 2T, ...], so
    kernels have one code path. Fixed-length tables are cached: building one takes several
    small launches and a host sync, as long as a short kernel."""
    if cu_seqlens is not None:
        return build(cu_seqlens.to(device=device, dtype=torch.int64), block, l, d, device)
    key = (build.__name__, B, T, block, l, d, str(device))
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) > 256:
            _TABLES.clear()
        cu = torch.arange(B + 1, device=device, dtype=torch.int64) * T
        table = _TABLES[key] = build(cu, block, l, d, device)
    return table


def _tiles(lens: torch.Tensor, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut sequences of `lens` items into tiles of `block`: (sequence, index in sequence)."""
    per_seq = torch.div(lens + block - 1, block, rounding_mode="floor")
    seq = torch.repeat_interleave(torch.arange(lens.numel(), device=device), per_seq)
    first_tile = torch.cat([per_seq.new_zeros(1), per_seq.cumsum(0)])[:-1]
    return seq, torch.arange(seq.numel(), device=device) - first_tile[seq]


def tile_table(cu_seqlens: torch.Tensor | None, B: int, T: int, block_t: int, l: int, d: int,
               device) -> torch.Tensor:
    """int32 [n_tiles, 4] for kernels whose programs own BLOCK_T tokens of one sequence:
    (first row of the tile, first row of its sequence, end row of its sequence, first row of
    the sequence's compressed blocks in the packed k_cmp). Rows are b * T + t; a tile never
    straddles two sequences."""
    return _table(_token_tiles, cu_seqlens, B, T, block_t, l, d, device)


def _token_tiles(cu: torch.Tensor, block_t: int, l: int, d: int, device) -> torch.Tensor:
    cu_cmp = cmp_seqlens(cu, l, d).to(torch.int64)
    seq, i = _tiles(cu[1:] - cu[:-1], block_t, device)
    table = torch.stack([cu[seq] + i * block_t, cu[seq], cu[seq + 1], cu_cmp[seq]], 1)
    return table.to(torch.int32).contiguous()


def cmp_tile_table(cu_seqlens: torch.Tensor | None, B: int, T: int, block_c: int, l: int, d: int,
                   device) -> torch.Tensor:
    """int32 [n_tiles, 5] for kernels whose programs own BLOCK_C compressed blocks of one
    sequence (the dk/dv pass of compressed attention): (first row of the tile in the packed
    k_cmp, first row of its sequence's blocks, end row of its sequence's blocks, first token
    row of the sequence, end token row of the sequence). Sequences without a block (shorter
    than l) have no tile."""
    return _table(_cmp_tiles, cu_seqlens, B, T, block_c, l, d, device)


def _cmp_tiles(cu: torch.Tensor, block_c: int, l: int, d: int, device) -> torch.Tensor:
    cu_cmp = cmp_seqlens(cu, l, d).to(torch.int64)
    seq, i = _tiles(cu_cmp[1:] - cu_cmp[:-1], block_c, device)
    table = torch.stack([cu_cmp[seq] + i * block_c, cu_cmp[seq], cu_cmp[seq + 1],
                         cu[seq], cu[seq + 1]], 1)
    return table.to(torch.int32).contiguous()


def cmp_seqlens(cu_seqlens: torch.Tensor, l: int, d: int) -> torch.Tensor:
    """cu_seqlens of the packed compressed sequence: blocks never cross a sequence boundary."""
    cu = cu_seqlens.to(torch.int64)
    lens = cu[1:] - cu[:-1]
    n_cmp = torch.where(lens >= l, torch.div(lens - l, d, rounding_mode="floor") + 1, 0)
    return torch.cat([n_cmp.new_zeros(1), n_cmp.cumsum(0)]).to(torch.int32)


@dataclass(frozen=True)
class RowPieces:
    """A branch output o [1, T, HQ, DV] held in pieces, as a vendor kernel left it (uncopied):
    rows t < r0 are 0, rows r0 <= t < r1 are main[t - r0], rows t >= r1 are tail[t - r1].
    main [r1 - r0, HQ, DV] and tail [T - r1, HQ, DV] are contiguous."""
    main: torch.Tensor
    tail: torch.Tensor
    r0: int
    r1: int
    T: int

    def write(self, o: torch.Tensor) -> None:
        """Copy the rows into one sequence's o [T, HQ, DV], zeros included."""
        o[:self.r0].zero_()
        o[self.r0:self.r1] = self.main
        o[self.r1:] = self.tail

    def full(self) -> torch.Tensor:
        """o [1, T, HQ, DV] as one tensor."""
        o = self.main.new_empty(1, self.T, *self.main.shape[1:])
        self.write(o[0])
        return o


def outputs(out: tuple[torch.Tensor, torch.Tensor] | None, o_shape: tuple, lse_shape: tuple,
            like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) for a forward launcher: fresh tensors, or the caller's `out` pair checked to be
    contiguous, o of like's dtype and lse fp32 (tests pass NaN-filled ones so that an element
    the kernel never writes shows up)."""
    if out is None:
        return (torch.empty(o_shape, device=like.device, dtype=like.dtype),
                torch.empty(lse_shape, device=like.device, dtype=torch.float32))
    o, lse = out
    check_tensor("out[0]", o, o_shape, like=like)
    check_tensor("out[1]", lse, lse_shape, dtypes=(torch.float32,))
    check(o.is_contiguous() and lse.is_contiguous() and lse.device == like.device,
          "out tensors must be contiguous and on q's device")
    return o, lse


def dot_precision(x: torch.Tensor) -> str | None:
    """tl.dot input precision: fp32 inputs get full fp32 ("ieee", no tf32) so that fp32 runs
    match the reference to ~1e-6; 16-bit inputs use the default (None)."""
    return "ieee" if x.dtype == torch.float32 else None
