"""Selected attention (the `slc` branch): launchers and autograd wrapper."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Config
from ..kernels import (TOPN_INDEX_BITS, kernel_def, kernel_fn, kernel_module, next_pow2,
                       token_group_pad, topn_bc, topn_index_bits)
from ..spec import NSASpec
from .common import (ahead, check, check_grad_inputs, check_qkv, check_seqlens, check_tensor,
                     launch_options, dim_widths, fall_back, mark, seq_start, tile_args,
                     tile_table, tma_config, RowPieces)
from .gate import check_branches


def selection_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor,
                  spec: NSASpec, config: Config | None = None,
                  cu_seqlens: torch.Tensor | None = None, *,
                  canonical: bool = False, forced_listed: bool = False,
                  gates: dict[str, torch.Tensor] | None = None,
                  outs: dict[str, torch.Tensor] | None = None,
                  after=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over its selected key blocks.

    q [B, T, HQ, DK], k [B, T, H, DK], v [B, T, H, DV]; block_indices [B, T, H, S] int32,
    block j covering tokens [j*BS, (j+1)*BS) of the token's sequence, -1 = empty slot.
    Keys after the query are masked; a block listed twice counts once. cu_seqlens (int32
    [N+1], B = 1) packs sequences. config: defaults to the kernel's heuristic. canonical:
    block_indices are already as `visible_blocks` returns them (skips that pass).
    forced_listed: every token's list holds all of the spec's forced blocks it can see (the
    initial ones and the local ones up to its own), as `topn` writes them; a config with
    FORCED > 0 needs this (without it, it runs as FORCED = 0, with a warning once).
    gates, outs: store NSA's gated sum instead of this branch's output, o = sum over the
    branches b of gates[b][..., None] * o_b, as gate_fwd computes it (the group-centric
    kernel in its epilogue, the query-batched one in its combine kernel); gates holds "slc"
    and the other branches' gates [B, T, HQ], outs those branches' outputs [B, T, HQ, DV]
    (q's dtype). Not differentiable: for inference.
    after: a `common.mark` taken once block_indices were ready; the query-batched kernel's
    block lists are built on a side stream from it on (default: after all work queued now),
    so they can run beside what the caller queued since (nsa()'s window branch).
    Returns o [B, T, HQ, DV] (q's dtype) and lse [B, T, HQ] (fp32, natural log; -inf where
    no key was visible).
    """
    B, T = check_qkv(spec, q, k, v)
    check_tensor("block_indices", block_indices, (B, T, spec.H, spec.S),
                 dtypes=(torch.int32,))
    config = config or kernel_def("selection_fwd").default(spec, T)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    starts = seq_start(cu_seqlens, B, T, q.device)
    if not canonical or starts is not None:
        after = None  # the lists read what is made here
    if not canonical:
        block_indices = visible_blocks(block_indices, spec, starts)
    o = torch.empty(B, T, spec.HQ, spec.DV, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, T, spec.HQ, device=q.device, dtype=torch.float32)
    if B * T == 0:
        return o, lse
    config = tma_config("selection_fwd", config, k, v)
    config = kernel_def("selection_fwd").canonical(spec, config)
    gate_args = {}
    if gates is not None:
        gate_args = _gate_args(gates, outs or {}, spec, o)
        config = config.replace(GATED=1)
    if config["FORCED"] and not forced_listed:
        config = fall_back("selection_fwd", config, "FORCED needs block lists that hold every "
                           "forced block (forced_listed=True, as topn's do)", FORCED=0)
    mod = kernel_module("selection_fwd", spec, config)
    if config["BLOCK_Q"]:
        # Enqueued before the forced pass, which they need not wait for.
        tables = _query_tables(mod, q, block_indices, spec, config, cu_seqlens, starts, after)
    if config["FORCED"]:
        # The forced blocks first, a token tile a program; the kernels below start from the
        # state this leaves in o and lse.
        tiles = tile_table(cu_seqlens, B, T, config["FORCED"] // token_group_pad(spec),
                           spec.l, spec.d, q.device)
        mod.nsa_selection_fwd_forced_kernel[(tiles.shape[0], spec.H)](
            q, *_kv_args(k, v, spec, config.replace(BLOCK_Q=0)), o, lse, tiles,
            **dict(launch_options(config), **FORCED_LAUNCH))
    if config["BLOCK_Q"]:
        _selection_fwd_query(mod, q, k, v, block_indices, spec, config, starts, o, lse, gate_args,
                             tables)
        return o, lse
    kv = _kv_args(k, v, spec, config)
    # Group-centric: SHARE consecutive tokens a program (kernels._slc_fwd_space).
    mod.nsa_selection_fwd_kernel[(-(-T // config["SHARE"]), B * spec.H)](
        q, *kv, block_indices, o, lse, starts if starts is not None else q, T,
        IS_VARLEN=starts is not None, **gate_args, **launch_options(config))
    return o, lse


def _gate_args(gates: dict, outs: dict, spec: NSASpec, o: torch.Tensor) -> dict:
    """The gated kernel's extra arguments by name: g_slc, o_cmp, g_cmp, o_swa, g_swa (o
    standing in for an absent branch's, never read), and their HAS_ flags."""
    check(isinstance(outs, dict) and "slc" not in outs,
          "outs holds the other branches' outputs: this kernel computes o_slc")
    # The gated sum's own rules (gate_fwd's): the spec's branches, a gate for each output.
    check_branches({**outs, "slc": o}, gates, spec)
    shape = tuple(o.shape[:3])
    args = {"g_slc": _gate_tensor("gates['slc']", gates["slc"], shape, o)}
    for name in ("cmp", "swa"):
        has = name in gates
        x = outs.get(name)
        if isinstance(x, RowPieces) and name == "cmp":  # compression_fwd's pieces, uncopied
            check(shape[0] == 1 and x.T == shape[1] and x.main.shape[1:] == (spec.HQ, spec.DV)
                  and x.main.dtype == o.dtype and x.main.device == o.device,
                  "outs['cmp'] pieces do not match the output")
            # An empty piece is never read; the other stands in for its pointer.
            main = x.main if x.main.numel() else x.tail
            args.update(o_cmp=main, o_cmp_tail=x.tail if x.tail.numel() else main,
                        cmp_r0=x.r0, cmp_r1=x.r1)
        else:
            args[f"o_{name}"] = _gate_tensor(f"outs['{name}']", x, shape + (spec.DV,), o) if has else o
            if name == "cmp":  # one tensor: every row from o_cmp
                args.update(o_cmp_tail=args["o_cmp"], cmp_r0=0, cmp_r1=shape[0] * shape[1])
        args[f"g_{name}"] = _gate_tensor(f"gates['{name}']", gates[name], shape, o) if has else o
        args[f"HAS_{name.upper()}"] = int(has)
    return args


def _gate_tensor(name: str, x: torch.Tensor, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    check_tensor(name, x, shape, like=like)
    return x.contiguous()


def _kv_args(k: torch.Tensor, v: torch.Tensor, spec: NSASpec, config: Config) -> list:
    """The K/V arguments of a selection_fwd kernel: k, v; with config TMA, host tensor
    descriptors over k [B*T, H*DK] and v [B*T, H*DV] with BLOCK_N-row boxes (the
    group-centric kernel takes one K descriptor per dim_chunks(DK) piece, the query-batched
    one a single box of next_pow2(DK) columns)."""
    pieces = dim_widths(spec.DK) if not config["BLOCK_Q"] else [next_pow2(spec.DK)]
    return tile_args(config, config["BLOCK_N"], (k, pieces), (v, [next_pow2(spec.DV)]))


def visible_blocks(block_indices: torch.Tensor, spec: NSASpec,
                   starts: torch.Tensor | None) -> torch.Tensor:
    """block_indices [B, T, H, S] as the kernels take them: each block at most once per token
    and kv head (naive_selection reads the list as a set) and only blocks with a key at or
    before the token (the block holding it or an earlier one); every other slot becomes -1.
    Slots are reordered as `topn` writes them, ascending with the -1 slots last (the kernels
    read them as a set), so topn's output is its own canonical form. starts: seq_start's
    rows for packed sequences."""
    T = block_indices.shape[1]
    pos = torch.arange(T, device=block_indices.device, dtype=torch.int32)
    if starts is not None:
        pos = pos - starts
    own = (pos // spec.BS)[None, :, None, None]
    empty = torch.iinfo(torch.int32).max
    idx = torch.where((block_indices < 0) | (block_indices > own), empty, block_indices)
    idx = idx.sort(-1).values
    repeat = torch.zeros_like(idx, dtype=torch.bool)
    repeat[..., 1:] = idx[..., 1:] == idx[..., :-1]
    # A second sort, not a cumsum-and-scatter compaction: on the H200 that took 4.1 ms at
    # small-group, 64k, against 0.56 for two sorts of 16-slot rows (RESULTS runs 8, 29).
    idx = torch.where(repeat, empty, idx).sort(-1).values
    return torch.where(idx == empty, -1, idx).contiguous()


# Most bytes of (token, slot) partials the query-batched forward keeps at once; longer inputs
# are done in row chunks. 2 GiB: 8192 tokens of deepseek-nsa (64 heads of 128 dims, 16 slots);
# at small-group, 64k, 1 GiB cost 15.0 ms against 13.8 at 4 GiB (per-chunk steps).
QUERY_PART_BYTES = 2 << 30
# Launch options of the kernels outside the tuned config: the forced pass (4 warps: the best
# of 2, 4 and 8 for both G = 16 specs at 64k, H200, RESULTS run 26) and the query-batched
# forward's combine kernel (one token a program, a streaming pass). Module constants so that
# benchmarks/launch_probe.py can measure others in place.
FORCED_LAUNCH = {"num_warps": 4}
COMBINE_LAUNCH = {"num_warps": 4, "num_stages": 1}
# Build the query-batched forward's block lists and the backward's inverted selection on a
# side stream (`common.ahead`); False builds them in line, as before session 27
# (benchmarks/ahead_ab.py's baseline).
OVERLAP_LISTS = True


def query_chunk_rows(spec: NSASpec, element_size: int) -> int:
    """Rows (tokens) per chunk of the query-batched forward: partials within QUERY_PART_BYTES."""
    per_row = spec.HQ * spec.S * (spec.DV * element_size + 4)
    # A multiple of 64, so every chunk's first row has the same divisibility for Triton's
    # integer specialisation: one compile.
    return max(64, QUERY_PART_BYTES // per_row // 64 * 64)


def query_chunks(spec: NSASpec, rows: int, element_size: int) -> list[tuple[int, int]]:
    """Row ranges (r0, r1) of the query-batched forward over `rows` rows, query_chunk_rows
    each; a last range of less than 1/8 of that joins the one before it (at small-group,
    16k: one chunk of 16384 rows, not 16128 and 256), 12.5% over the budget at most."""
    chunk = query_chunk_rows(spec, element_size)
    ends = list(range(chunk, rows, chunk)) + [rows]
    if len(ends) > 1 and (ends[-1] - ends[-2]) * 8 < chunk:
        del ends[-2]
    return list(zip([0] + ends[:-1], ends))


def _query_tables(mod, q, block_indices, spec, config, cu_seqlens, starts, after=None):
    """The row chunks of q's query-batched forward and, for each in turn, its block lists'
    entries and segment table (`_query_lists` with `mod`, config's selection_fwd module), as
    `ahead` hands them over (after the `mark` `after` if given)."""
    B, T = q.shape[:2]
    chunks = query_chunks(spec, B * T, q.element_size())
    table: list[BlockTable | None] = []

    def build(rows):
        if not table:  # made by the first build, where the builds run (after `after`)
            packed = starts is not None
            table.append(block_table(spec, B, T, cu_seqlens, q.device) if packed else None)
        return _query_lists(mod, block_indices, spec, T, table[0], starts, rows, config["BLOCK_Q"])
    # Five launches a chunk (a sort and four small kernels): on a side stream they run
    # beside the forced pass and the earlier chunks' kernels.
    return chunks, ahead(build, chunks, q.device, overlap=OVERLAP_LISTS, after=after)


# Pairs, bins or segments a program of the block lists' kernels takes.
LIST_BLOCK = 1024


def _query_lists(mod, block_indices: torch.Tensor, spec: NSASpec, T: int,
                 table: BlockTable | None, starts: torch.Tensor | None, rows: tuple[int, int],
                 seg: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The query-batched forward's block lists of rows r0 .. r1 - 1 of visible_blocks'
    [B, T, H, S] indices, by the list kernels of `mod` (a query-batched selection_fwd
    module; with its config's FORCED, the forced blocks are left out). table: the packed
    batch's BlockTable (starts: its seq_start), or None for B sequences of T rows.

    Returns entries int32 [E]: (row - r0) * H * S + h * S + slot, grouped by block (kv head
    major), tokens ascending within one, the empty (and forced) slots last; and segments
    int32 [n, 6] as nsa_selection_fwd_kernel reads them (kv head, first key row, offset in
    entries, count <= seg, 0, end row of the block's sequence), n a bound known without
    reading the GPU: rows past the real segments have count 0.
    """
    B, _, H, S = block_indices.shape
    (r0, r1), dev = rows, block_indices.device
    n_blk = table.key_row.numel() if table is not None else B * -(-T // spec.BS)
    n_bin, n_pairs = H * n_blk, (r1 - r0) * H * S
    varlen = table is not None
    # Bins, not key rows, as keys: BS times fewer, so 16 bits hold them up to 32k bins (64k
    # tokens of 8 kv heads at BS = 64), and the radix sort takes half the passes.
    key = torch.empty(n_pairs, device=dev, dtype=_key_type(n_bin))
    mod.nsa_selection_fwd_bins_kernel[(-(-n_pairs // LIST_BLOCK),)](
        block_indices, key, table.row_block if varlen else key, starts if varlen else key,
        r0, r1 - r0, T, n_blk, IS_VARLEN=varlen, BLOCK=LIST_BLOCK)
    sorted_key, order = torch.sort(key, stable=True)  # stable: tokens stay ascending
    # int32, as the torch steps before these kernels handed them over: with the sort's int64
    # order (the lists otherwise equal), small-group's forward at 64k took 20.4-20.5 ms
    # against their 19.7 (H200, RESULTS run 56).
    entries = order.to(torch.int32)
    # Each bin's first pair by binary search in the sorted keys, not by counting: an atomic
    # count serialises on the bin of the empty slots, which with the forced slots left out
    # holds 3/16 of them (+1.1 ms at small-group, 64k, H200).
    first = torch.empty(n_bin + 1, device=dev, dtype=torch.int32)
    mod.nsa_selection_fwd_edges_kernel[(-(-(n_bin + 1) // LIST_BLOCK),)](
        sorted_key, first, n_pairs, n_bin, n_pairs.bit_length(), BLOCK=LIST_BLOCK)
    seg_end = torch.empty(n_bin, device=dev, dtype=torch.int32)
    mod.nsa_selection_fwd_scan_kernel[(1,)](first, seg_end, n_bin, BLOCK=LIST_BLOCK)
    # Segments <= pairs / seg + one per non-empty bin.
    n_seg = n_pairs // seg + 1 + min(n_pairs, n_bin)
    segments = torch.empty(n_seg, 6, device=dev, dtype=torch.int32)
    mod.nsa_selection_fwd_segments_kernel[(-(-n_seg // LIST_BLOCK),)](
        first, seg_end, segments, table.key_row if varlen else first,
        table.row_end if varlen else first, n_bin, n_seg, T, n_blk, n_bin.bit_length(),
        IS_VARLEN=varlen, BLOCK=LIST_BLOCK)
    return entries, segments


def _selection_fwd_query(mod, q, k, v, block_indices, spec, config, starts, o, lse, gate_args,
                         tables):
    """The query-batched forward (config BLOCK_Q > 0), one chunk of rows at a time, with the
    chunks' inverted selections from `_query_tables`: compute one partial per (token, slot),
    combine each token's slots (storing the gated sum when gate_args are given). Nothing here
    waits for the GPU: the segment grid is an upper bound, spare programs idle."""
    B, T = q.shape[:2]
    forced = config["FORCED"] > 0
    chunks, built = tables
    n_part = max(r1 - r0 for r0, r1 in chunks) * spec.H * spec.S
    o_part = torch.empty(n_part, spec.G, spec.DV, device=q.device, dtype=q.dtype)
    lse_part = torch.empty(n_part, spec.G, device=q.device, dtype=torch.float32)
    kv = _kv_args(k, v, spec, config)
    # With FORCED, the forced pass's state in o and lse stands for the forced slots.
    pos_args = [starts if starts is not None else q, T, starts is not None] if forced else []
    for (r0, r1), (entries, segments) in zip(chunks, built):
        mod.nsa_selection_fwd_kernel[(segments.shape[0],)](
            q, *kv, entries, segments, o_part, lse_part, r0, **launch_options(config))
        mod.nsa_selection_fwd_combine_kernel[(r1 - r0,)](
            block_indices, o_part, lse_part, o, lse, r0, *pos_args, **gate_args, **COMBINE_LAUNCH)


# The sort keys of the block lists: the narrowest type that holds every bin and the empty one.
KEY_TYPES = (torch.int16, torch.int32, torch.int64)


def _key_type(n_bin: int) -> torch.dtype:
    return next(t for t in KEY_TYPES if n_bin < torch.iinfo(t).max)


@dataclass(frozen=True)
class BlockTable:
    """The K/V blocks of a batch, numbered across its sequences: block g of NBLK (a bound,
    known without reading the GPU; the numbers past the real blocks stand for none).
    row_block int32 [B*T]: the number of the first block of each row's sequence (a token's
    block j is row_block + j); key_row, row_end [NBLK] (int32, int64 from 2^31 rows on):
    each block's first key row and the end row of its sequence."""
    row_block: torch.Tensor
    key_row: torch.Tensor
    row_end: torch.Tensor


def block_table(spec: NSASpec, B: int, T: int, cu_seqlens: torch.Tensor | None,
                device) -> BlockTable:
    """The BlockTable of B sequences of T rows, or with cu_seqlens (int32 [N+1], B = 1) of
    N packed ones; blocks of BS keys, the last one of a sequence possibly partial."""
    # int32 while rows fit: the segment tables gather from these, and are int32.
    it = torch.int32 if B * T + spec.BS < 2 ** 31 else torch.int64
    if cu_seqlens is None:
        nj = -(-T // spec.BS)
        row = torch.arange(B * T, device=device, dtype=it)
        g = torch.arange(B * nj, device=device, dtype=it)
        seq_row0 = g // nj * T
        return BlockTable((row // T * nj).to(torch.int32), seq_row0 + g % nj * spec.BS, seq_row0 + T)
    cu = cu_seqlens.to(device=device, dtype=it)
    lens = cu[1:] - cu[:-1]
    nj = torch.div(lens + spec.BS - 1, spec.BS, rounding_mode="floor")
    last = torch.cumsum(nj, 0, dtype=it)  # one past each sequence's last block
    base = last - nj
    seq_of_row = torch.repeat_interleave(torch.arange(lens.numel(), device=device), lens,
                                         output_size=T)
    # Each sequence of n rows has ceil(n / BS) <= n // BS + 1 blocks.
    g = torch.arange(T // spec.BS + lens.numel(), device=device, dtype=it)
    # Numbers past the real blocks are read as the last block (their bins stay empty).
    g = torch.minimum(g, last[-1] - 1)
    seq = torch.searchsorted(last, g, right=True)
    return BlockTable(base[seq_of_row].to(torch.int32), cu[seq] + (g - base[seq]) * spec.BS,
                      cu[seq + 1])


@dataclass(frozen=True)
class BlockLists:
    """The (token, slot) pairs of a batch grouped by the block they chose. Bin h * NBLK + g
    holds kv head h's pairs that chose block g of `table`. entries int32 [E] (int64 from 2^31
    pairs on): row * H * S + h * S + slot, by bin, tokens ascending
    within one; E counts the empty slots too, which sort after every bin. counts [H * NBLK]
    (entries' type): pairs per bin; first: the offset of each bin's pairs in entries."""
    entries: torch.Tensor
    counts: torch.Tensor
    first: torch.Tensor
    table: BlockTable


def _block_lists(block_indices: torch.Tensor, spec: NSASpec, table: BlockTable) -> BlockLists:
    """Invert visible_blocks' [B, T, H, S] indices by a stable sort (the backward's lists; the
    forward's are `_query_lists`, by kernels, as the same bins)."""
    B, T, H, S = block_indices.shape
    dev = block_indices.device
    n_bin = H * table.key_row.numel()
    kt = _key_type(n_bin)
    idx = block_indices.reshape(B * T, H, S)
    wide = torch.int32 if kt != torch.int64 else torch.int64
    heads = torch.arange(H, device=dev, dtype=wide)[None, :, None] * table.key_row.numel()
    key = torch.where(idx >= 0, heads + table.row_block[:, None, None] + idx, n_bin)
    sorted_key, order = torch.sort(key.to(kt).flatten(), stable=True)  # stable: tokens stay ascending
    narrow = order.numel() < 2 ** 31
    edges = torch.searchsorted(sorted_key, torch.arange(n_bin + 1, device=dev, dtype=kt),
                               out_int32=narrow)
    entries = order.to(torch.int32) if narrow else order
    return BlockLists(entries, edges[1:] - edges[:-1], edges[:-1], table)


def _bin_blocks(lists: BlockLists, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bins b as (kv head, first key row of the block, end row of its sequence)."""
    n_blk = lists.table.key_row.numel()
    h = torch.div(b, n_blk, rounding_mode="floor")
    g = b - h * n_blk
    return h, lists.table.key_row[g], lists.table.row_end[g]


def topn(q: torch.Tensor, k_cmp: torch.Tensor, lse_cmp: torch.Tensor, spec: NSASpec,
         config: Config | None = None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Top-n selection blocks per token and kv head, scored inside the kernel.

    q [B, T, HQ, DK]; k_cmp [B, NC, H, DK] compressed keys (packed [1, sum NC, H, DK] with
    cu_seqlens); lse_cmp [B, T, HQ] fp32 from `compression_fwd`. Returns int32
    [B, T, H, S]: the forced initial and local blocks plus the best-scoring others
    (overlap-weighted importance summed over the group), ascending, -1 slots last.
    """
    check_tensor("q", q, (None, None, spec.HQ, spec.DK))
    B, T = q.shape[:2]
    check_tensor("k_cmp", k_cmp, (B, None, spec.H, spec.DK), like=q)
    check_tensor("lse_cmp", lse_cmp, (B, T, spec.HQ), dtypes=(torch.float32,))
    config = config or kernel_def("topn").default(spec, T)
    check_seqlens(cu_seqlens, B, T, q.device)
    q, k_cmp, lse_cmp = q.contiguous(), k_cmp.contiguous(), lse_cmp.contiguous()
    idx = torch.empty(B, T, spec.H, spec.S, device=q.device, dtype=torch.int32)
    if B * T == 0:
        return idx
    tiles = tile_table(cu_seqlens, B, T, config["BLOCK_T"], spec.l, spec.d, q.device)
    config = tma_config("topn", config, k_cmp)
    key_args = []
    if config["KEY"] == 32:
        # T bounds every packed sequence's length: no host sync for the longest one.
        bits = topn_index_bits(T, spec.BS)
        if bits > TOPN_INDEX_BITS:
            # 64-bit keys: the score's 23 mantissa bits and a 31-bit index.
            config = fall_back(
                "topn", config, f"block indices need more than the {TOPN_INDEX_BITS} bits a "
                f"32-bit key keeps beside {23 - TOPN_INDEX_BITS} bits of score mantissa",
                f"{T} tokens: {bits} bits", KEY=64)
        else:
            key_args = [(1 << bits) - 1]
    fn = kernel_fn("topn", spec, config)
    fn[(tiles.shape[0], spec.H)](q, *_cmp_key_args(k_cmp, spec, config), lse_cmp, idx, tiles,
                                 *key_args, **launch_options(config))
    return idx


def _cmp_key_args(k_cmp: torch.Tensor, spec: NSASpec, config: Config) -> list:
    """topn's compressed-key argument: k_cmp, or with config TMA one descriptor per
    dim_chunks(DK) piece, boxes of the BJ * l' / d compressed blocks a chunk scores."""
    return tile_args(config, topn_bc(spec, config), (k_cmp, dim_widths(spec.DK)))


def _inverse_selection(block_indices: torch.Tensor, spec: NSASpec, table: BlockTable, seg: int):
    """Invert visible_blocks' [B, T, H, S] indices into per-block token lists for the
    backward's dk/dv kernel, cut into segments of at most `seg` tokens.

    Returns (tokens int32 [E], segments int32 [n, 6], reduces int32 [m, 5], n_slots): see
    nsa_selection_bwd_dkv_kernel.
    """
    B, T, H, S = block_indices.shape
    lists = _block_lists(block_indices, spec, table)
    dev = block_indices.device
    counts, first = lists.counts, lists.first
    n_seg = torch.div(counts + seg - 1, seg, rounding_mode="floor")
    blocks = torch.nonzero(n_seg).squeeze(1)
    n_seg_b = n_seg[blocks]
    total = int(n_seg_b.sum())
    blk = torch.repeat_interleave(blocks, n_seg_b, output_size=total)
    seg_first = torch.cumsum(n_seg_b, 0) - n_seg_b
    kth = torch.arange(total, device=dev) - torch.repeat_interleave(seg_first, n_seg_b, output_size=total)
    multi = n_seg_b > 1
    slots_per = torch.where(multi, n_seg_b, 0)
    slot_first = torch.cumsum(slots_per, 0) - slots_per
    slot = torch.where(multi, slot_first, -1)
    slot = torch.repeat_interleave(slot, n_seg_b, output_size=total)
    slot = torch.where(slot >= 0, slot + kth, -1)
    h, row_kv, seq_end_kv = _bin_blocks(lists, blk)
    segments = torch.stack([h, row_kv, first[blk] + kth * seg,
                            torch.minimum(counts[blk] - kth * seg, torch.full_like(kth, seg)),
                            slot, seq_end_kv], 1).to(torch.int32).contiguous()
    mb = blocks[multi]
    hm, row_m, end_m = _bin_blocks(lists, mb)
    reduces = torch.stack([hm, row_m, slot_first[multi], n_seg_b[multi], end_m],
                          1).to(torch.int32).contiguous()
    tokens = torch.div(lists.entries, H * S, rounding_mode="floor")
    return tokens, segments, reduces, int(slots_per.sum())


def selection_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, do: torch.Tensor, block_indices: torch.Tensor, spec: NSASpec,
                  config: Config | None = None, cu_seqlens: torch.Tensor | None = None, *,
                  canonical: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `selection_fwd`: (dq [B, T, HQ, DK], dk [B, T, H, DK], dv [B, T, H, DV]).

    o, lse: the forward's outputs; do: dL/do [B, T, HQ, DV]; canonical as in selection_fwd.
    Deterministic: no float atomics; dk/dv come from per-block token lists (see
    templates/selection_bwd.py.j2).
    """
    B, T = check_qkv(spec, q, k, v)
    check_grad_inputs(spec, q, o, lse, do)
    config = config or kernel_def("selection_bwd").default(spec, T)
    q, k, v, do = (x.contiguous() for x in (q, k, v, do))
    lse, o = lse.contiguous(), o.contiguous()
    delta = torch.empty(lse.shape, device=q.device, dtype=torch.float32)  # the dq kernel fills it
    starts = seq_start(cu_seqlens, B, T, q.device)
    if not canonical:
        block_indices = visible_blocks(block_indices, spec, starts)
    mod = kernel_module("selection_bwd", spec, config)
    opts = launch_options(config)
    dq = torch.empty_like(q)
    dk = torch.zeros_like(k)  # keys no token selected get exactly zero
    dv = torch.zeros_like(v)
    if B * T == 0:
        return dq, dk, dv
    ready = mark(q.device)

    def invert(_):
        table = block_table(spec, B, T, cu_seqlens, q.device)
        return _inverse_selection(block_indices, spec, table, config["SEG"])
    mod.nsa_selection_bwd_kernel[(T, B * spec.H)](
        q, k, v, o, do, lse, delta, block_indices, dq, starts if starts is not None else q, T,
        IS_VARLEN=starts is not None, **opts)
    # The dk/dv kernel's token lists (a sort and ~40 short torch kernels, two of them read to
    # the host) are built on the side stream while the dq kernel runs.
    (tokens, segments, reduces, n_slots), = ahead(invert, [None], q.device, after=ready,
                                                  overlap=OVERLAP_LISTS)
    bk, bv = next_pow2(spec.DK), next_pow2(spec.DV)
    dk_part = q.new_empty(max(1, n_slots) * spec.BS, bk, dtype=torch.float32)
    dv_part = q.new_empty(max(1, n_slots) * spec.BS, bv, dtype=torch.float32)
    n_b = spec.BS // config["BLOCK_N"]
    if segments.shape[0]:
        mod.nsa_selection_bwd_dkv_kernel[(segments.shape[0], n_b)](
            q, k, v, do, lse, delta, tokens, segments, dk, dv, dk_part, dv_part, **opts)
    if reduces.shape[0]:
        mod.nsa_selection_bwd_reduce_kernel[(reduces.shape[0], n_b)](
            dk_part, dv_part, reduces, dk, dv, num_warps=4, num_stages=1)
    return dq, dk, dv


class SelectionFunction(torch.autograd.Function):
    """Selected attention with given block indices, differentiable in q, k, v."""

    @staticmethod
    def forward(ctx, q, k, v, block_indices, spec, fwd_config, bwd_config, cu_seqlens,
                canonical=False, forced_listed=False):
        # Made canonical once, for both passes; `topn`'s output already is (canonical=True,
        # forced_listed=True).
        if not canonical:
            starts = seq_start(cu_seqlens, q.shape[0], q.shape[1], q.device)
            block_indices = visible_blocks(block_indices, spec, starts)
        o, lse = selection_fwd(q, k, v, block_indices, spec, fwd_config, cu_seqlens,
                               canonical=True, forced_listed=forced_listed)
        ctx.save_for_backward(q, k, v, o, lse, block_indices, cu_seqlens)
        ctx.spec, ctx.bwd_config = spec, bwd_config
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, block_indices, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = selection_bwd(q, k, v, o, lse, do, block_indices, ctx.spec, ctx.bwd_config,
                                   cu_seqlens, canonical=True)
        return dq, dk, dv, None, None, None, None, None, None, None
