"""Probe: what running independent kernels on two CUDA streams at once saves, on the GPU.

NSA's forward has kernels bound by different units: compressed and sliding-window attention
by the tensor cores, top-n by its merge's ALU and shuffle work, the selected branch by L2.
Each run `SPEC:STEM+STEM[+...]` times every kernel alone (the dispatcher's config at
--seqlen, its own fresh inputs), all of them one after another on one stream ("serial_ms"),
and all at once: the first on the current stream, each other one on its own side stream
("overlap_ms"), and again with the side streams at the highest priority ("overlap_hi_ms"),
so their blocks are scheduled first as the first kernel's retire. "same" says the
overlapped outputs equal the serial ones bit for bit. Timing only: whether a concurrent
schedule of the op is worth building.

Usage: python benchmarks/overlap_probe.py [--seqlen 65536] [--out DIR] deepseek-nsa:topn+window_fwd ...
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen.benchmark import _bench  # noqa: E402
from probe_main import dispatched_case, probe_main  # noqa: E402


def concurrently(launches, streams):
    """Launch launches[0] on the current stream and launches[i] on streams[i - 1]; the
    current stream waits for all, so do_bench's events time the whole overlap."""
    main = torch.cuda.current_stream()

    def run():
        for s in streams:
            s.wait_stream(main)
        outs = [launches[0]()]
        for s, launch in zip(streams, launches[1:]):
            with torch.cuda.stream(s):
                outs.append(launch())
        for s in streams:
            main.wait_stream(s)
        return outs
    return run


def probe(run: str, T: int) -> dict:
    name, stems = run.split(":")
    stems = stems.split("+")
    row = {"spec": name, "stems": stems, "T": T}
    launches = []
    for i, stem in enumerate(stems):
        _, cfg, case = dispatched_case(name, stem, T, seed=i)
        launches.append(lambda case=case, cfg=cfg: case.run(cfg))
        row[f"{stem}_ms"] = _bench(launches[-1])
    serial = lambda: [launch() for launch in launches]  # noqa: E731
    row["serial_ms"] = _bench(serial)
    want = serial()
    torch.cuda.synchronize()
    hi = torch.cuda.Stream.priority_range()[1]  # (lowest, highest): highest is the smaller
    for key, prio in (("overlap", 0), ("overlap_hi", hi)):
        streams = [torch.cuda.Stream(priority=prio) for _ in stems[1:]]
        fn = concurrently(launches, streams)
        got = fn()
        torch.cuda.synchronize()
        row[f"{key}_ms"] = _bench(fn)
        row[f"{key}_same"] = all(torch.equal(a, b) for w, g in zip(want, got) for a, b in zip(w, g))
    row["saved_ms"] = row["serial_ms"] - min(row["overlap_ms"], row["overlap_hi_ms"])
    return row


if __name__ == "__main__":
    sys.exit(probe_main("overlap_probe", "SPEC:STEM+STEM", probe))
