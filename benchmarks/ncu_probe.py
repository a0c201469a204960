"""Runs one kernel for Nsight Compute (`ncu`) to read its hardware counters, on the GPU.

`SPEC:STEM` launches the kernel's case (the dispatcher's config at --seqlen, fresh bf16
inputs) --launches times; gpu_session5.sh's NCU step runs this under
`ncu --kernel-name regex:nsa_<stem> --launch-skip 1 --launch-count 1` (the first launch
compiles and warms up) and keeps its report: throughput against the L2, DRAM and SM peaks,
occupancy and what limits it, warp stall reasons. Timing is ncu's, not do_bench's.

Usage: python benchmarks/ncu_probe.py [--seqlen 65536] [--launches 2] SPEC:STEM
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from probe_main import dispatched_case  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--seqlen", type=int, default=65536)
    ap.add_argument("--launches", type=int, default=2)
    args = ap.parse_args()
    name, stem = args.run.split(":")
    _, cfg, case = dispatched_case(name, stem, args.seqlen)
    print(f"{name} {stem} T={args.seqlen}: {cfg}", flush=True)
    for _ in range(args.launches):
        case.run(cfg)
    torch.cuda.synchronize()
