"""The command line the GPU timing probes share (slc_breakdown.py, topn_probe.py): a list of
runs, each timed by the probe at --seqlen and printed as one JSON line; with --out, all of
them written to OUT/<name>.json."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable


def probe_main(name: str, runs_help: str, probe: Callable[[str, int], dict]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help=runs_help)
    ap.add_argument("--seqlen", type=int, default=65536)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for run in args.runs:
        rows.append(probe(run, args.seqlen))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"{name}.json").write_text(json.dumps(rows, indent=1))
    return 0
