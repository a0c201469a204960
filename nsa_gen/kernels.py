"""The kernel registry: for each kernel stem, its template, the values it prints, its
config space, a heuristic default that is always valid, and a resource estimate.

Every number a template prints is computed here, from a validated spec and a config.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Callable

from . import codegen
from .config import Config
from .spec import BRANCHES, NSASpec

LOG2E = 1.4426950408889634


def next_pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, x))))


def num_cmp_blocks(T: int, l: int, d: int) -> int:  # noqa: E741 - the paper's names
    """Compressed blocks of a T-token sequence: block i covers [i*d, i*d + l)."""
    return (T - l) // d + 1 if T >= l else 0


def group_pad(spec: NSASpec) -> int:
    """Rows of a group tile: tl.dot needs M >= 16."""
    return max(16, next_pow2(spec.G))


@dataclass(frozen=True)
class KernelDef:
    stem: str
    branch: str
    context: Callable[[NSASpec, Config], dict]
    default: Callable[[NSASpec, int], Config]
    space: Callable[[NSASpec], dict[str, list]]
    smem_bytes: Callable[[NSASpec, Config], int]
    applies: Callable[[NSASpec], bool]
    # Params that pick an algorithm rather than a tile size: the tuner tries the default
    # with each of their other values before sampling (a short study may not sample them).
    structural: tuple[str, ...] = ()
    # Params that are a number of tokens of the sequence (a split length): a config moved to
    # another T scales them with it, so it keeps its number of splits.
    per_token: tuple[str, ...] = ()
    # (param, compute capability x10): the param, when non-zero, needs a GPU at least that
    # new, e.g. ("TMA", 90), Hopper's tensor memory accelerator. The interpreter runs all.
    min_arch: tuple[tuple[str, int], ...] = ()
    # (param, value, when): a config for which `when(spec, config)` holds runs as with
    # param = value (its variant does not read the param), so the tuner tries only that one.
    unread: tuple[tuple[str, object, Callable[[NSASpec, Config], bool]], ...] = ()
    # True: the kernel takes about as long on the GPU as its launcher on the CPU (a short
    # streaming pass), so the tuner times it replayed from a CUDA graph (trial.graph_timer);
    # timed eagerly, the launcher's CPU time, the same for every config, would hide it.
    launch_bound: bool = False
    # A tuning key of another stem's kernel run another way (the selected kernel storing
    # the gated sum): the stem whose template it renders and whose kernel it launches.
    # None: its own.
    renders: str | None = None
    # Where this key has no DB entry, dispatch uses `fallback`'s entries before the
    # heuristic default (a config of one is a config of the other: same space).
    fallback: str | None = None

    @property
    def template(self) -> str:
        return f"{self.renders or self.stem}.py.j2"

    @property
    def kernel_name(self) -> str:
        return f"nsa_{self.renders or self.stem}_kernel"

    def variants(self, spec: NSASpec, base: Config) -> list[Config]:
        """`base` with each other value of each structural param: one config per algorithm
        the template offers besides base's, in canonical form (a variant that leaves params
        unread, CUDNN = 1, is the one config the tuner keeps of it)."""
        space, out = self.space(spec), []
        for name in self.structural:
            for value in space[name]:
                # a param the variant does not read may bring it back to base (or a repeat)
                cfg = self.canonical(spec, base.replace(**{name: value}))
                if value != base[name] and cfg != base and cfg not in out:
                    out.append(cfg)
        return out

    def at_shape(self, spec: NSASpec, config: Config, T_from: int, T_to: int) -> Config:
        """`config`, tuned at T_from tokens, for T_to: each per-token param scaled by
        T_to / T_from to the nearest value of the space in log2 (the smaller on a tie);
        0 (no split) stays 0."""
        changes = {}
        for name in self.per_token:
            value = config[name]
            if value > 0 and T_from != T_to:
                want = value * max(1, T_to) / max(1, T_from)
                changes[name] = min((c for c in self.space(spec)[name] if c > 0),
                                    key=lambda c: (abs(math.log2(c / want)), c))
        return config.replace(**changes) if changes else config

    def canonical(self, spec: NSASpec, config: Config) -> Config:
        """`config` with each param its variant does not read (for `spec`) at the value
        `unread` gives."""
        have = config.as_dict()
        changes = {n: v for n, v, when in self.unread if when(spec, config) and have[n] != v}
        return config.replace(**changes) if changes else config

    def effective(self, config: Config, T: int) -> Config:
        """What `config` computes at T tokens: a per-token split of T or more is no split."""
        return config.replace(**{n: 0 for n in self.per_token if config[n] >= T})

    def valid(self, spec: NSASpec, config: Config) -> bool:
        """Static checks of a config against the spec (divisibility, known params)."""
        space = self.space(spec)
        if set(dict(config.params)) != set(space) - {"num_warps", "num_stages"}:
            return False
        return all(v in space[k] for k, v in config.as_dict().items() if k in space)


def _common(spec: NSASpec) -> dict:
    return dict(HQ=spec.HQ, H=spec.H, G=spec.G, G_PAD=group_pad(spec), DK=spec.DK, DV=spec.DV,
                BK=next_pow2(spec.DK), BV=next_pow2(spec.DV), BS=spec.BS, S=spec.S,
                SCALE_LOG2=spec.softmax_scale * LOG2E)


# ----------------------------------------------------------------------------- selection_fwd

def _slc_fwd_context(spec: NSASpec, cfg: Config) -> dict:
    gt = token_group_pad(spec)
    return dict(_common(spec), BLOCK_N=cfg["BLOCK_N"], BLOCK_Q=cfg["BLOCK_Q"], GT=gt,
                NB=spec.BS // cfg["BLOCK_N"], ROWS=cfg["BLOCK_Q"] * gt,
                HQ_PAD=next_pow2(spec.HQ), S_PAD=next_pow2(spec.S),
                DK_CHUNKS=dim_chunks(spec.DK), TMA=cfg["TMA"], SHARE=cfg["SHARE"],
                FORCED=cfg["FORCED"], FORCED_T=cfg["FORCED"] // gt,
                # The forced pass's tiles never straddle a selection block.
                FORCED_ONE_BLOCK=cfg["FORCED"] > 0 and spec.BS % (cfg["FORCED"] // gt) == 0,
                INITIAL=spec.initial_blocks, LOCAL=spec.local_blocks,
                # Not a tuning param: selection_fwd sets it to store the gated sum.
                GATED=cfg.get("GATED", 0))


def _slc_fwd_gated_context(spec: NSASpec, cfg: Config) -> dict:
    return _slc_fwd_context(spec, cfg.replace(GATED=1))


def has_forced_blocks(spec: NSASpec) -> bool:
    return spec.initial_blocks + spec.local_blocks > 0


def _slc_fwd_space(spec: NSASpec) -> dict[str, list]:
    """BLOCK_Q: 0 is the group-centric kernel (one token a program); n > 0 the query-batched
    one (one selected block and n of the tokens that chose it a program), with 16 to 128
    query rows. TMA: 1 loads K/V tiles through the tensor memory accelerator (sm90 and
    later), 0 through pointers. SHARE: tokens a group-centric program owns, each block
    loaded once for all of them that selected it (the query-batched kernel ignores it).
    FORCED (the one-token group-centric kernel and the query-batched one read it): 0 loads
    the forced blocks (initial and local) as every other; n > 0 runs them first in a
    token-tile pass of n query rows (tokens * G rounded to a power of two), where adjacent
    tokens share them, so each K/V tile is read once per tile instead of once per token
    (the query-batched kernel then has no partials for them)."""
    gt, dmax = token_group_pad(spec), max(next_pow2(spec.DK), next_pow2(spec.DV))
    forced = [r for r in (64, 128) if r >= gt and r * dmax <= MAX_TILE_ELEMS]
    return {"BLOCK_N": [b for b in (16, 32, 64, 128) if spec.BS % b == 0],
            "BLOCK_Q": [0] + [t for t in (1, 2, 4, 8, 16, 32, 64, 128)
                              if 16 <= t * gt <= 128 and t * gt * dmax <= MAX_TILE_ELEMS],
            "TMA": [0, 1], "SHARE": [1, 2, 4],
            "FORCED": [0] + (forced if has_forced_blocks(spec) else []),
            "num_warps": [2, 4, 8], "num_stages": [1, 2, 3, 4]}


def _slc_fwd_default(spec: NSASpec, T: int) -> Config:
    """Query-batched (64 query rows) for groups of at most 4 heads from 4096 tokens on, where
    the H200 studies had it 1.4-8.7x faster than the group-centric kernel (small-group and mqa,
    4k to 128k; 0.55 against 1.0 ms the other way at small-group, 1k); group-centric
    otherwise (1.7-2.5x faster at G = 16, 64k). K/V through TMA: 7-16% faster than pointer
    loads for all four built-in specs at 64k (H200; dispatch falls back to pointers before
    sm90). Two warps for the group-centric kernel's 16-row tiles: 5-7% faster than four at
    G = 16, 32k and 64k (H200, 22-trial studies, RESULTS session 8: fla-compat 15.32 ->
    14.23 ms, deepseek-nsa 19.27 -> 18.35 at 64k)."""
    gt = token_group_pad(spec)
    block_q = 64 // gt if gt <= 4 and T >= 4096 else 0
    return Config.make(BLOCK_N=min(64, spec.BS), BLOCK_Q=block_q, TMA=1, SHARE=1, FORCED=0,
                       num_warps=4 if block_q else 2, num_stages=2)


def slc_fwd_rows(spec: NSASpec, cfg: Config) -> int:
    """Query rows of a selection_fwd program."""
    return cfg["BLOCK_Q"] * token_group_pad(spec) if cfg["BLOCK_Q"] else group_pad(spec)


def _slc_fwd_smem(spec: NSASpec, cfg: Config) -> int:
    bn, stages = cfg["BLOCK_N"], max(1, cfg.num_stages)
    # The group-centric kernel loads q and k in the exact pieces of dim_chunks(DK).
    bk, bv = spec.DK if not cfg["BLOCK_Q"] else next_pow2(spec.DK), next_pow2(spec.DV)
    main = 2 * (slc_fwd_rows(spec, cfg) * bk + stages * bn * (bk + bv))
    # The forced pass: its query tile, the K/V stages and the probabilities for the P.V dot.
    rows = cfg["FORCED"]
    return max(main, 2 * (rows * bk + stages * bn * (bk + bv) + rows * bn))


# ----------------------------------------------------------------------------- selection_bwd

def _slc_bwd_context(spec: NSASpec, cfg: Config) -> dict:
    return dict(_common(spec), BLOCK_N=cfg["BLOCK_N"], BLOCK_Q=cfg["BLOCK_Q"],
                NB=spec.BS // cfg["BLOCK_N"], ROWS=cfg["BLOCK_Q"] * group_pad(spec),
                SCALE=spec.softmax_scale)


def _slc_bwd_space(spec: NSASpec) -> dict[str, list]:
    gp = group_pad(spec)
    return {"BLOCK_N": [b for b in (16, 32, 64, 128) if spec.BS % b == 0],
            "BLOCK_Q": [t for t in (1, 2, 4, 8, 16) if 16 <= t * gp <= 128],
            "SEG": [256, 512, 1024, 2048, 4096],
            "num_warps": [4, 8], "num_stages": [1, 2, 3]}


def _slc_bwd_default(spec: NSASpec, T: int) -> Config:
    # H200, T = 64k: 32-key slices were 11% faster than 64 at DK + DV = 320 (deepseek-nsa:
    # the dk/dv kernel's accumulators halve); 8 warps were slower everywhere measured.
    block_n = 32 if spec.DK + spec.DV > 256 else 64
    return Config.make(BLOCK_N=min(block_n, spec.BS), BLOCK_Q=max(1, 64 // group_pad(spec)),
                       SEG=1024, num_warps=4, num_stages=2)


def _slc_bwd_smem(spec: NSASpec, cfg: Config) -> int:
    bk, bv = next_pow2(spec.DK), next_pow2(spec.DV)
    rows = cfg["BLOCK_Q"] * group_pad(spec)
    return 2 * (cfg["BLOCK_N"] * (bk + bv) + max(1, cfg.num_stages) * rows * (bk + bv))


# ----------------------------------------------------------------------------- topn

def topn_r(spec: NSASpec) -> int:
    """R = l' / d: the compressed blocks that start inside one selection block (the spec
    validates that d divides l')."""
    return spec.BS // spec.d


def topn_bc(spec: NSASpec, cfg: Config) -> int:
    """BC: the compressed blocks one top-n chunk scores (BJ selection blocks of R each)."""
    return cfg["BJ"] * topn_r(spec)


def topn_bj(spec: NSASpec) -> int:
    """Selection blocks per merge step: the running list must hold S, and tl.dot needs 16."""
    return max(16, next_pow2(spec.S))


def topn_narrow(spec: NSASpec, cfg: Config) -> bool:
    """Whether a top-n config keeps its running list SL = next_pow2(S) keys wide (LIST = 1)
    instead of BJ: only where that is narrower, and not with the rank merge, which ranks the
    whole chunk against the list (LIST is unread there)."""
    return cfg["LIST"] == 1 and cfg["BJ"] > next_pow2(spec.S) and cfg["MERGE"] != "rank"


def _topn_context(spec: NSASpec, cfg: Config) -> dict:
    c = _common(spec)
    narrow, sl = topn_narrow(spec, cfg), next_pow2(spec.S)
    lw = sl if narrow else cfg["BJ"]  # the running list's width
    # Token-tile rows (G rounded to a power of two, no floor of 16): the tile reaches 16
    # rows through BLOCK_T, so small groups waste no tensor-core work on padding heads.
    return dict(H=c["H"], HQ=c["HQ"], G=c["G"], G_PAD=token_group_pad(spec), DK=c["DK"],
                DK_CHUNKS=dim_chunks(spec.DK), L=spec.l, D=spec.d, BS=spec.BS, S=spec.S, R=topn_r(spec),
                M_CHUNKS=spec.l // spec.d, INITIAL=spec.initial_blocks, LOCAL=spec.local_blocks,
                BLOCK_T=cfg["BLOCK_T"], BJ=cfg["BJ"], BC=topn_bc(spec, cfg),
                ROWS=token_tile_rows(spec, cfg), SCALE_LOG2=c["SCALE_LOG2"],
                MERGE=cfg["MERGE"], MERGE_STEPS=_half_cleaners(lw),
                **_cube(cfg["BLOCK_T"], lw),
                NARROW=narrow, SL=sl,
                # the widths a chunk is halved through down to its best SL (LIST = 1)
                CHUNK_HALVES=tuple(cfg["BJ"] >> s for s in range(1, cfg["BJ"].bit_length())
                                   if cfg["BJ"] >> s >= sl),
                TMA=cfg["TMA"],
                INSERT=cfg["INSERT"], KEY=cfg["KEY"], IMP=cfg["IMP"],
                TRANS=cfg["IMP"] in ("tsum", "mma"), NT=topn_group_cols(cfg),
                P_SHIFT=TOPN_P_SHIFT, **KEY32_BOUNDS)


# IMP "mma" scales its fp16 probabilities (<= 1) by 2^TOPN_P_SHIFT: at most 32768, within
# fp16's 65504, and probabilities down to 2^-29 stay normal (11 significant bits).
TOPN_P_SHIFT = 15


def topn_group_cols(cfg: Config) -> int:
    """Columns of IMP "mma"'s 0/1 group-sum matrix: one per token of the tile, at least the
    16 tl.dot needs."""
    return max(16, cfg["BLOCK_T"])


# 32-bit top-n keys (KEY = 32): a chunk's non-candidate keys are -1 - j >= -2^TOPN_INDEX_BITS;
# empty list slots start below those, and LOW_KEY is below everything.
TOPN_INDEX_BITS = 15
KEY32_BOUNDS = dict(EMPTY_KEY=1 << 30, LOW_KEY=-(1 << 31) + 1)


def topn_index_bits(T: int, BS: int) -> int:
    """Low bits of a 32-bit top-n key that hold the block index, for sequences of at most
    T tokens: enough for every block index below ceil(T / BS)."""
    return max(1, (-(-T // BS)).bit_length())


def _half_cleaners(n: int) -> tuple[tuple[int, int], ...]:
    """Steps of a bitonic merge of n (a power of two) keys: (subsequences, half length),
    from one subsequence of n down to n / 2 subsequences of 2."""
    return tuple((n // (2 * h), h) for h in (n >> s for s in range(1, n.bit_length())))


def _cube(rows: int, width: int) -> dict[str, tuple]:
    """MERGE "hcube": a [rows, width] tile (powers of two) seen as a hypercube of
    n = log2(rows * width) axes of 2 (CUBE_SHAPE), row-major, so bit k of the column index is
    axis n - 1 - k. CUBE_STEPS: the half-cleaner steps of each row's bitonic merge, widest
    first: (the axis whose two ends are compared, the shape of an arange(0, 2) that marks the
    axis' second end)."""
    n = (rows * width).bit_length() - 1
    axes = [n - 1 - k for k in range(width.bit_length() - 2, -1, -1)]
    return {"CUBE_SHAPE": (2,) * n,
            "CUBE_STEPS": tuple((a, tuple(2 if b == a else 1 for b in range(n))) for a in axes)}


def _topn_space(spec: NSASpec) -> dict[str, list]:
    gp, bj, r = token_group_pad(spec), topn_bj(spec), topn_r(spec)
    # 4 * bj where that chunk is at most 64 compressed blocks (R = 1): IMP "tsum" and "mma"
    # put the chunk's blocks on the M side of the transposed tile, and wgmma needs 64 there
    # (fla-compat at 64k, H100: IMP "mma" 2.86 -> 2.64 ms at BJ 64; at BJ 32, 2x slower).
    bjs = [b for b in (bj, 2 * bj) if b * r <= 256] + ([4 * bj] if 4 * bj * r <= 64 else [])
    return {"BLOCK_T": [t for t in (1, 2, 4, 8, 16, 32, 64, 128) if 16 <= t * gp <= 256],
            "BJ": bjs or [bj],
            "MERGE": ["sort", "bitonic", "hcube", "rank"], "INSERT": [0, 2, 4, 8], "LIST": [0, 1],
            "TMA": [0, 1],
            "KEY": [64, 32], "IMP": ["dot", "sum", "tsum"] + (["mma"] if gp > 1 else []),
            "MAXNREG": [0, 128, 168], "num_warps": [2, 4, 8],
            "num_stages": [1, 2, 3]}


def _topn_default(spec: NSASpec, T: int) -> Config:
    """64-row tiles, the bitonic merge (as "hcube"). INSERT 4 on tiles of at most 4 tokens: at
    64k on an H200 it took fla-compat's top-n from 8.48 to 6.82 ms and deepseek-nsa's from 18.60 to
    18.31; on small-group's 16-token tiles it cost 2% (12.33 -> 12.63), so it is off there
    (the more tokens a tile holds, the more often one of them has many keys to insert).
    32-bit keys: 8-29% faster than 64-bit ones with the same tiles and merge for all three
    specs measured (H200, 64k: this default 18.42 -> 16.90 ms deepseek-nsa, 6.80 -> 6.03
    fla-compat, 12.21 -> 8.65 small-group; RESULTS session 6).
    IMP "sum" where the group sum leaves no weights to apply (R = l' / d = 1) or shrinks
    the tile 2-4x (G_PAD 2-4); "dot" where it only moves a wide fp32 tile between layouts
    (G_PAD 16) or sums nothing (G = 1). H200, 64k, DB tiles (RESULTS session 8): fla-compat
    5.35 -> 4.47 ms, small-group 8.60 -> 7.63; deepseek-nsa 12.74 -> 24.37, mqa 5.89 -> 8.82.
    Chunks of at least 32 compressed blocks (BJ 32 at R = 1): fla-compat 4.47 -> 4.01.
    The hcube merge keeps what the bitonic one keeps: each spec's 64k entry with it was 9-17%
    faster than with the entry's own merge (H100, RESULTS run 49)."""
    block_t = max(1, 64 // token_group_pad(spec))
    r = topn_r(spec)
    imp = "sum" if r == 1 or 2 <= token_group_pad(spec) <= 4 else "dot"
    bj = next((b for b in _topn_space(spec)["BJ"] if b * r >= 32), topn_bj(spec))
    return Config.make(BLOCK_T=block_t, BJ=bj, MERGE="hcube",
                       INSERT=4 if block_t <= 4 else 0, LIST=0, TMA=0, KEY=32, IMP=imp, MAXNREG=0,
                       num_warps=4, num_stages=2)


def _topn_smem(spec: NSASpec, cfg: Config) -> int:
    # The kernel loads q and k_cmp in the exact pieces of dim_chunks(DK), so DK, not its
    # power-of-two padding, sets the tile bytes.
    rows, bc = token_tile_rows(spec, cfg), topn_bc(spec, cfg)
    dk = spec.DK
    # IMP "dot" feeds the probabilities and the weights to tl.dot through shared memory.
    weights = 4 * (rows * bc + bc * cfg["BJ"]) if cfg["IMP"] == "dot" else 0
    # IMP "mma": the group-sum matrix is tl.dot's B operand (fp32 for fp32 inputs).
    if cfg["IMP"] == "mma":
        weights = 4 * rows * topn_group_cols(cfg)
    return 2 * (rows * dk + max(1, cfg.num_stages) * bc * dk) + weights


# ------------------------------------------------------------------- compression_fwd, window_fwd
# Both are token-tile attention kernels: a program owns BLOCK_T consecutive tokens of one
# sequence and one kv head, and its query tile has ROWS = BLOCK_T * G_PAD rows (row = token
# * G_PAD + head in group), so tl.dot gets >= 16 rows at every G and each K/V tile is
# loaded once per group.

# Largest tile a program may hold: ROWS * max(DK, DV) elements (128 rows of 256 dims), which
# keeps the fp32 accumulator and the query tile of 4-8 warps within registers.
MAX_TILE_ELEMS = 128 * 256


def token_group_pad(spec: NSASpec) -> int:
    """Rows per token in a token tile: G rounded up to a power of two (the tile, not each
    token, must reach tl.dot's 16 rows, so unlike group_pad there is no floor of 16)."""
    return next_pow2(spec.G)


def token_tile_rows(spec: NSASpec, cfg: Config) -> int:
    """ROWS of a token tile (top-n, compressed and window attention): BLOCK_T tokens of
    token_group_pad rows each."""
    return cfg["BLOCK_T"] * token_group_pad(spec)


def dim_chunks(D: int) -> tuple[tuple[int, int], ...]:
    """(offset, size) power-of-two pieces of a head dim, largest first: 192 -> (0, 128),
    (128, 64). Tiles are then exact: a head dim that is no power of two costs no padded
    tensor-core work and needs no dim masks. Head dims are multiples of 16 (spec rule), so
    every piece is a valid tl.dot size."""
    out, off = [], 0
    for b in (256, 128, 64, 32, 16):
        if D - off >= b:
            out.append((off, b))
            off += b
    assert off == D, f"head dim {D} is not a multiple of 16"
    return tuple(out)


def _tile_space(spec: NSASpec, name: str) -> dict[str, list]:
    """TMA: 1 loads K/V tiles through the tensor memory accelerator (sm90 and later)."""
    gp, dmax = token_group_pad(spec), max(spec.DK, spec.DV)
    return {"BLOCK_T": [t for t in (1, 2, 4, 8, 16, 32, 64, 128, 256)
                        if 16 <= t * gp <= 256 and t * gp * dmax <= MAX_TILE_ELEMS],
            name: [16, 32, 64, 128], "TMA": [0, 1], "num_warps": [2, 4, 8],
            "num_stages": [1, 2, 3, 4]}


def _tile_default(spec: NSASpec, T: int, name: str, block_n: int, num_stages: int) -> Config:
    """64-row tiles, 4 warps: the best or within 3% of the best on an H200 (bf16, T = 64k)
    for the window and compression kernels of deepseek-nsa, small-group and mqa, where
    128 rows with 8 warps were 0-35% slower. Fewer tokens when T is short; never fewer
    than tl.dot's 16 rows. K/V through TMA: 4-9% faster than pointer loads for both kernels
    of deepseek-nsa and small-group at 64k (dispatch falls back to pointers before sm90)."""
    bt = max(-(-16 // token_group_pad(spec)), min(64 // token_group_pad(spec), next_pow2(T)))
    return Config.make(num_warps=4, num_stages=num_stages, TMA=1, **{"BLOCK_T": bt, name: block_n})


def _tile_smem(spec: NSASpec, cfg: Config, name: str) -> int:
    """Query tile, num_stages K/V tiles, and the probabilities re-laid out for the P.V dot."""
    el = 4 if spec.dtype == "float32" else 2
    rows, bn = token_tile_rows(spec, cfg), cfg[name]
    return el * (rows * spec.DK + max(1, cfg.num_stages) * bn * (spec.DK + spec.DV) + rows * bn)


def _tile_context(spec: NSASpec, cfg: Config) -> dict:
    c, gp = _common(spec), token_group_pad(spec)
    return dict(HQ=c["HQ"], H=c["H"], G=c["G"], G_PAD=gp, DK=c["DK"], DV=c["DV"],
                DK_CHUNKS=dim_chunks(spec.DK), DV_CHUNKS=dim_chunks(spec.DV),
                BLOCK_T=cfg["BLOCK_T"], ROWS=token_tile_rows(spec, cfg), SCALE_LOG2=c["SCALE_LOG2"])


def _cmp_fwd_context(spec: NSASpec, cfg: Config) -> dict:
    return dict(_tile_context(spec, cfg), L=spec.l, D=spec.d, BLOCK_C=cfg["BLOCK_C"],
                TMA=cfg["TMA"])


def _cmp_fwd_space(spec: NSASpec) -> dict[str, list]:
    """CUDNN: 1 runs the branch as batched causal attention in torch's cuDNN attention
    (ops/compression._residue_attention), not the generated kernel; the tile params are then
    unread."""
    return dict(_tile_space(spec, "BLOCK_C"), CUDNN=[0, 1])


def _cmp_fwd_default(spec: NSASpec, T: int) -> Config:
    # A third stage paid 10-15% at head dims <= 128 and cost 25% at DK = 192 (shared memory).
    # The generated kernel by default: it runs on every GPU and dtype; the DB picks CUDNN.
    return _tile_default(spec, T, "BLOCK_C", 64,
                         3 if max(spec.DK, spec.DV) <= 128 else 2).replace(CUDNN=0)


def _cmp_fwd_smem(spec: NSASpec, cfg: Config) -> int:
    return _tile_smem(spec, cfg, "BLOCK_C")


def _swa_fwd_context(spec: NSASpec, cfg: Config) -> dict:
    return dict(_tile_context(spec, cfg), W=spec.w, BLOCK_N=cfg["BLOCK_N"], TMA=cfg["TMA"])


def _swa_fwd_space(spec: NSASpec) -> dict[str, list]:
    """CUDNN: 1 runs the branch as cuDNN's own sliding-window attention (the cuDNN
    frontend's diagonal band, ops/window._band_fwd), not the generated kernel; the tile
    params are then unread."""
    return dict(_tile_space(spec, "BLOCK_N"), CUDNN=[0, 1])


def _swa_fwd_default(spec: NSASpec, T: int) -> Config:
    # A key tile wider than the window would be mostly masked. The generated kernel by
    # default (every GPU and dtype, no optional dependency); the DB picks CUDNN.
    block_n = min(64, max(16, next_pow2(spec.w)))
    return _tile_default(spec, T, "BLOCK_N", block_n, 2).replace(CUDNN=0)


def _swa_fwd_smem(spec: NSASpec, cfg: Config) -> int:
    return _tile_smem(spec, cfg, "BLOCK_N")


# ----------------------------------------------------------------- compression_bwd, window_bwd
# Two kernels per module, one config: the dq kernel tiles like the forward (BLOCK_T tokens x
# G_PAD heads, BLOCK_C / BLOCK_N key tiles); the dk/dv kernel owns DKV_BLOCK_C compressed
# blocks / DKV_BLOCK_N keys, keeps their dk and dv in fp32 registers, and streams the query
# tokens that see them, DKV_BLOCK_T tokens x G_PAD heads at a time, with its own DKV_WARPS and
# DKV_STAGES. Defaults come from H200 sweeps at T = 64k (see each default's docstring).

def _bwd_space(spec: NSASpec, name: str) -> dict[str, list]:
    """The forward's token tiles for dq, plus the dk/dv tiles. The dk and dv accumulators
    together hold at most MAX_TILE_ELEMS (DK + DV = 320: 64 keys)."""
    space = _tile_space(spec, name)
    return {"BLOCK_T": space["BLOCK_T"], name: space[name],
            "DKV_" + name: [b for b in (16, 32, 64, 128)
                            if b * (spec.DK + spec.DV) <= MAX_TILE_ELEMS],
            "DKV_BLOCK_T": space["BLOCK_T"], "DKV_WARPS": [4, 8], "DKV_STAGES": [1, 2, 3],
            "num_warps": [4, 8], "num_stages": [1, 2, 3]}


def _bwd_default(spec: NSASpec, T: int, name: str, block_n: int, dkv_block_n: int) -> Config:
    """64-row query tiles for both kernels, 4 warps each, 2 stages. Measured on an H200
    (bf16, T = 64k, deepseek-nsa and fla-compat, benchmarks/RESULTS.md run 4): 4 warps beat
    8 for every dq kernel (by 1.5-2.4x) and for the window's dk/dv kernel; 8 warps only
    helped the compressed dk/dv kernel with 8-token tiles, by 10%."""
    fwd = _tile_default(spec, T, name, block_n, 2)
    return Config.make(num_warps=4, num_stages=2, BLOCK_T=fwd["BLOCK_T"], **{
        name: block_n, "DKV_" + name: dkv_block_n, "DKV_BLOCK_T": fwd["BLOCK_T"],
        "DKV_WARPS": 4, "DKV_STAGES": 2})


def _bwd_smem(spec: NSASpec, cfg: Config, name: str) -> int:
    """The larger of the two kernels. dq: query and do tiles, num_stages K/V tiles, ds
    re-laid out for the dS.K dot. dk/dv: K/V tiles, DKV_STAGES query and do tiles plus one
    more copy of each (each feeds two dots, one of them transposed), p and ds re-laid out
    for the transposed dots. The extra copy is measured: on the H200 two compression_bwd
    configs with DKV_STAGES = 1 asked for exactly 2 * (DKV tile + 2 query/do tiles) bytes
    plus 1 KiB (271360 and 279552 B), which the model without it put at 156 and 180 KB."""
    el = 4 if spec.dtype == "float32" else 2
    gp, dkv, stages = token_group_pad(spec), spec.DK + spec.DV, max(1, cfg.num_stages)
    rows, bn = cfg["BLOCK_T"] * gp, cfg[name]
    rows_kv, bn_kv = cfg["DKV_BLOCK_T"] * gp, cfg["DKV_" + name]
    dq = rows * dkv + stages * bn * dkv + rows * bn
    dkv_ = (bn_kv * dkv + (max(1, cfg.get("DKV_STAGES", stages)) + 1) * rows_kv * dkv
            + 2 * rows_kv * bn_kv)
    return el * max(dq, dkv_)


def _bwd_context(spec: NSASpec, cfg: Config, name: str) -> dict:
    gp = token_group_pad(spec)
    return dict(_tile_context(spec, cfg), SCALE=spec.softmax_scale, **{
        name: cfg[name], "DKV_" + name: cfg["DKV_" + name], "DKV_BLOCK_T": cfg["DKV_BLOCK_T"],
        "DKV_ROWS": cfg["DKV_BLOCK_T"] * gp})


def _cmp_bwd_context(spec: NSASpec, cfg: Config) -> dict:
    return dict(_bwd_context(spec, cfg, "BLOCK_C"), L=spec.l, D=spec.d,
                DKV_SPLIT_T=cfg["DKV_SPLIT_T"])


def _cmp_bwd_space(spec: NSASpec) -> dict[str, list]:
    """DKV_SPLIT_T: tokens per dk/dv program (0 = all); multiples of every DKV_BLOCK_T.
    CUDNN: 1 runs the residue form's attention backward in torch's cuDNN attention
    (ops/compression._residue_attention_bwd), not the generated kernels; the tile params are
    then unread."""
    return dict(_bwd_space(spec, "BLOCK_C"), DKV_SPLIT_T=[0, 2048, 4096, 8192, 16384],
                CUDNN=[0, 1])


def _cmp_bwd_default(spec: NSASpec, T: int) -> Config:
    """dk/dv: 64 compressed blocks a program at DK + DV <= 256, 32 beyond (4 warps: 6.6 vs
    10.8 ms at fla-compat, 48.6 vs 67.9 ms at deepseek-nsa, T = 64k). The token range is
    split, without which the first tiles' programs walk all T tokens while the grid's tail
    idles: every 2048 tokens up to T = 16k (the best split of all four built-in specs at 4k
    and 8k, and of three at 16k, 1.3-3x faster than none there), every 8192 beyond (4096
    beyond 256 dims: deepseek-nsa), the best at 64k (H200 studies, RESULTS.md session 4).
    Fewer compressed blocks than a tile: a smaller tile wastes less."""
    wide = spec.DK + spec.DV > 256
    nc = num_cmp_blocks(T, spec.l, spec.d)
    cfg = _bwd_default(spec, T, "BLOCK_C", 64, max(16, min(32 if wide else 64, next_pow2(nc))))
    split = 2048 if T <= 16384 else 4096 if wide else 8192
    # The generated kernels by default (deterministic, every GPU and dtype); the DB picks CUDNN.
    return Config.make(num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                       DKV_SPLIT_T=split if T > split else 0, CUDNN=0, **dict(cfg.params))


def _cmp_bwd_smem(spec: NSASpec, cfg: Config) -> int:
    return _bwd_smem(spec, cfg, "BLOCK_C")


def _swa_bwd_context(spec: NSASpec, cfg: Config) -> dict:
    return dict(_bwd_context(spec, cfg, "BLOCK_N"), W=spec.w)


def _swa_bwd_space(spec: NSASpec) -> dict[str, list]:
    """CUDNN: 1 runs cuDNN's band backward (ops/window._band_bwd), not the generated
    kernels; the tile params are then unread."""
    return dict(_bwd_space(spec, "BLOCK_N"), CUDNN=[0, 1])


def _swa_bwd_default(spec: NSASpec, T: int) -> Config:
    # dq: a key tile wider than the window would be mostly masked (as in the forward).
    # dk/dv: 32 keys a program beyond 256 dims (DK + DV): 12.0 vs 20.6 ms at deepseek-nsa.
    # The generated kernels by default (deterministic, no optional dependency); the DB
    # picks CUDNN.
    dkv = 32 if spec.DK + spec.DV > 256 else 64
    return _bwd_default(spec, T, "BLOCK_N", min(64, max(16, next_pow2(spec.w))),
                        max(16, min(dkv, next_pow2(T)))).replace(CUDNN=0)


def _swa_bwd_smem(spec: NSASpec, cfg: Config) -> int:
    return _bwd_smem(spec, cfg, "BLOCK_N")


# ----------------------------------------------------------------------------- gate_fwd
# The gated sum o = sum over branches of g_br[..., None] * o_br: a streaming kernel (no dot,
# no loop), a program owns BLOCK_R rows of (token, head) pairs and all DV columns of each.

def gate_branches(spec: NSASpec) -> tuple[str, ...]:
    """The branches gate_fwd takes an output and a gate of: the spec's, in canonical order
    (cmp, slc, swa), which is also the order of the sum."""
    return tuple(b for b in BRANCHES if spec.has(b))


def _gate_fwd_context(spec: NSASpec, cfg: Config) -> dict:
    br = gate_branches(spec)
    return dict(NB=len(br), BRANCHES=br, DV=spec.DV, DV_CHUNKS=dim_chunks(spec.DV),
                BLOCK_R=cfg["BLOCK_R"])


def _gate_fwd_space(spec: NSASpec) -> dict[str, list]:
    # One value of num_stages: the kernel has no loop to pipeline.
    return {"BLOCK_R": [r for r in (16, 32, 64, 128) if r * next_pow2(spec.DV) <= MAX_TILE_ELEMS],
            "num_warps": [2, 4, 8], "num_stages": [1]}


def _gate_fwd_default(spec: NSASpec, T: int) -> Config:
    """Rows of about 16 KB of each 16-bit input a program (64 rows at DV = 128, 32 at 256,
    128 at 64 and below), 4 warps. Pure streaming: what matters is enough bytes in flight per
    SM and few enough programs that launch overhead stays small. At DV = 128 with three
    branches a program moves 64 KB (3 reads and the store of 16 KB each) and each of 128
    threads holds 64 fp32 accumulator values, which fits in registers without spilling.
    Measured (H200, 64k, RESULTS session 6): within 2% of the best tile of all three specs
    (16 rows with 8 warps: 0.98 / 0.74 / 0.49 ms for deepseek-nsa, fla-compat, small-group),
    which moves the bytes at 4.3-4.4 TB/s, the copy ceiling."""
    rows = max(16, min(128, 8192 // next_pow2(spec.DV)))
    return Config.make(BLOCK_R=rows, num_warps=4, num_stages=1)


def _gate_fwd_smem(spec: NSASpec, cfg: Config) -> int:
    return 0  # elementwise: no tile goes through shared memory


# ----------------------------------------------------------------------------- compress_mean
# phi = mean: a streaming kernel (no dot), a program owns BLOCK_C compressed blocks of one
# head and BLOCK_DIM columns of the head dim. Keys and values share one module: the head dim
# is a launch constexpr.

def mean_step(spec: NSASpec) -> int:
    """Tokens of a stride chunk that compress_mean loads as one tile: the whole chunk up to
    256 (d is a power of two, so the pieces are exact)."""
    return min(spec.d, 256)


def _compress_mean_context(spec: NSASpec, cfg: Config) -> dict:
    return dict(L=spec.l, D=spec.d, M_CHUNKS=spec.l // spec.d, D_STEP=mean_step(spec),
                D_PIECES=spec.d // mean_step(spec), BLOCK_C=cfg["BLOCK_C"], BLOCK_DIM=cfg["BLOCK_DIM"])


# Elements of one loaded [BLOCK_C, D_STEP, BLOCK_DIM] tile: 32 KB of 16-bit values at most.
MAX_MEAN_TILE = 16384


def _compress_mean_space(spec: NSASpec) -> dict[str, list]:
    # One value of num_stages: the loop over a block's chunks is unrolled, nothing to pipeline.
    step = mean_step(spec)
    return {"BLOCK_C": [c for c in (1, 2, 4, 8, 16) if c * step * 32 <= MAX_MEAN_TILE],
            "BLOCK_DIM": [b for b in (32, 64, 128) if step * b <= MAX_MEAN_TILE],
            "num_warps": [1, 2, 4, 8], "num_stages": [1]}


def _compress_mean_default(spec: NSASpec, T: int) -> Config:
    """64 columns (a piece that divides every head dim that is a multiple of 64, so no
    masked lanes at 64, 128 or 192) and enough blocks for a tile of about 8192 elements (16 KB
    of 16-bit input) a program, 4 warps: the gated sum's streaming tile (gate_fwd), which moves
    its bytes at the copy ceiling."""
    step = mean_step(spec)
    block_dim = 64
    # d is a power of two, so this is one too.
    blocks = max(1, min(16, 8192 // (step * block_dim)))
    return Config.make(BLOCK_C=blocks, BLOCK_DIM=block_dim, num_warps=4, num_stages=1)


def _compress_mean_smem(spec: NSASpec, cfg: Config) -> int:
    return 0  # a reduction over a register tile: nothing goes through shared memory


# ----------------------------------------------------------------------- decode_select, decode_attend
# Decode: one program per query token, kv head and split of the keys; a tile is the group's
# G_PAD heads (>= 16 rows for tl.dot). Head dims padded to powers of two and masked: decode
# reads each key once, so memory, not the padded tensor-core work, bounds it.

def _decode_common(spec: NSASpec) -> dict:
    c = _common(spec)
    return dict(HQ=c["HQ"], H=c["H"], G=c["G"], G_PAD=group_pad(spec), DK=c["DK"], DV=c["DV"],
                BK=c["BK"], BV=c["BV"], SCALE_LOG2=c["SCALE_LOG2"])


def _decode_select_context(spec: NSASpec, cfg: Config) -> dict:
    return dict(_decode_common(spec), L=spec.l, D=spec.d, BLOCK_C=cfg["BLOCK_C"],
                SPLIT_C=cfg["SPLIT_C"], BS=spec.BS, S=spec.S, S_PAD=next_pow2(spec.S),
                R=topn_r(spec), R_PAD=next_pow2(topn_r(spec)), M_CHUNKS=spec.l // spec.d,
                INITIAL=spec.initial_blocks, LOCAL=spec.local_blocks)


def _decode_select_space(spec: NSASpec) -> dict[str, list]:
    """SPLIT_C: compressed blocks a program scores (a split); BLOCK_C: blocks a tile."""
    return {"BLOCK_C": [16, 32, 64, 128], "SPLIT_C": [64, 128, 256, 512, 1024],
            "num_warps": [2, 4, 8], "num_stages": [1, 2, 3]}


def _decode_select_default(spec: NSASpec, T: int) -> Config:
    """Splits of 256 blocks (64k tokens at d = 16: 16 splits, 64 programs a token at H = 4)."""
    return Config.make(BLOCK_C=64, SPLIT_C=256, num_warps=4, num_stages=2)


def _decode_smem(spec: NSASpec, cfg: Config, name: str) -> int:
    """Both decode kernels: the group's query tile, num_stages K/V tiles of cfg[name] keys
    (padded head dims) and the probabilities re-laid out for the P.V dot."""
    bk, bv, bn = next_pow2(spec.DK), next_pow2(spec.DV), cfg[name]
    return 2 * (group_pad(spec) * bk + max(1, cfg.num_stages) * bn * (bk + bv) + group_pad(spec) * bn)


def _decode_select_smem(spec: NSASpec, cfg: Config) -> int:
    return _decode_smem(spec, cfg, "BLOCK_C")


def decode_splits(spec: NSASpec, cfg: Config) -> tuple[int, int]:
    """(selected-branch splits, window splits) of a decode_attend config: ceil(S / SLOTS),
    ceil(w / W_SPLIT) (0 without a window)."""
    return -(-spec.S // cfg["SLOTS"]), -(-spec.w // cfg["W_SPLIT"]) if spec.w else 0


def _decode_attend_context(spec: NSASpec, cfg: Config) -> dict:
    return dict(_decode_common(spec), BS=spec.BS, S=spec.S, W=spec.w, BLOCK_N=cfg["BLOCK_N"],
                TILES_PER_BLOCK=spec.BS // cfg["BLOCK_N"],
                SLOTS=cfg["SLOTS"], W_SPLIT=cfg["W_SPLIT"], HAS_CMP=spec.has("cmp"),
                HAS_SLC=spec.has("slc"), HAS_SWA=spec.has("swa"))


def _decode_attend_space(spec: NSASpec) -> dict[str, list]:
    """BLOCK_N: keys a tile (a divisor of BS, so a tile never straddles two blocks); SLOTS:
    selected blocks a split; W_SPLIT: window keys a split."""
    return {"BLOCK_N": [b for b in (16, 32, 64) if spec.BS % b == 0],
            "SLOTS": [s for s in (1, 2, 4, 8, 16) if s <= next_pow2(spec.S)],
            "W_SPLIT": [64, 128, 256, 512], "num_warps": [2, 4, 8], "num_stages": [1, 2, 3]}


def _decode_attend_default(spec: NSASpec, T: int) -> Config:
    """4 selected blocks or 128 window keys a split: 4 + 4 splits at n = 16, w = 512."""
    space = _decode_attend_space(spec)
    return Config.make(BLOCK_N=max(space["BLOCK_N"]), SLOTS=min(4, max(space["SLOTS"])),
                       W_SPLIT=128, num_warps=4, num_stages=2)


def _decode_attend_smem(spec: NSASpec, cfg: Config) -> int:
    return _decode_smem(spec, cfg, "BLOCK_N")


# Hopper's tensor memory accelerator (the kernels' TMA param).
TMA_ARCH = (("TMA", 90),)
# The selected forward; its gated twin below is the same kernel storing NSA's gated sum.
_SLC_FWD = KernelDef("selection_fwd", "slc", _slc_fwd_context, _slc_fwd_default, _slc_fwd_space,
                     _slc_fwd_smem, lambda s: s.has("slc"),
                     structural=("BLOCK_Q", "TMA", "SHARE", "FORCED"), min_arch=TMA_ARCH,
                     unread=(("SHARE", 1, lambda s, c: c["BLOCK_Q"] > 0),
                             ("FORCED", 0, lambda s, c: c["BLOCK_Q"] == 0 and c["SHARE"] > 1)))

KERNELS: dict[str, KernelDef] = {
    "selection_fwd": _SLC_FWD,
    # The same kernel storing NSA's gated sum (nsa() without autograd): its epilogue (or
    # the query-batched combine) reads the other branches' outputs and the gates, so its
    # best tile can differ (fla-compat at 64k on the H200: BLOCK_N 64 gated, 32 ungated,
    # session 27). Tuned apart; where it has no entry, selection_fwd's serves.
    "selection_fwd_gated": replace(_SLC_FWD, stem="selection_fwd_gated",
                                   context=_slc_fwd_gated_context, renders="selection_fwd",
                                   fallback="selection_fwd"),
    "topn": KernelDef("topn", "slc", _topn_context, _topn_default, _topn_space, _topn_smem,
                      lambda s: s.has("slc"), structural=("MERGE", "INSERT", "LIST", "TMA", "KEY", "IMP"),
                      min_arch=TMA_ARCH,
                      # LIST = 1 where the list is no narrower, or with the rank merge
                      unread=(("LIST", 0, lambda s, c: not topn_narrow(s, c.replace(LIST=1))),)),
    "selection_bwd": KernelDef("selection_bwd", "slc", _slc_bwd_context, _slc_bwd_default,
                               _slc_bwd_space, _slc_bwd_smem, lambda s: s.has("slc")),
    "compression_fwd": KernelDef("compression_fwd", "cmp", _cmp_fwd_context, _cmp_fwd_default,
                                 _cmp_fwd_space, _cmp_fwd_smem,
                                 # selection scores blocks with its lse
                                 lambda s: s.has("cmp") or s.has("slc"),
                                 structural=("TMA", "CUDNN"),
                                 # cuDNN's fused attention: Ampere and later
                                 min_arch=TMA_ARCH + (("CUDNN", 80),),
                                 # (BLOCK_T is unread too, but its values depend on the
                                 # spec: a sampled CUDNN config may repeat with another)
                                 unread=tuple((n, v, lambda s, c: c["CUDNN"] == 1) for n, v in
                                              (("TMA", 0), ("BLOCK_C", 64), ("num_warps", 4),
                                               ("num_stages", 2)))),
    "window_fwd": KernelDef("window_fwd", "swa", _swa_fwd_context, _swa_fwd_default,
                            _swa_fwd_space, _swa_fwd_smem, lambda s: s.has("swa"),
                            structural=("TMA", "CUDNN"),
                            # cuDNN's fused attention: Ampere and later
                            min_arch=TMA_ARCH + (("CUDNN", 80),),
                            # (BLOCK_T is unread too, as in compression_fwd)
                            unread=tuple((n, v, lambda s, c: c["CUDNN"] == 1) for n, v in
                                         (("TMA", 0), ("BLOCK_N", 64), ("num_warps", 4),
                                          ("num_stages", 2)))),
    "compression_bwd": KernelDef("compression_bwd", "cmp", _cmp_bwd_context, _cmp_bwd_default,
                                 _cmp_bwd_space, _cmp_bwd_smem,
                                 # the selection branch's top-n is not differentiated
                                 lambda s: s.has("cmp"), structural=("DKV_SPLIT_T", "CUDNN"),
                                 per_token=("DKV_SPLIT_T",), min_arch=(("CUDNN", 80),),
                                 # (the token tiles are unread too, as in compression_fwd)
                                 unread=tuple((n, v, lambda s, c: c["CUDNN"] == 1) for n, v in
                                              (("BLOCK_C", 64), ("DKV_BLOCK_C", 16),
                                               ("DKV_SPLIT_T", 0), ("DKV_WARPS", 4),
                                               ("DKV_STAGES", 2), ("num_warps", 4),
                                               ("num_stages", 2)))),
    "window_bwd": KernelDef("window_bwd", "swa", _swa_bwd_context, _swa_bwd_default,
                            _swa_bwd_space, _swa_bwd_smem, lambda s: s.has("swa"),
                            structural=("CUDNN",), min_arch=(("CUDNN", 80),),
                            # (the token tiles are unread too, as in compression_fwd)
                            unread=tuple((n, v, lambda s, c: c["CUDNN"] == 1) for n, v in
                                         (("BLOCK_N", 64), ("DKV_BLOCK_N", 16), ("DKV_WARPS", 4),
                                          ("DKV_STAGES", 2), ("num_warps", 4),
                                          ("num_stages", 2)))),
    # Not one of the three attention branches: "gate" names its launcher module (ops/gate.py),
    # autograd (GateFunction) and reference (naive_gate). nsa() gates every spec's output, a
    # single branch's too (o = g * o_br), so it applies to every spec.
    "gate_fwd": KernelDef("gate_fwd", "gate", _gate_fwd_context, _gate_fwd_default,
                          _gate_fwd_space, _gate_fwd_smem, lambda s: True),
    # Decode (nsa_decode): the compressed attention and block scores, then the selected and
    # window attention with the gated sum. The second runs for every spec (its combine
    # kernel gates the output).
    "decode_select": KernelDef("decode_select", "decode", _decode_select_context,
                               _decode_select_default, _decode_select_space, _decode_select_smem,
                               lambda s: s.has("cmp") or s.has("slc"), launch_bound=True),
    "decode_attend": KernelDef("decode_attend", "decode", _decode_attend_context,
                               _decode_attend_default, _decode_attend_space, _decode_attend_smem,
                               lambda s: True, launch_bound=True),
    # phi = mean, before the compressed attention and top-n, which read its output.
    "compress_mean": KernelDef("compress_mean", "cmp", _compress_mean_context,
                               _compress_mean_default, _compress_mean_space, _compress_mean_smem,
                               lambda s: s.phi == "mean" and (s.has("cmp") or s.has("slc")),
                               launch_bound=True),
}


def kernel_def(stem: str) -> KernelDef:
    try:
        return KERNELS[stem]
    except KeyError:
        raise KeyError(f"unknown kernel '{stem}' (known: {', '.join(KERNELS)})") from None


def kernel_source(stem: str, spec: NSASpec, config: Config | None = None) -> str:
    """The rendered module source of kernel `stem` for `spec` (default config if None)."""
    kd = kernel_def(stem)
    config = config or kd.default(spec, 4096)
    return codegen.render(kd.template, kd.context(spec, config), spec.spec_hash)


_MODULE_CACHE: dict[tuple, ModuleType] = {}


def kernel_module(stem: str, spec: NSASpec, config: Config) -> ModuleType:
    """The imported generated module of kernel `stem` (cached by content hash). Memoised per
    (stem, spec, config): rendering costs ~0.2 ms, too much for every launch."""
    key = (stem, spec, config, codegen.cache_root())
    mod = _MODULE_CACHE.get(key)
    if mod is None:
        # A tuning key's module is its kernel's: the same file for the same source.
        mod = _MODULE_CACHE[key] = codegen.load_module(kernel_def(stem).renders or stem,
                                                       kernel_source(stem, spec, config))
    return mod


def kernel_fn(stem: str, spec: NSASpec, config: Config):
    return getattr(kernel_module(stem, spec, config), kernel_def(stem).kernel_name)
