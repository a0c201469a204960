"""Registers, spills and shared memory of a kernel's launches on an H100/H200 (sm90), on a
machine without a GPU.

Runs the kernel's launcher (`harness.make_case`, small bf16 inputs on the CPU) with the
config the shipped DB gives at --seqlen (params replaced as given), catches each kernel
launch instead of running it, compiles that launch for sm90 with Triton's nvidia backend and
reads ptxas' report (the ptxas that ships in the triton wheel). Per launch it prints the
registers a thread, spill bytes, shared memory, and the programs an SM can hold by each
limit (H100/H200: 65536 registers, 227 KB shared memory, 64 warps).

What it cannot say: how fast. It explains a measurement (session 11: top-n computing the
forced state went from 76 to 213 registers a thread, so 6 programs an SM became 2), it does
not replace one.

Usage: python benchmarks/resources.py SPEC:STEM[:P=V,...] ... [--seqlen 65536] [--T 1024]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REGS, SMEM, WARPS = 65536, 227 * 1024, 64  # per SM, sm90
DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "int32": "i32",
          "int64": "i64", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


def capture(run) -> list[tuple]:
    """(jit function, args, kwargs, grid) of every launch `run()` makes; none of them runs."""
    from triton.runtime.jit import JITFunction
    seen, real = [], JITFunction.run

    def fake(self, *args, grid, warmup, **kwargs):
        seen.append((self, args, kwargs, grid))
    JITFunction.run = fake
    try:
        run()
    finally:
        JITFunction.run = real
    return seen


def arg_type(v) -> str | None:
    """Triton's signature type of a launch argument; None for a constexpr."""
    import torch
    from triton.tools.tensor_descriptor import TensorDescriptor
    if isinstance(v, torch.Tensor):
        return "*" + DTYPES[str(v.dtype).removeprefix("torch.")]
    if isinstance(v, TensorDescriptor):
        dt = DTYPES[str(v.base.dtype).removeprefix("torch.")]
        return f"tensordesc<{dt}[{', '.join(map(str, v.block_shape))}]>"
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"no signature type for {type(v).__name__}")


def aligned(v) -> bool:
    """Whether the JIT marks a launch argument divisible by 16 (a tensor's address, an int),
    as it does on the GPU: without it, the compiler cannot vectorise loads through pointers
    built from it (a gathered tile of 1-element rows is too narrow for the pipeliner's
    asynchronous copies), and the registers and shared memory reported are not the launch's."""
    import torch
    if isinstance(v, torch.Tensor):
        return v.data_ptr() % 16 == 0
    return isinstance(v, int) and not isinstance(v, bool) and v % 16 == 0


def compile_launch(fn, args, kwargs, ptxas: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
    values = dict(zip(fn.arg_names, args), **kwargs)
    sig, consts, attrs = {}, {}, {}
    for p in fn.params:
        v = values.get(p.name, p.default)
        t = None if p.is_constexpr else arg_type(v)
        sig[p.name] = t or "constexpr"
        if t is None:
            consts[(p.num,)] = v
        elif aligned(v):
            attrs[(p.num,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=opts)
    ptx = Path("/tmp") / f"nsa_resources_{os.getpid()}.ptx"
    ptx.write_text(k.asm["ptx"])
    out = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(ptx), "-o", str(ptx.with_suffix(".cubin"))],
                         capture_output=True, text=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spill = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    warps, smem = opts.get("num_warps", 4), k.metadata.shared
    # Registers are allocated per warp in multiples of 8 a thread.
    fits = {"registers": REGS // (-(-regs // 8) * 8 * 32 * warps),
            "smem": SMEM // smem if smem else WARPS // warps, "warps": WARPS // warps}
    return {"kernel": fn.__name__, "num_warps": warps, "num_stages": opts.get("num_stages"),
            "registers": regs, "spill_bytes": spill, "smem": smem, "programs_per_sm": fits}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="SPEC:STEM[:P=V,...]")
    ap.add_argument("--seqlen", type=int, default=65536, help="T of the DB entry to take")
    ap.add_argument("--T", type=int, default=1024, help="tokens of the (CPU) inputs")
    args = ap.parse_args()
    import torch
    import triton

    from nsa_gen.config import parse_assignments
    from nsa_gen.db.dispatch import Dispatcher
    from nsa_gen.db.store import DeviceKey
    from nsa_gen.harness import make_case
    from nsa_gen.spec import load_spec
    ptxas = str(Path(triton.__file__).parent / "backends/nvidia/bin/ptxas")
    h200 = DeviceKey("sm90", 132, 140, "NVIDIA H200", 232448)  # the shipped DB's device
    for run in args.runs:
        name, stem, *rest = run.split(":")
        spec = load_spec(name)
        cfg = Dispatcher(device=h200).get(stem, spec, args.seqlen, 1)
        if rest:
            cfg = cfg.replace(**parse_assignments(rest[0].split(",")))
        case = make_case(stem, spec, args.T, dtype=torch.bfloat16, device="cpu")
        print(f"{name} {stem} {cfg}")
        for fn, a, kw, _ in capture(lambda: case.run(cfg)):
            r = compile_launch(fn, a, dict(kw), ptxas)
            print(f"  {r['kernel']}: {r['registers']} registers, {r['spill_bytes']} B spilled, "
                  f"{r['smem'] / 1024:.0f} KB shared; programs an SM by {r['programs_per_sm']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
