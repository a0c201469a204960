"""Ablation of the top-n kernel on the GPU: what each part of its loop costs.

Renders `topn` for a spec and its default (or given) config, removes parts of the chunk loop
from the rendered source, and times each version on the same inputs (do_bench median):
  full      the kernel as generated;
  nomerge   the merge replaced by an elementwise max (no sort, no half-cleaners);
  nosort    the chunk's sort dropped, the half-cleaners kept;
  noexp     nomerge, and the probabilities without exp2.
The ablated kernels compute wrong indices: this is a timing probe, never a kernel to use.
A run that names a merge other than the default's bitonic one is timed in full only.

Usage: python benchmarks/topn_probe.py [--seqlen 65536] [--out DIR] SPEC[:BLOCK_T[:MERGE]] ...
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen import codegen  # noqa: E402
from nsa_gen.benchmark import _bench  # noqa: E402
from nsa_gen.harness import make_case  # noqa: E402
from nsa_gen.kernels import kernel_def, kernel_fn, kernel_source  # noqa: E402
from nsa_gen.ops.common import launch_options, tile_table  # noqa: E402
from nsa_gen.spec import load_spec  # noqa: E402
from probe_main import probe_main  # noqa: E402

SORT = "b_top = tl.maximum(b_top, tl.sort(b_key, 1))"


def ablate(src: str, what: str) -> str:
    if what == "full":
        return src
    if what == "nosort":
        return src.replace(SORT, "b_top = tl.maximum(b_top, b_key)")
    # Drop the half-cleaner lines (b_m / b_a, b_b / reshape back) and the sort.
    lines = [ln for ln in src.splitlines()
             if not re.match(r"\s+(b_m = |b_a, b_b = |b_top = tl.reshape\(b_m)", ln)]
    out = "\n".join(lines).replace(SORT, "b_top = tl.maximum(b_top, b_key)")
    if what == "noexp":
        out = out.replace("tl.exp2(b_s * SCALE_LOG2 - b_lse[:, None])", "(b_s * SCALE_LOG2 - b_lse[:, None])")
    return out


def probe(name: str, block_t: int | None, merge: str | None, T: int) -> dict:
    spec = load_spec(name)
    kd = kernel_def("topn")
    cfg = kd.default(spec, T)
    if block_t:
        cfg = cfg.replace(BLOCK_T=block_t)
    if merge:
        cfg = cfg.replace(MERGE=merge)
    case = make_case("topn", spec, T, dtype=torch.bfloat16, device="cuda", seed=0)
    q, k_cmp, lse = (case.inputs[n] for n in ("q", "k_cmp", "lse"))
    idx = torch.empty(1, T, spec.H, spec.S, device="cuda", dtype=torch.int32)
    tiles = tile_table(None, 1, T, cfg["BLOCK_T"], spec.l, spec.d, q.device)
    row = {"spec": name, "T": T, "config": str(cfg)}
    src = kernel_source("topn", spec, cfg)
    ablations = ("full", "nosort", "nomerge", "noexp") if cfg["MERGE"] == "bitonic" else ("full",)
    for what in ablations:
        mod = codegen.load_module(f"topn_probe_{what}", ablate(src, what))
        fn = mod.nsa_topn_kernel
        row[what] = _bench(lambda: fn[(tiles.shape[0], spec.H)](q, k_cmp, lse, idx, tiles,
                                                               **launch_options(cfg)))
    if cfg["MERGE"] != "bitonic":  # idx holds the last full run's output
        ref = torch.full_like(idx, -2)
        ref_fn = kernel_fn("topn", spec, cfg.replace(MERGE="bitonic"))
        ref_fn[(tiles.shape[0], spec.H)](q, k_cmp, lse, ref, tiles, **launch_options(cfg))
        row["equal_to_bitonic"] = bool(torch.equal(idx, ref))
    return row


def _run(run: str, T: int) -> dict:
    name, block_t, merge = (run.split(":") + ["", ""])[:3]
    return probe(name, int(block_t) if block_t else None, merge or None, T)


if __name__ == "__main__":
    sys.exit(probe_main("topn_probe", "SPEC, SPEC:BLOCK_T or SPEC:BLOCK_T:MERGE", _run))
