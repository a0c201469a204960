"""Ablation of the top-n kernel on the GPU: what its merge and its exp2 cost.

Top-n scores a chunk of blocks (QK on the tensor cores, exp2, the group and overlap sums,
the keys) and then merges the chunk into each token's running list (the insertion path, or
a sort, bitonic or rank merge). This times rewrites of the rendered module, through the
launcher, on the same inputs (do_bench medians):
  full      the kernel as generated;
  nomerge   the insertion and the merge replaced by an elementwise max of the list and the
            chunk's keys (the scores are still computed and consumed: nothing is dead code);
  noexp     nomerge, and the probabilities without exp2.
The ablated kernels compute wrong indices: this is a timing probe, never a kernel to use.
(Until session 24 it launched the kernel itself with the default config and cut the
bitonic merge only; RESULTS run 9.)

Each run `SPEC[:P=V,...]` uses the top-n config the dispatcher picks at --seqlen, params
replaced as given.

Usage: python benchmarks/topn_probe.py [--seqlen 65536] [--out DIR] SPEC[:P=V,...] ...
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen.benchmark import _bench  # noqa: E402
from nsa_gen.config import parse_assignments  # noqa: E402
from probe_main import dispatched_case, error_line, probe_main, rewritten_source  # noqa: E402

MERGE_START = ("        # Past the first chunks", "        # Merge: the best")
MERGE_END = "    # Keep the first S"
EXP = re.compile(r"b_p = tl\.exp2\((b_s \* SCALE_LOG2 - b_lse\[[^\]]*\])\)")


def ablate(src: str, what: str) -> str:
    if what == "full":
        return src
    start = min(src.index(s) for s in MERGE_START if s in src)
    out = src[:start] + "        b_top = tl.maximum(b_top, b_key)\n\n" + src[src.index(MERGE_END):]
    if what == "noexp":
        out, n = EXP.subn(r"b_p = \1", out)
        assert n == 1, "the exp2 line was not found"
    return out


def probe(run: str, T: int) -> dict:
    name, overrides = (run.split(":", 1) + [""])[:2]
    _, cfg, case = dispatched_case(name, "topn", T)
    cfg = cfg.replace(**parse_assignments(filter(None, overrides.split(","))))
    row = {"spec": name, "T": T, "config": str(cfg)}
    for what in ("full", "nomerge", "noexp"):
        try:
            with rewritten_source("topn", lambda src: ablate(src, what)):
                case.run(cfg)
                row[f"{what}_ms"] = _bench(lambda: case.run(cfg))
        except Exception as e:  # noqa: BLE001 - a probe reports what failed and goes on
            row[f"{what}_error"] = error_line(e)
    return row


if __name__ == "__main__":
    sys.exit(probe_main("topn_probe", "SPEC[:P=V,...]", probe))
