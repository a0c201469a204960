"""Probe: how fast could the compressed attention's forward be on an H200 with explicit
control of the wgmma pipeline? A hand-written Gluon kernel (Triton's lower-level language)
against the generated Triton kernel (compression_fwd, the DB config), same inputs.

Why: the generated kernel waits for each tile's Q.K^T right after issuing it (Triton keeps a
dot asynchronous only in narrow cases, RESULTS run 34), so a program's softmax and its
tensor-core work take turns. In Gluon, `warpgroup_mma_wait(num_outstanding=1)` lets the
next tile's Q.K^T and this tile's P.V run while the softmax runs (FlashAttention-3's
intra-warpgroup overlap), with TMA loads in a ring of STAGES buffers.

Measured (RESULTS run 34, H200, 64k): correct (o within 9e-6 of the Triton kernel's, lse
within 1.5e-6) but slower. fla-compat, against 3.03-3.08 ms:
- 3.66 ms as first written. ptxas reported C7514: it serialises the wgmmas when one is in
  flight across the loop's back edge.
- `DRAIN=1` (each step ends with wait(0), keeping the Q.K^T / softmax overlap): 3.27-3.32 ms.
- `QREG=1` (Q as the register operand): 3.27-3.34 ms.
small-group: 5.06-5.13 ms against 4.89-4.93. So the turn-taking inside a program is not what
bounds the generated kernel: its two programs an SM already overlap each other's phases.
`--compile SPEC [DRAIN [QREG]]` prints ptxas' report without a GPU.

Scope: a probe, not a product kernel. One sequence (B = 1), G * BLOCK_T = 64 query rows
(4 warps, one warpgroup), DK = DV (one head-dim piece), compressed blocks as compress_mean
gives them. It checks its output against compression_fwd's (bf16 rounding apart) and
reports both times (do_bench medians).

Usage: python benchmarks/gluon_cmp_probe.py [--seqlen 65536] [--out DIR] fla-compat:STAGES=2,BLOCK_C=64 ...
       python benchmarks/gluon_cmp_probe.py --compile [SPEC]   (sm90 compile and ptxas report, no GPU)
"""
from __future__ import annotations

import sys
from pathlib import Path

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@gluon.jit
def _scores(s, m_i, l_i, c0, hi_row, hi_all, BLOCK_C: gl.constexpr, SCALE_LOG2: gl.constexpr,
            s_layout: gl.constexpr):
    """The online softmax of one tile's raw scores s: (p, alpha, m, l)."""
    s = s * SCALE_LOG2
    if c0 + BLOCK_C > hi_all:  # a tile some row does not see whole: the causal edge
        cols = c0 + gl.arange(0, BLOCK_C, layout=gl.SliceLayout(0, s_layout))
        s = gl.where(gl.expand_dims(cols, 0) < gl.expand_dims(hi_row, 1), s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s - gl.expand_dims(m_safe, 1))
    alpha = gl.exp2(m_i - m_safe)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_i


@gluon.jit
def _step(i, s, acc_tok, m_i, l_i, q_op, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc, s_zero,
          hi_row, hi_all, n_tiles, i_h, DK: gl.constexpr, DV: gl.constexpr, BLOCK_C: gl.constexpr,
          STAGES: gl.constexpr, SCALE_LOG2: gl.constexpr, s_layout: gl.constexpr,
          o_layout: gl.constexpr, p_layout: gl.constexpr, DRAIN: gl.constexpr):
    """Tile i (not the last), whose scores s are ready: issue tile i + 1's Q.K^T, softmax tile
    i, issue its P.V, and wait for the Q.K^T (tile i - 1's P.V in flight on entry, tile i's
    on return; wgmma groups complete in order). The scores cross the loop's back edge
    complete, since a wgmma result in flight there gets copied between registers. ptxas
    still serialises every wgmma (C7514) while the P.V crosses it; DRAIN waits for that
    too."""
    st = i % STAGES
    if i + STAGES < n_tiles:  # this tile's K buffer is free
        mbarrier.expect(k_bar.index(st), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [(i + STAGES) * BLOCK_C, i_h * DK], k_bar.index(st),
                                        k_smem.index(st))
    nx = (i + 1) % STAGES
    mbarrier.wait(k_bar.index(nx), ((i + 1) // STAGES) & 1)
    s_tok = warpgroup_mma(q_op, k_smem.index(nx).permute((1, 0)), s_zero, use_acc=False,
                          is_async=True)
    p, alpha, m_i, l_i = _scores(s, m_i, l_i, i * BLOCK_C, hi_row, hi_all, BLOCK_C, SCALE_LOG2,
                                 s_layout)
    # The previous P.V (older than the Q.K^T just issued) must end before acc is scaled; then
    # its V buffer is free.
    acc = warpgroup_mma_wait(1, deps=(acc_tok, ))
    if i >= 1:
        if i - 1 + STAGES < n_tiles:
            pv = (i - 1) % STAGES
            mbarrier.expect(v_bar.index(pv), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [(i - 1 + STAGES) * BLOCK_C, i_h * DV],
                                            v_bar.index(pv), v_smem.index(pv))
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
    mbarrier.wait(v_bar.index(st), (i // STAGES) & 1)
    p16 = gl.convert_layout(p.to(v_smem.dtype), p_layout)
    acc_tok = warpgroup_mma(p16, v_smem.index(st), acc, is_async=True)
    if DRAIN:  # P.V too: nothing in flight at the back edge
        s = warpgroup_mma_wait(0, deps=(s_tok, ))
    else:
        s = warpgroup_mma_wait(1, deps=(s_tok, ))
    return s, acc_tok, m_i, l_i


@gluon.jit
def gluon_cmp_kernel(q_ptr, k_desc, v_desc, o_ptr, lse_ptr, T,
                     HQ: gl.constexpr, G: gl.constexpr, DK: gl.constexpr, DV: gl.constexpr,
                     L: gl.constexpr, D: gl.constexpr, BLOCK_T: gl.constexpr,
                     BLOCK_C: gl.constexpr, STAGES: gl.constexpr, SCALE_LOG2: gl.constexpr,
                     DRAIN: gl.constexpr, QREG: gl.constexpr, num_warps: gl.constexpr):
    ROWS: gl.constexpr = BLOCK_T * G
    i_tile = gl.num_programs(0) - 1 - gl.program_id(0)  # the longest programs first
    i_h = gl.program_id(1)
    t0 = i_tile * BLOCK_T

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_C, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, DV, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)

    # Query tile: row r is token t0 + r // G, head i_h * G + r % G.
    r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, ld_layout))
    c = gl.arange(0, DK, layout=gl.SliceLayout(0, ld_layout))
    tok = t0 + r // G
    q_off = ((tok * HQ + i_h * G + r % G).to(gl.int64) * DK)
    q = gl.load(q_ptr + gl.expand_dims(q_off, 1) + gl.expand_dims(c, 0),
                mask=gl.expand_dims(tok < T, 1), other=0.0)
    q_smem = gl.allocate_shared_memory(q.dtype, [ROWS, DK],
                                       gl.NVMMASharedLayout.get_default_for([ROWS, DK], q.dtype))
    q_smem.store(q)
    fence_async_shared()
    if QREG:  # Q as the register operand: Q.K^T then reads only K from shared memory
        q_op = q_smem.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))
    else:
        q_op = q_smem

    # Visible compressed blocks: row t sees blocks i < (t + 1 - L) // D + 1.
    rs = gl.arange(0, ROWS, layout=row_s)
    hi_row = gl.maximum((t0 + rs // G + 1 - L + D) // D, 0)
    pos_last = gl.minimum(t0 + BLOCK_T, T) - 1
    hi = gl.maximum((pos_last + 1 - L + D) // D, 0)
    hi_all = gl.maximum((t0 + 1 - L + D) // D, 0)
    n_tiles = gl.maximum(gl.cdiv(hi, BLOCK_C), 1)

    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_C, DK], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_C, DV], v_desc.layout)
    k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(STAGES):
        mbarrier.init(k_bar.index(b), count=1)
        mbarrier.init(v_bar.index(b), count=1)
    for b in gl.static_range(STAGES):
        if b < n_tiles:
            mbarrier.expect(k_bar.index(b), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [b * BLOCK_C, i_h * DK], k_bar.index(b), k_smem.index(b))
            mbarrier.expect(v_bar.index(b), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [b * BLOCK_C, i_h * DV], v_bar.index(b), v_smem.index(b))

    m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([ROWS], gl.float32, layout=row_s)
    s_zero = gl.zeros([ROWS, BLOCK_C], gl.float32, layout=s_layout)
    acc = gl.zeros([ROWS, DV], gl.float32, layout=o_layout)

    mbarrier.wait(k_bar.index(0), 0)
    s = warpgroup_mma(q_op, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False)
    # Enter the loop as its back edge does, with a P.V in flight (here 0 . V, which zeroes
    # acc), so both paths into a step are alike. (It did not clear ptxas' C7514; DRAIN does.)
    mbarrier.wait(v_bar.index(0), 0)
    p_zero = gl.zeros([ROWS, BLOCK_C], q.dtype, layout=p_layout)
    acc_tok = warpgroup_mma(p_zero, v_smem.index(0), acc, use_acc=False, is_async=True)
    for i in range(n_tiles - 1):
        s, acc_tok, m_i, l_i = _step(i, s, acc_tok, m_i, l_i, q_op, k_smem, v_smem, k_bar, v_bar,
                                     k_desc, v_desc, s_zero, hi_row, hi_all, n_tiles, i_h, DK, DV,
                                     BLOCK_C, STAGES, SCALE_LOG2, s_layout, o_layout, p_layout, DRAIN)
    # The last tile.
    i = n_tiles - 1
    st = i % STAGES
    p, alpha, m_i, l_i = _scores(s, m_i, l_i, i * BLOCK_C, hi_row, hi_all, BLOCK_C, SCALE_LOG2, s_layout)
    acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
    mbarrier.wait(v_bar.index(st), (i // STAGES) & 1)
    p16 = gl.convert_layout(p.to(q.dtype), p_layout)
    acc = warpgroup_mma(p16, v_smem.index(st), acc)
    for b in gl.static_range(STAGES):
        mbarrier.invalidate(k_bar.index(b))
        mbarrier.invalidate(v_bar.index(b))

    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    o = acc / gl.expand_dims(gl.where(l_o > 0, l_o, 1.0), 1)
    ro = gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
    co = gl.arange(0, DV, layout=gl.SliceLayout(0, o_layout))
    tok_o = t0 + ro // G
    o_off = (tok_o * HQ + i_h * G + ro % G).to(gl.int64) * DV
    gl.store(o_ptr + gl.expand_dims(o_off, 1) + gl.expand_dims(co, 0), o.to(q.dtype),
             mask=gl.expand_dims(tok_o < T, 1))
    tok_l = t0 + rs // G
    lse = gl.where(l_i > 0, (m_i + gl.log2(gl.where(l_i > 0, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    gl.store(lse_ptr + tok_l * HQ + i_h * G + rs % G, lse, mask=tok_l < T)


def _constexprs(spec, BLOCK_C, STAGES, DRAIN, QREG, BLOCK_T=None) -> dict:
    """The kernel's compile-time arguments for `spec`: one place for the launch and the
    ahead-of-time compile."""
    return dict(HQ=spec.HQ, G=spec.G, DK=spec.DK, DV=spec.DV, L=spec.l, D=spec.d,
                BLOCK_T=BLOCK_T or 64 // spec.G, BLOCK_C=BLOCK_C, STAGES=STAGES,
                SCALE_LOG2=spec.softmax_scale * 1.4426950408889634, DRAIN=DRAIN, QREG=QREG)


def gluon_cmp(q, k_cmp, v_cmp, spec, BLOCK_C=64, STAGES=2, BLOCK_T=None, DRAIN=0, QREG=0):
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    B, T = q.shape[:2]
    assert B == 1 and spec.DK == spec.DV and spec.DK in (64, 128)
    consts = _constexprs(spec, BLOCK_C, STAGES, DRAIN, QREG, BLOCK_T)
    NC = k_cmp.shape[1]
    k2 = k_cmp.reshape(NC, spec.H * spec.DK)
    v2 = v_cmp.reshape(NC, spec.H * spec.DV)
    lay = gl.NVMMASharedLayout.get_default_for([BLOCK_C, spec.DK], gl.bfloat16)
    k_desc = TensorDescriptor(k2, list(k2.shape), list(k2.stride()), [BLOCK_C, spec.DK], lay)
    v_desc = TensorDescriptor(v2, list(v2.shape), list(v2.stride()), [BLOCK_C, spec.DV], lay)
    o = torch.empty(B, T, spec.HQ, spec.DV, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, T, spec.HQ, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(T, consts["BLOCK_T"]), spec.H)
    gluon_cmp_kernel[grid](q, k_desc, v_desc, o, lse, T, **consts, num_warps=4)
    return o, lse


def compile_sm90(name: str, BLOCK_C: int = 64, STAGES: int = 2, DRAIN: int = 0, QREG: int = 0) -> dict:
    """Compile the kernel for sm90 on any machine (no GPU needed) and read ptxas' report:
    registers, shared memory, and its performance advisories (C7514/C7515: wgmmas serialised
    because other instructions touch an in-flight wgmma's accumulator registers)."""
    import os
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from nsa_gen.spec import load_spec
    spec = load_spec(name)
    fn = gluon_cmp_kernel
    lay = gl.NVMMASharedLayout.get_default_for([BLOCK_C, spec.DK], gl.bfloat16)
    sig = {"q_ptr": "*bf16", "o_ptr": "*bf16", "lse_ptr": "*fp32", "T": "i32",
           "k_desc": f"tensordesc<bf16[{BLOCK_C}, {spec.DK}],{lay}>",
           "v_desc": f"tensordesc<bf16[{BLOCK_C}, {spec.DV}],{lay}>"}
    consts = dict(_constexprs(spec, BLOCK_C, STAGES, DRAIN, QREG), num_warps=4)
    src = GluonASTSource(fn, {a: sig.get(a, "constexpr") for a in fn.arg_names},
                         constexprs={(fn.arg_names.index(a),): v for a, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptxas = str(Path(triton.__file__).parent / "backends/nvidia/bin/ptxas")
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        Path(ptx).write_text(k.asm["ptx"])
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", ptx + ".cubin"],
                             capture_output=True, text=True).stderr
    return {"registers": int(re.search(r"Used (\d+) registers", out).group(1)),
            "smem": k.metadata.shared, "advisories": sorted(set(re.findall(r"C75\d\d", out)))}


def probe(run: str, T: int) -> dict:
    import torch

    from nsa_gen.benchmark import _bench
    from nsa_gen.config import parse_assignments
    from nsa_gen.db.dispatch import default_dispatcher
    from nsa_gen.ops.compression import compress_mean, compression_fwd
    from nsa_gen.spec import load_spec
    name, overrides = (run.split(":", 1) + [""])[:2]
    kw = parse_assignments(filter(None, overrides.split(",")))
    spec = load_spec(name)
    cfg = default_dispatcher().get("compression_fwd", spec, T, 1)
    torch.manual_seed(T)
    q = torch.randn(1, T, spec.HQ, spec.DK, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, T, spec.H, spec.DK, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, T, spec.H, spec.DV, device="cuda", dtype=torch.bfloat16)
    k_cmp, _ = compress_mean(k, spec.l, spec.d)
    v_cmp, _ = compress_mean(v, spec.l, spec.d)
    row = {"spec": name, "T": T, "triton_config": str(cfg), "gluon": dict(kw)}
    o_ref, lse_ref = compression_fwd(q, k_cmp, v_cmp, spec, cfg)
    row["triton_ms"] = _bench(lambda: compression_fwd(q, k_cmp, v_cmp, spec, cfg))
    try:
        o, lse = gluon_cmp(q, k_cmp, v_cmp, spec, **kw)
        torch.cuda.synchronize()
        row["rel_err_o"] = ((o.float() - o_ref.float()).norm() / o_ref.float().norm()).item()
        fin = torch.isfinite(lse_ref)
        row["max_err_lse"] = (lse[fin] - lse_ref[fin]).abs().max().item()
        row["lse_inf_same"] = bool((torch.isfinite(lse) == fin).all().item())
        row["gluon_ms"] = _bench(lambda: gluon_cmp(q, k_cmp, v_cmp, spec, **kw))
    except Exception as e:  # noqa: BLE001 - a probe reports what failed
        row["gluon_error"] = f"{type(e).__name__}: {str(e)[-600:]}"
    return row


if __name__ == "__main__":
    if sys.argv[1:2] == ["--compile"]:  # no GPU needed
        print(compile_sm90(*sys.argv[2:3], DRAIN=int(sys.argv[3]) if len(sys.argv) > 3 else 0,
                           QREG=int(sys.argv[4]) if len(sys.argv) > 4 else 0))
        sys.exit(0)
    from probe_main import probe_main
    sys.exit(probe_main("gluon_cmp_probe", "SPEC[:BLOCK_C=..,STAGES=..]", probe))
