"""Probe: the query-batched forward's row chunk (`ops.selection.QUERY_PART_BYTES`) inside
nsa()'s forward, on the GPU, in one process.

A segment of the partials kernel gathers the queries of BLOCK_Q tokens that chose its block;
within a row chunk those tokens are spread over all the chunk's rows, so the kernels running
at once read queries from all of them: 134 MB of q per 2 GiB chunk at small-group, more than
the L2 holds. Smaller chunks keep a chunk's queries in L2, for more per-chunk work (the
lists' torch kernels, two launches, segments less full). Measured (H100, RESULTS run 48):
the partials kernel's time hardly moves from 2048 to 256 MiB, so those gathers do not bound it.

Per SPEC (query-batched at --seqlen by the dispatcher) and each budget in MiB (after the
spec's colon, comma-separated; 2048,1024,512,256,128 if none; the first is the reference):
nsa()'s median (do_bench) and the GPU time of its kernels by name (profiled), the rows a
chunk holds, and whether the output is bit-identical to the first budget's (a token's
partials and their combination do not depend on the chunk).

Usage: python benchmarks/chunk_probe.py [--seqlen 65536] [--out DIR] small-group mqa:2048,256
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen.benchmark import _bench  # noqa: E402
from nsa_gen.ops import selection as sel  # noqa: E402
from probe_main import kernel_ms, probe_main, random_nsa_args  # noqa: E402

BUDGETS_MIB = "2048,1024,512,256,128"


def probe(run: str, T: int) -> dict:
    from nsa_gen import api
    from nsa_gen.spec import load_spec
    name, _, budgets = run.partition(":")
    spec = load_spec(name)
    args = random_nsa_args(spec, T)

    def fwd():
        return api.nsa(*args, spec=spec)
    row = {"spec": name, "T": T}
    shipped, want = sel.QUERY_PART_BYTES, None
    try:
        for mib in map(int, (budgets or BUDGETS_MIB).split(",")):
            sel.QUERY_PART_BYTES = mib << 20
            out = fwd()
            want = out if want is None else want
            kernels = kernel_ms(fwd, 3)
            row[f"{mib}"] = {
                "rows": sel.query_chunk_rows(spec, 2), "ms": _bench(fwd),
                "partials_ms": sum(t for k, t in kernels.items() if k.startswith("nsa_selection_fwd_kernel")),
                "combine_ms": sum(t for k, t in kernels.items() if "combine" in k),
                "torch_ms": sum(t for k, t in kernels.items() if not k.startswith(("nsa_", "Memcpy"))),
                "kernels_ms": sum(kernels.values()), "same": bool(torch.equal(out, want))}
    finally:
        sel.QUERY_PART_BYTES = shipped
    row["shipped_again_ms"] = _bench(fwd)
    return row


if __name__ == "__main__":
    sys.exit(probe_main("chunk_probe", "SPEC[:MIB,MIB,...]", probe))
