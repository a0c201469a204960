"""Where nsa()'s forward spends its time, kernel by kernel, as it runs inside the op (the
benchmark's branch columns time each kernel alone, with the ungated selected kernel, so
their sum need not be the total).

    python benchmarks/fwd_profile.py SPEC[:STEM:P=V,...]... [--seqlen 65536] [--out DIR]

SPEC:STEM:P=V,... profiles nsa() with STEM's dispatched config so changed (as
benchmarks/nsa_variant_probe.py runs it), e.g. deepseek-nsa:selection_fwd:FORCED=64,SHARE=1.

Per spec: the op's median (do_bench), then the GPU kernels of 5 profiled calls, by name,
in ms per call, and the gap between the op's time and the sum of its kernels (launch gaps,
host work that the GPU waits on, kernels on a side stream overlapping: negative). The idle
stretches of the profiled calls' timeline tell the waits apart: the GPU idle a call, and the
longest stretches with the kernels either side. Without the profiler: the host time of one
call (enqueued behind a GPU sleep: is the host ahead of the GPU?) with the functions that
take most of it (cProfile), and the op replayed from a CUDA graph (no host time at all;
do_bench median), so that the stretches the profiler's own host overhead opens can be told
from those the plain op pays. bf16 inputs as the benchmark makes them."""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from probe_main import (error_line, graph_replay, host_ms, host_top,  # noqa: E402
                        idle_gaps, kernel_events, per_kernel_ms, random_nsa_args)


def profile(run: str, T: int, calls: int = 5) -> tuple[dict, Callable[[], object]]:
    """The row of `run` (op, kernels, idle stretches, host time) and its nsa() call."""
    from triton.testing import do_bench

    from nsa_gen import api
    from nsa_gen.config import parse_assignments
    from nsa_gen.spec import load_spec
    from nsa_variant_probe import _Override
    name, stem, overrides = (run.split(":", 2) + ["", ""])[:3]
    spec = load_spec(name)
    args = random_nsa_args(spec, T)
    dispatcher = _Override(stem, parse_assignments(filter(None, overrides.split(",")))) if stem else None

    def fwd():
        return api.nsa(*args, spec=spec, dispatcher=dispatcher)
    fwd()
    ms = do_bench(fwd, warmup=10, rep=50, return_mode="median")
    events = kernel_events(fwd, calls)
    per: dict[str, float] = defaultdict(float)
    for kname, t in per_kernel_ms(events, calls).items():
        per[kname[:80]] += t
    kernels = dict(sorted(per.items(), key=lambda kv: -kv[1]))
    gaps = idle_gaps(events)
    row = {"spec": run, "T": T, "op_ms": ms, "kernels_ms": sum(kernels.values()),
           "gap_ms": ms - sum(kernels.values()),
           "idle_ms": sum(g["us"] for g in gaps) / 1e3 / calls,
           "idle_gaps": sorted(gaps, key=lambda g: -g["us"])[:8], "kernels": kernels,
           "host_ms": host_ms(fwd), "host_top": host_top(fwd)}
    return row, fwd


def time_graph(row: dict, fwd: Callable[[], object]) -> None:
    """row["graph_ms"]: fwd replayed from a CUDA graph, and the eager op again after it
    (do_bench medians); or row["graph_error"] where fwd cannot be captured."""
    from triton.testing import do_bench
    try:
        row["graph_ms"] = do_bench(graph_replay(fwd), warmup=10, rep=50, return_mode="median")
        row["op_ms_after_graph"] = do_bench(fwd, warmup=10, rep=50, return_mode="median")
    except Exception as e:  # noqa: BLE001 - a probe reports what failed and goes on
        row["graph_error"] = error_line(e)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--seqlen", type=int, default=65536)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows, calls = [], []

    def save():
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "fwd_profile.json").write_text(json.dumps(rows, indent=1))
    for name in args.specs:
        r, fwd = profile(name, args.seqlen)
        rows.append(r)
        calls.append(fwd)
        save()
        print(f"## {name} T={r['T']}: op {r['op_ms']:.2f} ms, kernels {r['kernels_ms']:.2f}, "
              f"gap {r['gap_ms']:.2f}, GPU idle {r['idle_ms']:.3f} a call (profiled); host "
              f"{r['host_ms']:.2f} a call", flush=True)
        for g in r["idle_gaps"][:3]:
            print(f"  idle {g['us']:8.1f} us  after {g['after'][:50]}  before {g['before'][:50]}")
        for kname, t in r["kernels"].items():
            if t >= 0.005:
                print(f"  {t:7.3f}  {kname}")
        for f in r["host_top"][:8]:
            print(f"  host {f['own_ms']:7.3f} ms own, {f['total_ms']:7.3f} total, "
                  f"{f['calls']:5d} calls  {f['function'][:70]}")
    # Graphs last: a failed capture can leave the device unusable for what follows.
    for r, fwd in zip(rows, calls):
        time_graph(r, fwd)
        save()
        print(f"## {r['spec']}: graph {r.get('graph_ms', r.get('graph_error'))}, eager again "
              f"{r.get('op_ms_after_graph')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
