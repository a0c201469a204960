"""What the GPU timing probes share (slc_breakdown.py, topn_probe.py, ws_probe.py,
variant_probe.py, overlap_probe.py, ncu_probe.py, lists_ab.py, ahead_ab.py,
nsa_variant_probe.py, evict_probe.py, fwd_profile.py, sweep.py, chunk_probe.py):
the command line (a list of runs, each timed by the probe at --seqlen and printed as one
JSON line; with --out, all of them written to OUT/<name>.json), a kernel's case with the
config the dispatcher picks, timing a variant of a kernel launch against the outputs of the
original one, and the GPU time of each kernel a call launches."""
from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Mapping, Sequence


def probe_main(name: str, runs_help: str, probe: Callable[..., dict],
               flags: Mapping[str, str] = {}, argv: Sequence[str] | None = None) -> int:
    """Parse the command line (argv, default sys.argv[1:]) and run `probe(run, seqlen)` for
    each run. `flags` maps a probe's own on/off options to their help (`{"backward": ...}`
    adds `--backward`); each is passed to the probe as a keyword (`backward=True`)."""
    ap = argparse.ArgumentParser(prog=name)
    ap.add_argument("runs", nargs="+", help=runs_help)
    ap.add_argument("--seqlen", type=int, default=65536)
    ap.add_argument("--out", default=None)
    for flag, help_ in flags.items():
        ap.add_argument(f"--{flag}", action="store_true", help=help_)
    args = ap.parse_args(argv)
    options = {flag: getattr(args, flag) for flag in flags}
    rows = []
    for run in args.runs:
        rows.append(probe(run, args.seqlen, **options))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"{name}.json").write_text(json.dumps(rows, indent=1))
    return 0


def kernel_events(fn: Callable[[], object], calls: int = 1) -> list[tuple[str, float, float]]:
    """(name, start, end) of each GPU kernel, copy and memset `calls` calls of fn launch, in
    microseconds on the GPU's clock, by start: fn once to warm up, then the calls under the
    torch profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sorted(((ev.name, ev.time_range.start, ev.time_range.end) for ev in prof.events()
                   if ev.device_type == torch.autograd.DeviceType.CUDA), key=lambda e: e[1])


def kernel_ms(fn: Callable[[], object], calls: int = 1) -> dict[str, float]:
    """GPU time of each kernel one call of fn launches, by kernel name, in ms, slowest first:
    fn once to warm up, then `calls` times under the torch profiler, averaged."""
    return per_kernel_ms(kernel_events(fn, calls), calls)


def per_kernel_ms(events: Sequence[tuple[str, float, float]], calls: int = 1) -> dict[str, float]:
    """kernel_events' list as ms a call by kernel name, slowest first."""
    from collections import defaultdict
    per: dict[str, float] = defaultdict(float)
    for name, start, end in events:
        per[name] += (end - start) / 1e3 / calls
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def idle_gaps(events: Sequence[tuple[str, float, float]], min_us: float = 10.0) -> list[dict]:
    """The stretches, at least min_us long, in which no kernel of kernel_events' list runs
    (kernels on other streams overlap and count as busy), each with its length in us and the
    kernels that end before it and start after it: where the GPU waits on the host."""
    gaps, busy_to, last = [], None, None
    for name, start, end in sorted(events, key=lambda e: e[1]):
        if busy_to is not None and start - busy_to >= min_us:
            gaps.append({"us": start - busy_to, "after": last, "before": name})
        if busy_to is None or end >= busy_to:
            busy_to, last = end, name
    return gaps


def _gpu_busy_and_sync(busy, sync) -> tuple[Callable[[], object], Callable[[], object]]:
    """busy and sync, a 0.2 s GPU sleep and a device synchronize where not given."""
    if busy is None or sync is None:
        import torch
        busy = busy or (lambda: torch.cuda._sleep(400_000_000))  # ~0.2 s at ~2 GHz
        sync = sync or torch.cuda.synchronize
    return busy, sync


def host_ms(fn: Callable[[], object], calls: int = 5, busy: Callable[[], object] | None = None,
            sync: Callable[[], object] | None = None,
            clock: Callable[[], float] | None = None) -> float:
    """Host time of one call of fn, in ms: the median of `calls` calls enqueued back to back
    behind `busy` (default: a 0.2 s GPU sleep), so that the host never waits for the GPU and
    runs warm, as in a timing loop: against the op's GPU time, whether the host keeps ahead.
    A call that reads the GPU (a sync) shows as the rest of the sleep. `clock` (seconds;
    default time.perf_counter) is a parameter so that tests need not time real sleeps."""
    import statistics
    import time
    clock = clock or time.perf_counter
    busy, sync = _gpu_busy_and_sync(busy, sync)
    fn()
    sync()
    times = []
    busy()
    for _ in range(calls):
        t0 = clock()
        fn()
        times.append((clock() - t0) * 1e3)
    sync()
    return statistics.median(times)


def host_top(fn: Callable[[], object], n: int = 12, busy: Callable[[], object] | None = None,
             sync: Callable[[], object] | None = None) -> list[dict]:
    """Where one call of fn spends its host time: cProfile of a call enqueued behind `busy`
    (as host_ms), the n functions with the most time of their own, each as
    {"function": "file:line(name)", "own_ms", "total_ms", "calls"}."""
    import cProfile
    import pstats
    busy, sync = _gpu_busy_and_sync(busy, sync)
    fn()
    sync()
    prof = cProfile.Profile()
    busy()
    prof.enable()
    fn()
    prof.disable()
    sync()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (calls, primitive, own, total, callers)}
    rows = [{"function": f"{Path(f).name}:{line}({name})", "own_ms": own * 1e3,
             "total_ms": total * 1e3, "calls": calls}
            for (f, line, name), (calls, _, own, total, _) in stats.items()]
    return sorted(rows, key=lambda r: -r["own_ms"])[:n]


def graph_replay(fn: Callable[[], object], warmup: int = 2) -> Callable[[], object]:
    """fn captured in a CUDA graph (after `warmup` calls on a side stream, as capture needs),
    as a function that replays it: the op without its host time. Raises where fn cannot be
    captured (it reads the GPU, say)."""
    import torch
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def torch_kernel_ms(fn: Callable[[], object]) -> float:
    """GPU time of the torch (non-Triton, non-copy) kernels one call of fn launches, in ms."""
    return sum(t for name, t in kernel_ms(fn).items() if not name.startswith(("nsa_", "Memcpy")))


def peak_extra_mib(fn: Callable[[], object]) -> float:
    """Peak GPU memory one call of fn allocates beyond what was allocated before it, in MiB."""
    import torch
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    mem0 = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - mem0) / 2 ** 20


def dispatched_case(name: str, stem: str, T: int, seed: int = 0):
    """(spec, config, case) for kernel `stem` of built-in spec `name` at T tokens, B = 1: the
    config the dispatcher picks there, and a `harness.Case` of fresh bf16 inputs on the GPU."""
    import torch

    from nsa_gen.db.dispatch import default_dispatcher
    from nsa_gen.harness import make_case
    from nsa_gen.spec import load_spec
    spec = load_spec(name)
    cfg = default_dispatcher().get(stem, spec, T, 1)
    return spec, cfg, make_case(stem, spec, T, dtype=torch.bfloat16, device="cuda", seed=seed)


@contextmanager
def rewritten_source(stem: str, rewrite: Callable[[str], str]):
    """Within the block, kernel `stem`'s generated module is `rewrite` of its rendered source
    (a probe's variant of the code, cached by its own content hash); the module cache is
    emptied on the way in and out, so launches pick up the change and then drop it."""
    from nsa_gen import kernels
    plain = kernels.kernel_source

    def source(s, *args, **kwargs):
        src = plain(s, *args, **kwargs)
        return rewrite(src) if s == stem else src
    kernels.kernel_source = source
    kernels._MODULE_CACHE.clear()
    try:
        yield
    finally:
        kernels.kernel_source = plain
        kernels._MODULE_CACHE.clear()


def random_qkv(spec, T: int) -> tuple:
    """Fresh bf16 inputs on the GPU, seeded by T: q [1, T, HQ, DK], k [1, T, H, DK],
    v [1, T, H, DV]."""
    import torch
    torch.manual_seed(T)
    kw = dict(device="cuda", dtype=torch.bfloat16)
    return (torch.randn(1, T, spec.HQ, spec.DK, **kw), torch.randn(1, T, spec.H, spec.DK, **kw),
            torch.randn(1, T, spec.H, spec.DV, **kw))


def random_nsa_args(spec, T: int) -> list:
    """nsa()'s positional arguments on fresh GPU inputs: random_qkv's q, k, v, then a gate
    [1, T, HQ] (sigmoid of a normal, q's dtype) for each branch the spec has, None for the
    others (in BRANCHES order)."""
    import torch

    from nsa_gen.spec import BRANCHES
    q, k, v = random_qkv(spec, T)
    return [q, k, v] + [torch.sigmoid(torch.randn(1, T, spec.HQ, device="cuda", dtype=q.dtype))
                        if spec.has(b) else None for b in BRANCHES]


def max_diff(a, b) -> float:
    """The largest absolute difference of two tensors, in fp32."""
    return float((a.float() - b.float()).abs().max())


def error_line(e: BaseException) -> str:
    """An exception as a probe reports it: its type and the first line of its message, at
    most 300 characters."""
    msg = str(e)
    return f"{type(e).__name__}: {msg.splitlines()[0][:300] if msg else ''}"


def time_variant(row: dict, prefix: str, run: Callable[[], Sequence], want: Sequence) -> None:
    """Run and time `run` (a launch returning its outputs) into row[prefix + "_ms"], and
    compare its outputs with `want`: row["same"] (bit-identical) and row["max_abs_diff"].
    A failure (a compile error, say) goes into row[prefix + "_error"] instead."""
    import torch

    from nsa_gen.benchmark import _bench
    try:
        got = [o.clone() for o in run()]
        row[prefix + "_ms"] = _bench(run)
    except Exception as e:  # noqa: BLE001 - a probe reports what failed and goes on
        row[prefix + "_error"] = error_line(e)
        return
    row["same"] = all(torch.equal(a, b) for a, b in zip(want, got))
    row["max_abs_diff"] = max(float((a.double() - b.double()).abs().max()) for a, b in zip(want, got))
    if not want[0].is_floating_point():  # indices: the share of [token, head] rows that agree
        row["rows_equal"] = float((want[0] == got[0]).all(-1).float().mean())
