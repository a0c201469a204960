"""Time a grid of configs of one or more kernels on the GPU (exploration, not tuning: no
DB is written). Configs are compiled in parallel first (nsa_gen.tuning.prewarm), then each
is checked against the reference at 2048 tokens and timed at the real shape with do_bench.

    python benchmarks/sweep.py PLAN.json [--out results.json] [--jobs N]

PLAN is a list of {"spec": NAME, "stem": STEM, "T": int, "grid": {param: [values]},
"profile": bool}. Parameters the grid leaves out keep the kernel's default; points outside
the kernel's pruned space are skipped with the reason. With "profile", every config's
time is also split by CUDA kernel (torch.profiler), e.g. dq against dk/dv.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _kernel_split(fn) -> dict[str, float]:
    """The six slowest kernels of one call of fn, ms per call (names cut at 60 characters)."""
    from probe_main import kernel_ms
    out: dict[str, float] = defaultdict(float)
    for name, t in kernel_ms(fn, calls=3).items():
        out[name[:60]] += t
    return {k: round(t, 3) for k, t in sorted(out.items(), key=lambda kv: -kv[1])[:6]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plan", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--jobs", type=int, default=None)
    args = ap.parse_args(argv)

    import torch
    from triton.testing import do_bench

    from nsa_gen.config import Config
    from nsa_gen.db import current_device_key
    from nsa_gen.harness import make_case
    from nsa_gen.kernels import kernel_def
    from nsa_gen.spec import load_spec
    from nsa_gen.tuning.prewarm import Prewarmer
    from nsa_gen.tuning.space import prune_reason
    from nsa_gen.tuning.trial import CHECK_T, TrialRequest

    device = current_device_key()
    results = []
    with Prewarmer(args.jobs) as warm:
        for item in json.loads(args.plan.read_text()):
            spec, stem, T = load_spec(item["spec"]), item["stem"], int(item["T"])
            base = kernel_def(stem).default(spec, T).as_dict()
            grid = item.get("grid", {})
            cfgs, seen = [], set()
            for vals in itertools.product(*grid.values()):
                cfg = Config.from_dict({**base, **dict(zip(grid, vals))})
                if cfg in seen:
                    continue
                seen.add(cfg)
                why = prune_reason(stem, spec, cfg, device)
                if why:
                    print(f"skip {cfg}: {why}")
                else:
                    cfgs.append(cfg)
            t0 = time.time()
            failed = {c: m for c, m in warm([TrialRequest(stem, spec, T, 1, c) for c in cfgs]).items() if m}
            print(f"== {spec.name} {stem} T={T}: {len(cfgs)} configs compiled in "
                  f"{time.time() - t0:.0f} s ({len(failed)} failed)", flush=True)
            dtype = getattr(torch, spec.dtype)
            case = make_case(stem, spec, T, dtype=dtype, device="cuda")
            check = case if T <= CHECK_T else make_case(stem, spec, CHECK_T, dtype=dtype, device="cuda")
            rows = []
            for cfg in cfgs:
                row = {"spec": spec.name, "stem": stem, "T": T, "config": cfg.as_dict(),
                       "default": cfg.as_dict() == base}
                if cfg in failed:
                    row["error"] = failed[cfg]
                else:
                    try:
                        row["rel_error"] = check.rel_error(check.run(cfg))
                        row["ms"] = float(do_bench(lambda: case.run(cfg), return_mode="median"))
                        if item.get("profile"):
                            row["kernels"] = _kernel_split(lambda: case.run(cfg))
                    except Exception as e:  # noqa: BLE001 - report and go on
                        row["error"] = f"{type(e).__name__}: {e}"[:300]
                rows.append(row)
            del case, check
            torch.cuda.empty_cache()
            ok = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
            dflt = next((r["ms"] for r in rows if r["default"] and "ms" in r), None)
            for r in ok[:8]:
                extra = f"  {r['kernels']}" if "kernels" in r else ""
                print(f"  {r['ms']:8.3f} ms  err {r['rel_error']:.1e}  {Config.from_dict(r['config'])}"
                      f"{'  (default)' if r['default'] else ''}{extra}")
            if dflt is not None:
                print(f"  default {dflt:.3f} ms; best {ok[0]['ms']:.3f} ms ({dflt / ok[0]['ms']:.2f}x)")
            for r in rows:
                if "error" in r:
                    print(f"  FAIL {Config.from_dict(r['config'])}: {r['error'][:160]}")
            results.extend(rows)
            sys.stdout.flush()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
