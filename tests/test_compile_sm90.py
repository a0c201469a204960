"""Generated kernels compile for an H100/H200 (sm90) on this CPU-only machine.

The interpreter runs what Triton's compiler rejects: it does not check that a loop keeps its
carried types or that both branches of a runtime `if` bind a name to one type. On the GPU
those are compile errors (session 6: four top-n variants). Triton's nvidia backend and ptxas
ship in the triton wheel, so each kernel is compiled ahead of time for sm90 here, down to a
cubin, without a GPU.

The compiles run in a subprocess: the test session imported Triton in interpreter mode, in
which its own jitted library functions are interpreted ones. `python tests/test_compile_sm90.py
SPEC` runs one spec's list by hand.
"""
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def topn_configs(spec):
    """Every merge x INSERT x key width at the default tiles, TMA with each key width, and the
    summed importance (IMP "sum") with each merge and key width, and the transposed sum
    (IMP "tsum") and the group sum on the tensor cores (IMP "mma", where the space has it)
    with and without TMA and with each key width; the S-wide running list (LIST = 1) at each
    chunk width wider than S, with the sort (with insertions), the bitonic and the hcube
    merge, and with IMP "mma" at the widest chunk."""
    from nsa_gen.kernels import kernel_def
    kd = kernel_def("topn")
    base, space = kd.default(spec, 65536), kd.space(spec)
    return ([base.replace(MERGE=m, INSERT=i, KEY=k)
             for m, i, k in itertools.product(space["MERGE"], space["INSERT"], space["KEY"])]
            + [base.replace(TMA=1, KEY=k) for k in space["KEY"]]
            + [base.replace(IMP="sum", MERGE=m, KEY=k)
               for m, k in itertools.product(space["MERGE"], space["KEY"])]
            + [base.replace(IMP=i, TMA=t, KEY=k)
               for i, t, k in itertools.product([i for i in ("tsum", "mma") if i in space["IMP"]],
                                                space["TMA"], space["KEY"])]
            + [base.replace(BJ=bj, LIST=1, MERGE=m, INSERT=i)
               for bj, (m, i) in itertools.product([b for b in space["BJ"] if b > spec.S],
                                                   [("sort", 8), ("bitonic", 0), ("hcube", 0)])]
            + [base.replace(BJ=space["BJ"][-1], LIST=1, IMP=i, MERGE="sort", INSERT=8, TMA=1)
               for i in ("mma",) if i in space["IMP"] and space["BJ"][-1] > spec.S])


def topn_signature(spec, config) -> dict:
    """Argument types of nsa_topn_kernel as its launcher passes them (bf16 inputs)."""
    sig = {"q": "*bf16", "lse": "*fp32", "block_idx": "*i32", "tiles": "*i32", "key_mask": "i32"}
    if config["TMA"]:
        from nsa_gen.kernels import topn_bc
        from nsa_gen.ops.common import dim_widths
        rows = topn_bc(spec, config)
        sig.update({f"k_cmp{i}": f"tensordesc<bf16[{rows}, {w}]>"
                    for i, w in enumerate(dim_widths(spec.DK))})
    else:
        sig["k_cmp"] = "*bf16"
    return sig


def share_configs(spec):
    """The group-centric selected forward with SHARE 2 and 4, pointer and TMA loads."""
    from nsa_gen.kernels import kernel_def
    base = kernel_def("selection_fwd").default(spec, 65536).replace(BLOCK_Q=0)
    return [base.replace(SHARE=n, TMA=t) for n in (2, 4) for t in (0, 1)]


def share_signature(spec, config) -> tuple[dict, dict]:
    """Argument types and constexprs of the group-centric nsa_selection_fwd_kernel."""
    from nsa_gen.kernels import next_pow2
    from nsa_gen.ops.common import dim_widths
    sig = {"q": "*bf16", "block_idx": "*i32", "o": "*bf16", "lse": "*fp32", "seq_start": "*i32",
           "T": "i32"}
    bn = config["BLOCK_N"]
    if config["TMA"]:
        sig.update({f"k{i}": f"tensordesc<bf16[{bn}, {w}]>" for i, w in enumerate(dim_widths(spec.DK))})
        sig["v"] = f"tensordesc<bf16[{bn}, {next_pow2(spec.DV)}]>"
    else:
        sig.update(k="*bf16", v="*bf16")
    return sig, {"IS_VARLEN": True}


def gated_runs(spec) -> list[tuple]:
    """The selected forward storing the gated sum (nsa() without autograd): the group-centric
    kernel and the query-batched combine kernel, o_cmp read in row pieces (bf16)."""
    from nsa_gen.kernels import kernel_def
    base = kernel_def("selection_fwd").default(spec, 65536).replace(GATED=1, TMA=0, FORCED=0)
    gate = {"g_slc": "*bf16", "o_cmp": "*bf16", "o_cmp_tail": "*bf16", "cmp_r0": "i32",
            "cmp_r1": "i32", "g_cmp": "*bf16", "o_swa": "*bf16", "g_swa": "*bf16"}
    flags = {"HAS_CMP": 1, "HAS_SWA": int(spec.w > 0)}
    group, consts = share_signature(spec, base.replace(BLOCK_Q=0))
    combine = {"block_idx": "*i32", "o_part": "*bf16", "lse_part": "*fp32", "o": "*bf16",
               "lse": "*fp32", "row_base": "i32"}
    return [("selection_fwd", None, base.replace(BLOCK_Q=0), {**group, **gate},
             {**consts, **flags}),
            ("selection_fwd", "nsa_selection_fwd_combine_kernel", base.replace(BLOCK_Q=4),
             {**combine, **gate}, flags)]


# The query-batched forward's block-list kernels, in launch order (ops.selection._query_lists).
LIST_KERNELS = ("bins", "edges", "scan", "segments")


def list_runs(spec) -> list[tuple]:
    """The query-batched forward's block-list kernels of packed sequences (resources' test
    compiles them for a dense batch), with FORCED and 16- and 32-bit sort keys."""
    from nsa_gen.kernels import kernel_def
    space = kernel_def("selection_fwd").space(spec)
    cfg = kernel_def("selection_fwd").default(spec, 65536).replace(
        BLOCK_Q=[b for b in space["BLOCK_Q"] if b][0], FORCED=space["FORCED"][-1], TMA=0, GATED=0)
    ints = {a: "i32" for a in ("r0", "n_rows", "T", "n_blk", "n_pairs", "n_bin", "n_seg", "STEPS")}
    ptrs = {a: "*i32" for a in ("block_idx", "row_block", "seq_start", "first", "seg_end",
                                "segments", "key_row", "row_end")}
    keyed = ("bins", "edges")  # the kernels that read the sort keys
    return [("selection_fwd", f"nsa_selection_fwd_{k}_kernel", cfg,
             {**ints, **ptrs, "key": key, "sorted_key": key},
             {"BLOCK": 1024, **({"IS_VARLEN": True} if k in ("bins", "segments") else {})})
            for k in LIST_KERNELS for key in (("*i16", "*i32") if k in keyed else ("*i32",))]


def decode_runs(spec) -> list[tuple]:
    """The decode kernels at their default configs, as their launchers call them (bf16):
    (stem, kernel name, config, signature, constexprs)."""
    from nsa_gen.kernels import kernel_def
    sel, att = (kernel_def(s).default(spec, 65536) for s in ("decode_select", "decode_attend"))
    ptr = {"q": "*bf16", "k_cmp": "*bf16", "v_cmp": "*bf16", "lengths": "*i32", "sc": "*fp32",
           "gp": "*fp32", "SQ": "i32", "NCMAX": "i32", "TMAX": "i32", "NS": "i32",
           "k_slc": "*bf16", "v_slc": "*bf16", "k_swa": "*bf16", "v_swa": "*bf16",
           "block_idx": "*i32", "part_o": "*fp32", "part_ml": "*fp32", "cmp_o": "*fp32",
           "cmp_ml": "*fp32", "g_cmp": "*bf16", "g_slc": "*bf16", "g_swa": "*bf16", "o": "*bf16"}
    n_slc, n_swa = 4, 4 if spec.w else 0
    return [("decode_select", "nsa_decode_select_kernel", sel, ptr, {"DOT_PRECISION": None}),
            ("decode_select", "nsa_decode_scores_kernel", sel, ptr, {}),
            ("decode_select", "nsa_decode_topn_kernel", sel, ptr, {"NS_PAD": 1024}),
            ("decode_attend", "nsa_decode_attend_kernel", att, ptr,
             {"N_SLC": n_slc, "DOT_PRECISION": None}),
            ("decode_attend", "nsa_decode_combine_kernel", att, ptr,
             {"N_CMP": 16, "N_SLC": n_slc, "N_SWA": n_swa})]


def compile_all(name: str) -> list[str]:
    """Compile each config of topn_configs and share_configs, the gated selected kernels, the
    block-list kernels and the decode kernels, for sm90; the failures, one line each."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nsa_gen.kernels import kernel_def, kernel_module
    from nsa_gen.spec import load_spec
    spec = load_spec(name)
    failed = []
    runs = ([("topn", None, c, topn_signature(spec, c), {}) for c in topn_configs(spec)]
            + [("selection_fwd", None, c, *share_signature(spec, c)) for c in share_configs(spec)]
            + gated_runs(spec) + list_runs(spec) + decode_runs(spec))
    for stem, kernel, cfg, sig, consts in runs:
        fn = getattr(kernel_module(stem, spec, cfg), kernel or kernel_def(stem).kernel_name)
        src = ASTSource(fn, {a: sig.get(a, "constexpr") for a in fn.arg_names},
                        constexprs={(fn.arg_names.index(a),): v for a, v in consts.items()})
        try:
            triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        except Exception as e:  # noqa: BLE001 - collect every failing variant
            lines = [ln for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
            failed.append(f"{kernel or stem} {cfg}: {type(e).__name__}: {lines[-1][:300]}")
    return failed


def run_sm90(tmp_path, args: list[str], timeout: int,
             needs: tuple[str, ...] = ("triton.backends.nvidia",)) -> subprocess.CompletedProcess:
    """`python ARGS` in a subprocess that compiles for the GPU (TRITON_INTERPRET=0) with
    fresh Triton and nsa-gen caches under tmp_path; skips the test when a module of `needs`
    is missing from this triton."""
    import importlib
    for module in needs:
        try:
            importlib.import_module(module)
        except ImportError:
            pytest.skip(f"this triton has no {module}")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "triton"),
               NSA_GEN_CACHE_DIR=str(tmp_path / "gen"), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("name", ["fla-compat", "small-group", "deepseek-nsa"])
def test_variants_compile_for_sm90(name, tmp_path):
    """Top-n tiles of 4 and 16 tokens, DK 128 and 192 (two pieces), G 16 and 4; the decode
    kernels with and without a window (fla-compat has none)."""
    r = run_sm90(tmp_path, [__file__, name], timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_resources_tool_reads_each_launch(tmp_path):
    """benchmarks/resources.py catches an op's launches on the CPU, compiles each for sm90 and
    reads ptxas' report: here the DB's 64k selected forward of fla-compat with FORCED 64, two
    kernels (the forced pass and the main one), and small-group's query-batched one with
    FORCED 64, seven (the forced pass, the four that build the block lists, the partials,
    the combine that merges both)."""
    import re
    r = run_sm90(tmp_path, [str(ROOT / "benchmarks/resources.py"), "fla-compat:selection_fwd:FORCED=64",
                            "small-group:selection_fwd:BLOCK_Q=16,FORCED=64", "--T", "256"],
                 timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    found = re.findall(r"(nsa_\w+_kernel): (\d+) registers, (\d+) B spilled, (\d+) KB shared", r.stdout)
    assert [f[0] for f in found] == ["nsa_selection_fwd_forced_kernel", "nsa_selection_fwd_kernel",
                                     "nsa_selection_fwd_forced_kernel",
                                     *(f"nsa_selection_fwd_{k}_kernel" for k in LIST_KERNELS),
                                     "nsa_selection_fwd_kernel", "nsa_selection_fwd_combine_kernel"]
    assert all(16 <= int(f[1]) <= 255 for f in found), found


def test_compress_mean_compiles_for_sm90(tmp_path):
    """phi = mean at the shipped 64k configs: keys and values (DK 192 and DV 128 for
    deepseek-nsa, two compiles of one module), without spills."""
    import re
    r = run_sm90(tmp_path, [str(ROOT / "benchmarks/resources.py"), "deepseek-nsa:compress_mean",
                            "fla-compat:compress_mean", "--T", "256"], timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    found = re.findall(r"(nsa_\w+_kernel): (\d+) registers, (\d+) B spilled", r.stdout)
    assert [f[0] for f in found] == ["nsa_compress_mean_kernel"] * 4, r.stdout
    assert all(int(f[2]) == 0 for f in found), found


def test_gluon_cmp_probe_compiles(tmp_path):
    """benchmarks/gluon_cmp_probe.py's hand-pipelined Gluon kernel compiles for sm90 and fits
    two programs an SM (its GPU probe must not be the first time it compiles)."""
    import ast
    r = run_sm90(tmp_path, [str(ROOT / "benchmarks/gluon_cmp_probe.py"), "--compile", "fla-compat"],
                 timeout=600, needs=("triton.backends.nvidia", "triton.experimental.gluon"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = ast.literal_eval(r.stdout.strip().splitlines()[-1])
    assert 64 <= report["registers"] <= 255 and 0 < report["smem"] <= 113 * 1024, report


if __name__ == "__main__":
    failures = compile_all(sys.argv[1])
    print("\n".join(failures) or f"{sys.argv[1]}: all compiled")
    sys.exit(1 if failures else 0)
