"""GPU checks that `nsa-gen verify` does not make, written as a markdown report and JSON.

1. Determinism: `nsa()` forward + backward twice on the same inputs (one sequence and packed
   sequences); the output and every gradient (q, k, v, gates) must be bitwise equal. The one
   variant that is not deterministic is compression_bwd's CUDNN (cuDNN accumulates dq with
   atomics): the report says where the dispatched config has it, and --deterministic runs
   under torch.use_deterministic_algorithms(True, warn_only=True), where the kernels replace it.
2. The compressed dk/dv split cap at long T: `compression_bwd` with its default config
   (token splits, at most MAX_DKV_SPLITS) against the same config unsplit (DKV_SPLIT_T = 0),
   both on the GPU: relative error of dq/dk/dv and the time of each.

Usage: python benchmarks/gpu_checks.py --out DIR [--specs ...] [-T 8192] [--split-T 131072]
       [--deterministic]
Runs on the CPU too (TRITON_INTERPRET=1) with small T, which is how it is tested.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nsa_gen.harness import OP, OP_VARLEN, make_case, rel_error  # noqa: E402
from nsa_gen.kernels import KERNELS, num_cmp_blocks  # noqa: E402
from nsa_gen.ops.compression import dkv_splits  # noqa: E402
from nsa_gen.spec import load_spec  # noqa: E402


def determinism(spec, T, dtype, device, varlen, seed=0) -> dict:
    """Two runs of nsa() forward + backward (the harness's op case, on one sequence or on
    packed ones): are the output and all gradients bitwise equal?"""
    case = make_case(OP_VARLEN if varlen else OP, spec, T, dtype=dtype, device=device, seed=seed)
    a, b = case.run(), case.run()
    names = ["o", "dq", "dk", "dv"] + [f"dg_{n}" for n in ("cmp", "slc", "swa") if spec.has(n)]
    equal = {n: bool(torch.equal(x, y)) for n, x, y in zip(names, a, b)}
    from nsa_gen.db.dispatch import default_dispatcher
    bwd = default_dispatcher().get("compression_bwd", spec, T, 1) if spec.has("cmp") else None
    return dict(spec=spec.name, T=T, varlen=varlen, dtype=str(dtype).replace("torch.", ""),
                bitwise_equal=all(equal.values()), per_tensor=equal,
                cmp_bwd_cudnn=bool(bwd is not None and bwd.get("CUDNN", 0)))


def _time_ms(fn, device) -> float:
    if device == "cuda":
        from nsa_gen.benchmark import _bench
        return _bench(fn, warmup=50, rep=300)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def split_cap(spec, T, dtype, device, seed=0) -> dict:
    """compression_bwd's default (split) config against the same config unsplit, on the
    harness's inputs."""
    case = make_case("compression_bwd", spec, T, dtype=dtype, device=device, seed=seed)
    split_cfg = KERNELS["compression_bwd"].default(spec, T)
    whole_cfg = split_cfg.replace(DKV_SPLIT_T=0)
    out = {name: (case.run(cfg), _time_ms(lambda: case.run(cfg), device))
           for name, cfg in (("split", split_cfg), ("whole", whole_cfg))}
    errs = {n: rel_error(a, b) for n, a, b in zip(("dq", "dk", "dv"), out["split"][0], out["whole"][0])}
    split = split_cfg.get("DKV_SPLIT_T", 0)
    n_split = dkv_splits(T, split, split_cfg["DKV_BLOCK_T"])[1] if split else 1
    return dict(spec=spec.name, T=T, NC=num_cmp_blocks(T, spec.l, spec.d), config=str(split_cfg),
                n_split=n_split, rel_error=errs, split_ms=out["split"][1], whole_ms=out["whole"][1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="writes OUT.md and OUT.json")
    ap.add_argument("--specs", nargs="+", default=["deepseek-nsa", "fla-compat", "small-group", "mqa"])
    ap.add_argument("-T", type=int, default=8192, help="tokens of the determinism runs")
    ap.add_argument("--split-T", type=int, default=131072, help="tokens of the split-cap check")
    ap.add_argument("--split-spec", default="deepseek-nsa")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on the GPU, float32 on the CPU")
    ap.add_argument("--deterministic", action="store_true",
                    help="run under torch.use_deterministic_algorithms(True, warn_only=True)")
    args = ap.parse_args(argv)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))

    det = [determinism(load_spec(s), args.T, dtype, device, varlen)
           for s in args.specs for varlen in (False, True)]
    cap = split_cap(load_spec(args.split_spec), args.split_T, dtype, device)
    lines = [f"# GPU checks ({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, "
             f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')})", "",
             f"## Determinism: nsa() forward + backward run twice, {dtype}, T = {args.T}"
             + (", torch.use_deterministic_algorithms(True)" if args.deterministic else ""), "",
             "| spec | packed | dispatched compression_bwd CUDNN | bitwise equal | tensors that differ |",
             "|---|---|---|---|---|"]
    for r in det:
        diff = ", ".join(n for n, ok in r["per_tensor"].items() if not ok) or "-"
        lines.append(f"| {r['spec']} | {'yes' if r['varlen'] else 'no'} | "
                     f"{'yes' if r['cmp_bwd_cudnn'] else 'no'} | "
                     f"{'yes' if r['bitwise_equal'] else 'NO'} | {diff} |")
    lines += ["", f"## compression_bwd split cap: {cap['spec']}, T = {cap['T']} (NC = {cap['NC']})", "",
              f"Default config `{cap['config']}`: {cap['n_split']} splits. Against the same config "
              f"unsplit (DKV_SPLIT_T = 0):", "",
              "| grad | rel error split vs whole |", "|---|---|"]
    lines += [f"| {n} | {e:.2e} |" for n, e in cap["rel_error"].items()]
    lines += ["", f"split {cap['split_ms']:.2f} ms, whole {cap['whole_ms']:.2f} ms"]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(dict(determinism=det, split_cap=cap), indent=1))
    # (cuDNN's backward is allowed to differ run to run, unless determinism was asked for)
    ok = (all(r["bitwise_equal"] or (r["cmp_bwd_cudnn"] and not args.deterministic) for r in det)
          and max(cap["rel_error"].values()) < 2e-2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
