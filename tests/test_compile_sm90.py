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
    """Every merge x INSERT x key width at the default tiles, and TMA with each key width."""
    from nsa_gen.kernels import kernel_def
    kd = kernel_def("topn")
    base, space = kd.default(spec, 65536), kd.space(spec)
    return ([base.replace(MERGE=m, INSERT=i, KEY=k)
             for m, i, k in itertools.product(space["MERGE"], space["INSERT"], space["KEY"])]
            + [base.replace(TMA=1, KEY=k) for k in space["KEY"]])


def topn_signature(spec, config) -> dict:
    """Argument types of nsa_topn_kernel as its launcher passes them (bf16 inputs)."""
    sig = {"q": "*bf16", "lse": "*fp32", "block_idx": "*i32", "tiles": "*i32", "key_mask": "i32"}
    if config["TMA"]:
        from nsa_gen.ops.common import dim_widths
        rows = config["BJ"] * spec.BS // spec.d
        sig.update({f"k_cmp{i}": f"tensordesc<bf16[{rows}, {w}]>"
                    for i, w in enumerate(dim_widths(spec.DK))})
    else:
        sig["k_cmp"] = "*bf16"
    return sig


def compile_all(name: str) -> list[str]:
    """Compile each config of topn_configs for sm90; the failures, one line each."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nsa_gen.kernels import kernel_fn
    from nsa_gen.spec import load_spec
    spec = load_spec(name)
    failed = []
    for cfg in topn_configs(spec):
        fn = kernel_fn("topn", spec, cfg)
        sig = topn_signature(spec, cfg)
        src = ASTSource(fn, {a: sig.get(a, "constexpr") for a in fn.arg_names})
        try:
            triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        except Exception as e:  # noqa: BLE001 - collect every failing variant
            lines = [ln for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
            failed.append(f"{cfg}: {type(e).__name__}: {lines[-1][:300]}")
    return failed


@pytest.mark.parametrize("name", ["fla-compat", "small-group"])
def test_topn_variants_compile_for_sm90(name, tmp_path):
    """fla-compat and small-group: top-n tiles of 4 and 16 tokens."""
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no nvidia backend")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "triton"),
               NSA_GEN_CACHE_DIR=str(tmp_path / "gen"), PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, __file__, name], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


if __name__ == "__main__":
    failures = compile_all(sys.argv[1])
    print("\n".join(failures) or f"{sys.argv[1]}: all compiled")
    sys.exit(1 if failures else 0)
