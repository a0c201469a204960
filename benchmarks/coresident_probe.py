"""Probe: do two kernels bound by different units overlap when one of them is persistent?

Run 22 (session 9) put independent kernels on two streams and saved at most 2%: each grid
fills every SM, so the second kernel's blocks only start in the first one's tail. Here kernel
A is made persistent (its generated module, rewritten so that program i handles tiles i,
i + P*SMs, ...: the first `tl.program_id(0)` of the kernel becomes a loop counter) and
launched with P programs an SM, so the rest of each SM is left to kernel B's ordinary grid
on a second stream. If A (top-n: ALU-bound) and B (selected attention: L2-bound) overlap,
a chunked schedule of nsa() (top-n of chunk c + 1 beside the selection of chunk c) is worth
building.

Each run `SPEC:A+B:P,P,...` times, on fresh inputs and the dispatcher's configs at
--seqlen: A alone, B alone, both one after the other, A made persistent with P programs an
SM (alone, and beside B), and A's outputs from the persistent launch against the
ordinary one (poisoned first, so an unwritten element differs). A must be a stem with one
kernel launch (topn, compression_fwd, window_fwd).

Usage: python benchmarks/coresident_probe.py [--seqlen 65536] [--out DIR] fla-compat:topn+selection_fwd:1,2,3
"""
from __future__ import annotations

import importlib.util
import inspect
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen.benchmark import _bench  # noqa: E402
from probe_main import dispatched_case, error_line, probe_main  # noqa: E402
from resources import capture  # noqa: E402

OUTPUT_ARGS = ("block_idx", "o", "lse")  # A's output arguments, poisoned before a check
_TMP = Path(tempfile.mkdtemp(prefix="nsa_coresident_"))


def persistent_source(src: str, name: str) -> str:
    """Kernel `name` of a generated module, rewritten to loop over axis-0 tiles: the new last
    argument N_PIDS is the ordinary grid's axis 0; program p takes p, p + num_programs, ..."""
    lines = src.split("\n")
    i_def = next(i for i, s in enumerate(lines) if s.startswith(f"def {name}("))
    i_end = next((i for i in range(i_def + 1, len(lines))
                  if lines[i] and not lines[i][0].isspace()), len(lines))
    head = lines[i_def]
    lines[i_def] = head[:head.rindex("):")] + ", N_PIDS):"
    i_pid = next(i for i in range(i_def, i_end) if "tl.program_id(0)" in lines[i])
    body = [s.replace("tl.program_id(0)", "i_pid").replace("tl.num_programs(0)", "N_PIDS")
            for s in lines[i_pid:i_end]]
    loop = ["    for i_pid in range(tl.program_id(0), N_PIDS, tl.num_programs(0)):"]
    body = [("    " + s if s.strip() else s) for s in body]
    return "\n".join(lines[:i_pid] + loop + body + lines[i_end:])


def persistent_kernel(fn):
    """The persistent twin of jit function `fn`, from a rewritten copy of its module."""
    src = Path(inspect.getsourcefile(fn.fn)).read_text()
    path = _TMP / f"{fn.__name__}_{abs(hash(src)) % 10**8}_persistent.py"
    path.write_text(persistent_source(src, fn.__name__))
    mod_spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return getattr(mod, fn.__name__)


def concurrently(first, second, stream):
    """first() on the current stream, then second() on `stream`; the current stream waits
    for both, so do_bench's events time the pair."""
    main = torch.cuda.current_stream()

    def run():
        stream.wait_stream(main)
        first()
        with torch.cuda.stream(stream):
            second()
        main.wait_stream(stream)
    return run


def probe(run: str, T: int) -> dict:
    name, stems, ps = run.split(":")
    stem_a, stem_b = stems.split("+")
    ps = [int(p) for p in ps.split(",")]
    row = {"spec": name, "a": stem_a, "b": stem_b, "T": T}
    _, cfg_a, case_a = dispatched_case(name, stem_a, T, seed=0)
    _, cfg_b, case_b = dispatched_case(name, stem_b, T, seed=1)
    row["config_a"], row["config_b"] = str(cfg_a), str(cfg_b)
    (fn, args, kwargs, grid), = capture(lambda: case_a.run(cfg_a))
    grid = tuple(grid) + (1,) * (3 - len(grid))
    outs = [a for n, a in zip(fn.arg_names, args) if n in OUTPUT_ARGS]

    def launch_a():
        fn.run(*args, grid=grid, warmup=False, **kwargs)

    def launch_b():
        case_b.run(cfg_b)

    launch_a()
    torch.cuda.synchronize()
    want = [o.clone() for o in outs]
    row["a_ms"], row["b_ms"] = _bench(launch_a), _bench(launch_b)
    row["serial_ms"] = _bench(lambda: (launch_a(), launch_b()))
    side = torch.cuda.Stream()
    row["two_streams_ms"] = _bench(concurrently(launch_a, launch_b, side))

    pfn = persistent_kernel(fn)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for p in ps:
        n0 = min(grid[0], math.ceil(p * sms / (grid[1] * grid[2])))

        def launch_p(n0=n0):
            pfn.run(*args, grid=(n0, grid[1], grid[2]), warmup=False, N_PIDS=grid[0], **kwargs)

        for o in outs:
            o.fill_(-7 if not o.is_floating_point() else float("nan"))
        try:
            launch_p()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - a probe reports what failed and goes on
            row[f"p{p}_error"] = error_line(e)
            continue
        row[f"p{p}_same"] = all(torch.equal(a, b) for a, b in zip(want, outs))
        row[f"p{p}_programs"] = n0 * grid[1] * grid[2]
        row[f"p{p}_alone_ms"] = _bench(launch_p)
        row[f"p{p}_beside_ms"] = _bench(concurrently(launch_p, launch_b, side))
    best = min((row[k] for k in row if k.endswith("_beside_ms")), default=None)
    if best is not None:
        row["saved_ms"] = row["serial_ms"] - best
    return row


if __name__ == "__main__":
    sys.exit(probe_main("coresident_probe", "SPEC:A+B:P,P,...", probe))
