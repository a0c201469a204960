"""Probe: the query-batched forward's row chunk (`ops.selection.QUERY_PART_BYTES`) and row
windows (`QUERY_WINDOW_ROWS`) inside nsa()'s forward, on the GPU, in one process.

A segment of the partials kernel gathers the queries of BLOCK_Q tokens that chose its block.
Within a row chunk those tokens are spread over all its rows: the programs running at once
(one kv head's bins) read the queries of that head's G heads over the whole chunk (16.5 MB
at small-group's 2 GiB chunk of 16128 rows; the L2 holds 50 MB beside the K/V and the
partials streaming through). Smaller chunks or windows keep fewer rows' queries in play,
for more per-chunk work (the lists' torch kernels, two launches) or K/V read once per window
instead of once per chunk, and segments less full.

A third knob, `QUERY_PERSIST`: the partials kernel persistent, that many programs an SM,
each requesting its next segment's queries before the current one's dots.

Per SPEC (query-batched at --seqlen by the dispatcher) and each mode MIB:WINDOW[:PERSIST] (a
budget in MiB, window rows, 0 for none, programs an SM, 0 for one a segment;
$CHUNK_PROBE_MODES, the shipped mode first): nsa()'s median (do_bench), the GPU time of its
kernels by kind (profiled), the rows a chunk holds, and whether the output is bit-identical
to the first mode's.

Usage: python benchmarks/chunk_probe.py [--seqlen 65536] [--out DIR] small-group mqa
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen.benchmark import _bench  # noqa: E402
from nsa_gen.ops import selection as sel  # noqa: E402
from probe_main import kernel_ms, probe_main, random_nsa_args  # noqa: E402

MODES = [tuple(int(x) for x in (m + ":0").split(":")[:3]) for m in os.environ.get(
    "CHUNK_PROBE_MODES", "2048:0,2048:0:2,2048:0:1,2048:0:4,2048:4096,2048:8192,512:0,256:0"
).split(",")]


def probe(name: str, T: int) -> dict:
    from nsa_gen import api
    from nsa_gen.spec import load_spec
    spec = load_spec(name)
    args = random_nsa_args(spec, T)

    def fwd():
        return api.nsa(*args, spec=spec)
    row = {"spec": name, "T": T}
    shipped, want = (sel.QUERY_PART_BYTES, sel.QUERY_WINDOW_ROWS, sel.QUERY_PERSIST), None
    try:
        for mib, window, persist in MODES:
            sel.QUERY_PART_BYTES, sel.QUERY_WINDOW_ROWS, sel.QUERY_PERSIST = mib << 20, window, persist
            out = fwd()
            want = out if want is None else want
            kernels = kernel_ms(fwd, 3)
            row[f"{mib}:{window}:{persist}"] = {
                "rows": sel.query_chunk_rows(spec, 2), "ms": _bench(fwd),
                "partials_ms": sum(t for k, t in kernels.items() if k.startswith("nsa_selection_fwd_kernel")),
                "combine_ms": sum(t for k, t in kernels.items() if "combine" in k),
                "torch_ms": sum(t for k, t in kernels.items() if not k.startswith(("nsa_", "Memcpy"))),
                "kernels_ms": sum(kernels.values()), "same": bool(torch.equal(out, want))}
    finally:
        sel.QUERY_PART_BYTES, sel.QUERY_WINDOW_ROWS, sel.QUERY_PERSIST = shipped
    row["shipped_again_ms"] = _bench(fwd)
    return row


if __name__ == "__main__":
    sys.exit(probe_main("chunk_probe", "SPEC", probe))
