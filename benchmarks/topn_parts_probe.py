"""Probe: how top-n's time splits between scoring and merging, on the GPU.

Top-n scores a chunk of blocks (QK on the tensor cores, exp2, the group and overlap sums,
the keys) and then merges the chunk into each token's running list (the insertion path or a
sort). Nsight counts instructions but not which part holds the critical path, so this times
rewrites of the rendered module on the same inputs:
- "nomerge": the insertion and the merge replaced by an elementwise max of the list and the
  chunk's keys (the scores are still computed and consumed, so nothing is dead code);
- "qk_only": nomerge, and the probabilities replaced by the raw scores (no exp2).
Their outputs are wrong by design; only their times are reported, beside the full kernel's.

Each run `SPEC[:P=V,...]` uses the top-n config the dispatcher picks at --seqlen (params
replaced as given).

Usage: python benchmarks/topn_parts_probe.py [--seqlen 65536] [--out DIR] fla-compat ...
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen.benchmark import _bench  # noqa: E402
from nsa_gen.config import parse_assignments  # noqa: E402
from probe_main import dispatched_case, probe_main, rewritten_source  # noqa: E402

MERGE_START = ("        # Past the first chunks", "        # Merge: the best BJ")
MERGE_END = "    # Keep the first S"
EXP = re.compile(r"b_p = tl\.exp2\((b_s \* SCALE_LOG2 - b_lse\[[^\]]*\])\)")


def nomerge(src: str) -> str:
    start = min(src.index(s) for s in MERGE_START if s in src)
    end = src.index(MERGE_END)
    return src[:start] + "        b_top = tl.maximum(b_top, b_key)\n\n" + src[end:]


def qk_only(src: str) -> str:
    out, n = EXP.subn(r"b_p = \1", nomerge(src))
    assert n == 1, "the exp2 line was not found"
    return out


def probe(run: str, T: int) -> dict:
    name, overrides = (run.split(":", 1) + [""])[:2]
    _, cfg, case = dispatched_case(name, "topn", T)
    cfg = cfg.replace(**parse_assignments(filter(None, overrides.split(","))))
    row = {"spec": name, "T": T, "config": str(cfg), "full_ms": _bench(lambda: case.run(cfg))}
    for label, rewrite in (("nomerge", nomerge), ("qk_only", qk_only)):
        try:
            with rewritten_source("topn", rewrite):
                case.run(cfg)
                row[f"{label}_ms"] = _bench(lambda: case.run(cfg))
        except Exception as e:  # noqa: BLE001 - a probe reports what failed and goes on
            row[f"{label}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    return row


if __name__ == "__main__":
    sys.exit(probe_main("topn_parts_probe", "SPEC[:P=V,...]", probe))
