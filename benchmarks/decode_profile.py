"""Where the host time of one eager nsa_decode step goes (cProfile, GPU): the decode kernels
take tens of microseconds, so an eager step is bound by its launches' Python.

Usage: python benchmarks/decode_profile.py [SPEC] [B] [T]
"""
from __future__ import annotations

import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen.api import nsa_decode  # noqa: E402
from nsa_gen.ops.decode import NSACache  # noqa: E402
from nsa_gen.spec import load_spec  # noqa: E402


def main() -> None:
    name, B, T = (sys.argv[1:] + ["deepseek-nsa", "8", "65536"][len(sys.argv) - 1:])[:3]
    spec, B, T = load_spec(name), int(B), int(T)
    dev, dt = "cuda", torch.bfloat16
    cache = NSACache(spec, B, T, device=dev, dtype=dt)
    cache.append(torch.randn(B, T, spec.H, spec.DK, device=dev, dtype=dt),
                 torch.randn(B, T, spec.H, spec.DV, device=dev, dtype=dt))
    q = torch.randn(B, 1, spec.HQ, spec.DK, device=dev, dtype=dt)
    gates = [torch.rand(B, 1, spec.HQ, device=dev, dtype=dt) if spec.has(b) else None
             for b in ("cmp", "slc", "swa")]
    for _ in range(5):
        nsa_decode(q, cache, *gates)
    torch.cuda.synchronize()
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        nsa_decode(q, cache, *gates)
    host = (time.perf_counter() - t0) / n
    torch.cuda.synchronize()
    print(f"{name} B={B} T={T}: host time of one eager step {host * 1e3:.3f} ms")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        nsa_decode(q, cache, *gates)
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
