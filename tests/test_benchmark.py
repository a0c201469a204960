"""The benchmark's code paths on the CPU (interpreter, tiny shapes, a fake timer): the GPU
run must not be the first time this code executes."""
import importlib
import inspect
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import shrink
from nsa_gen import benchmark
from nsa_gen.ops import common

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def bench_script(name: str):
    """benchmarks/<name>.py imported as a module (with benchmarks/ on the path while it
    imports, as when it runs as a script: the probes import probe_main beside them)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_bench_spec_paths(monkeypatch, tmp_path):
    calls = []

    def fake_bench(fn, **kw):
        fn()
        calls.append(fn)
        return 1.0

    monkeypatch.setattr(benchmark, "_bench", fake_bench)
    spec = shrink("small-group", heads={"q": 4, "kv": 2}, head_dim={"k": 32, "v": 16},
                  compression={"block": 16, "stride": 8}, selection={"block": 16, "top_n": 2,
                                                                     "initial_blocks": 1, "local_blocks": 1},
                  window=16)
    rows = benchmark.bench_spec(spec, [40], dtype=torch.float32, backward=True, device="cpu",
                                log=lambda s: None)
    r = rows[0]
    for key in ("nsa_gen", "nsa_gen_fb", "compress", "compression_fwd", "topn", "selection_fwd",
                "window_fwd", "gate_fwd", "compression_bwd", "selection_bwd", "window_bwd"):
        assert r[key] == 1.0, key
    # Baselines that cannot run here become n/a cells with the reason, not crashes.
    assert r["fla"] is None and "fla_error" in r
    md = benchmark.markdown(rows)
    assert "Forward + backward:" in md and "| small-group | 40 |" in md
    assert benchmark.plot(rows, tmp_path / "p.png") in (True, False)
    assert "fallbacks" not in r and "fell back" not in md
    # The CPU interpreter has no DB entries: each kernel says so, and the table lists them.
    assert r["config_origin"]["topn"].startswith("heuristic default")
    assert "Kernels that ran without a DB entry:" in md and "T=40: topn: heuristic default" in md
    # A branch the spec does not run is not listed.
    no_swa = shrink("fla-compat", heads={"q": 4, "kv": 2}, head_dim={"k": 32, "v": 16},
                    compression={"block": 16, "stride": 16}, selection={"block": 16, "top_n": 2,
                                                                         "initial_blocks": 1, "local_blocks": 1})
    r2 = benchmark.bench_spec(no_swa, [40], dtype=torch.float32, device="cpu", log=lambda s: None)[0]
    assert "window_fwd" not in r2["config_origin"] and "topn" in r2["config_origin"]


def test_bench_reports_fallbacks(monkeypatch):
    """A launch that falls back from the config the row names (here compression_fwd's CUDNN
    variant, refused) is counted in the row and listed under the table: its time is the
    fallback's, not the named config's."""
    from nsa_gen import api
    from nsa_gen.ops import compression
    monkeypatch.setattr(benchmark, "_bench", lambda fn, **kw: (fn(), 1.0)[1])
    monkeypatch.setattr(common, "_CUDNN_REFUSED", set())

    def refuse(*a, **kw):
        raise RuntimeError("cuDNN: no engine for this graph")
    monkeypatch.setattr(compression, "_attend", refuse)
    configs = api._configs

    def with_cudnn(spec, T, B, dispatcher):
        cfg = configs(spec, T, B, dispatcher)
        return lambda stem: cfg(stem).replace(CUDNN=1) if stem == "compression_fwd" else cfg(stem)
    monkeypatch.setattr(api, "_configs", with_cudnn)
    spec = shrink("fla-compat", heads={"q": 4, "kv": 2}, head_dim={"k": 32, "v": 16},
                  compression={"block": 16, "stride": 16},
                  selection={"block": 16, "top_n": 2, "initial_blocks": 1, "local_blocks": 1})
    rows = benchmark.bench_spec(spec, [48], dtype=torch.float32, device="cpu", baselines=False,
                                log=lambda s: None)
    fell = rows[0]["fallbacks"]
    assert "CUDNN=1" in rows[0]["configs"]["compression_fwd"]
    # every compression_fwd launch of the row: nsa() twice (warm-up, memory), the branch's
    # output, its timed call (on a GPU the later ones skip cuDNN: "refused these inputs before")
    assert sum(fell.values()) == 4 and "compression_fwd: cuDNN attention failed" in fell
    assert "- fla-compat T=48: compression_fwd: cuDNN attention failed (" in benchmark.markdown(rows)


def test_bench_decode_paths(monkeypatch):
    """bench --decode on the CPU with a fake timer: every kernel's cell, SDPA as n/a cells
    where a backend refuses, the byte model, and the decode table."""
    monkeypatch.setattr(benchmark, "_bench", lambda fn, **kw: (fn(), 1.0)[1])
    spec = shrink("small-group", heads={"q": 8, "kv": 2}, head_dim={"k": 32, "v": 16},
                  compression={"block": 16, "stride": 8}, selection={"block": 16, "top_n": 2,
                                                                     "initial_blocks": 1, "local_blocks": 1},
                  window=16)
    rows = benchmark.bench_decode(spec, [50], [2], dtype=torch.float32, device="cpu",
                                  log=lambda s: None)
    r = rows[0]
    for key in ("nsa_gen", "nsa_gen_graph", "decode_select", "decode_topn", "decode_attend"):
        assert r[key] == 1.0, key
    ours, full = benchmark.decode_bytes(spec, 50, 2)
    assert r["MB_read"] == ours / 2**20 and full == 2 * (32 + 16) * 2 * 2 * 50
    md = benchmark.markdown(rows)
    assert "Decode (one new token a sequence):" in md and "| small-group | 2 | 50 |" in md
    assert "Forward:" not in md


def test_flop_model():
    from nsa_gen.spec import load_spec
    s = load_spec("deepseek-nsa")
    total = sum(benchmark.flops(s, 65536, b) for b in ("cmp", "topn", "slc", "swa"))
    assert 1.2e13 < total < 1.4e13  # NSA.md: about 1.3e13 at 64k
    assert benchmark.flops(s, 100, "slc") == benchmark.flops(s, 100, "full")  # all keys selected


def test_train_check_best_lag():
    """benchmarks/train_check.py's curve alignment: a curve that is another one delayed by
    3 steps is found to lag by 3, with no difference left once shifted."""
    tc = bench_script("train_check")
    base = [5.5 - 2.0 / (1.0 + 2.0 ** (-(t - 60) / 4)) for t in range(120)]  # a sharp drop
    late = [base[max(0, t - 3)] for t in range(120)]
    r = tc.best_lag(late, base, 40)
    assert r["lag"] == 3 and abs(r["mean_diff_at_lag"]) < 1e-9
    assert r["mean_diff_lag0"] > 0 and r["a_higher_lag0"] > 30
    assert tc.best_lag(base, base, 40)["lag"] == 0
    assert tc.best_lag(base[:3], base[:3], 40)["lag"] == 0  # too short to shift
    assert tc.best_lag([], [], 40) is None


def test_topn_probe_cuts_what_it_says():
    """benchmarks/topn_probe.py's ablations of the rendered top-n: 'nomerge' drops the
    insertion path and every merge (sort, bitonic, rank; narrow list or not), 'noexp' also
    exp2; each still a valid module."""
    from nsa_gen.kernels import kernel_def, kernel_source
    from nsa_gen.spec import load_spec
    topn_probe = bench_script("topn_probe")
    spec = load_spec("fla-compat")
    base = kernel_def("topn").default(spec, 65536)
    for cfg in (base.replace(MERGE="bitonic", INSERT=4), base.replace(MERGE="hcube", INSERT=0),
                base.replace(MERGE="sort", INSERT=0),
                base.replace(MERGE="rank", IMP="mma", BJ=64), base.replace(MERGE="sort", LIST=1)):
        src = kernel_source("topn", spec, cfg)
        assert topn_probe.ablate(src, "full") == src
        cut = {w: topn_probe.ablate(src, w) for w in ("nomerge", "noexp")}
        for text in cut.values():
            assert "tl.sort(b_key" not in text and "n_new" not in text and "m_up" not in text
            assert "b_top = tl.maximum(b_top, b_key)" in text
            compile(text, "topn", "exec")
        assert "tl.exp2(b_s * SCALE_LOG2 - b_lse" in cut["nomerge"]
        assert "tl.exp2(b_s * SCALE_LOG2 - b_lse" not in cut["noexp"]


def test_ws_probe_rewrites_main_loops_only():
    """benchmarks/ws_probe.py turns each kernel's main loops (i.. variables) into
    warp-specialized tl.range loops and leaves inner `_` loops alone."""
    from nsa_gen.kernels import kernel_def, kernel_source
    from nsa_gen.spec import load_spec
    ws_probe = bench_script("ws_probe")
    spec = load_spec("deepseek-nsa")
    for stem, loops in (("compression_fwd", 2), ("window_fwd", 3), ("topn", 1)):
        cfg = kernel_def(stem).default(spec, 65536)
        if stem == "topn":
            cfg = cfg.replace(INSERT=4)  # has an inner `for _ in range(n_up)` loop
        src = kernel_source(stem, spec, cfg)
        out = ws_probe.warp_specialized(src)
        assert out.count("warp_specialize=True") == loops, stem
        assert ("for _i_new in range(n_new)" in out) == (stem == "topn")


@pytest.mark.parametrize("forced", [0, 64])
def test_lists_ab_baseline_matches_the_launcher(forced):
    """benchmarks/lists_ab.py's baseline (sessions 26-37's lists by torch steps) gives the
    list kernels' entries and segment table bit for bit, over a row chunk that starts past
    row 0: the A/B times two ways to the same lists."""
    from nsa_gen.config import Config
    from nsa_gen.kernels import kernel_module
    from nsa_gen.ops import selection as sel
    from nsa_gen.spec import load_spec
    lists_ab = bench_script("lists_ab")
    spec = load_spec("small-group").replace(heads={"q": 8, "kv": 2}, head_dim={"k": 32, "v": 32})
    T, B = 700, 2
    raw = torch.randint(-1, 12, (B, T, spec.H, spec.S), generator=torch.Generator().manual_seed(7),
                        dtype=torch.int32)
    vis = sel.visible_blocks(raw, spec, None)
    cfg = Config.make(BLOCK_N=16, BLOCK_Q=16, TMA=0, SHARE=1, FORCED=forced, num_warps=4,
                      num_stages=1)
    mod = kernel_module("selection_fwd", spec, cfg)
    rows = (640, 1400)
    e_new, s_new = sel._query_lists(mod, vis, spec, T, None, None, rows, 16)
    e_old, s_old = lists_ab.torch_lists(vis, spec, T, None, None, rows, 16, forced > 0)
    assert int((s_new[:, 3] > 0).sum()) > 100
    assert torch.equal(e_new, e_old) and torch.equal(s_new, s_old)


def test_nsa_variant_probe_overrides_one_kernel():
    """benchmarks/nsa_variant_probe.py's dispatcher changes the named kernel's config only."""
    from nsa_gen.db.dispatch import default_dispatcher
    from nsa_gen.spec import load_spec
    nsa_variant_probe = bench_script("nsa_variant_probe")
    spec = load_spec("fla-compat")
    over = nsa_variant_probe._Override("selection_fwd", {"BLOCK_N": 16, "num_warps": 8})
    base = default_dispatcher().get("selection_fwd", spec, 4096, 1)
    got = over.get("selection_fwd", spec, 4096, 1)
    assert got == base.replace(BLOCK_N=16, num_warps=8) and got != base
    assert over.get("topn", spec, 4096, 1) == default_dispatcher().get("topn", spec, 4096, 1)
    # nsa() without autograd asks for the gated key, which falls back to selection_fwd
    gated = default_dispatcher().get("selection_fwd_gated", spec, 4096, 1)
    assert over.get("selection_fwd_gated", spec, 4096, 1) == gated.replace(BLOCK_N=16, num_warps=8)
    only = nsa_variant_probe._Override("selection_fwd_gated", {"BLOCK_N": 16})
    assert only.get("selection_fwd", spec, 4096, 1) == base


def test_launch_probe_options():
    """benchmarks/launch_probe.py changes the named launch option of selection.py's constants
    and nothing else; an unknown knob stops it."""
    from nsa_gen.ops import selection
    launch_probe = bench_script("launch_probe")
    base = launch_probe.options({})
    assert base == {"FORCED_LAUNCH": selection.FORCED_LAUNCH, "COMBINE_LAUNCH": selection.COMBINE_LAUNCH}
    got = launch_probe.options({"combine_stages": "3", "forced_warps": 8})
    assert got["COMBINE_LAUNCH"] == dict(selection.COMBINE_LAUNCH, num_stages=3)
    assert got["FORCED_LAUNCH"] == dict(selection.FORCED_LAUNCH, num_warps=8)
    assert selection.COMBINE_LAUNCH["num_stages"] == 1  # the module's own are left alone
    with pytest.raises(SystemExit, match="unknown knob"):
        launch_probe.options({"warps": 2})
    # a config param of the gated kernel is left to the probe's dispatcher
    assert launch_probe.options({"FORCED": 128}, ("FORCED",)) == base


def test_probe_main_flags(tmp_path):
    """A probe's own on/off options (the window probes' --backward) reach it as keywords,
    off by default; the rows go to OUT/<name>.json in order."""
    import json
    probe_main = bench_script("probe_main").probe_main
    seen = []

    def probe(run, T, backward=False):
        seen.append((run, T, backward))
        return {"run": run, "backward": backward}
    flags = {"backward": "also the backward"}
    assert probe_main("p", "SPEC", probe, flags, ["a", "b", "--backward", "--seqlen", "128",
                                                 "--out", str(tmp_path)]) == 0
    assert seen == [("a", 128, True), ("b", 128, True)]
    assert json.loads((tmp_path / "p.json").read_text()) == [{"run": "a", "backward": True},
                                                             {"run": "b", "backward": True}]
    seen.clear()
    probe_main("p", "SPEC", probe, flags, ["a"])
    assert seen == [("a", 65536, False)]
    with pytest.raises(SystemExit):  # a probe without the flag refuses it
        probe_main("p", "SPEC", lambda run, T: {}, {}, ["a", "--backward"])
    for name in ("cudnn_fe_window_probe", "cudnn_swa_probe", "flex_window_probe"):
        mod = bench_script(name)
        assert "backward" in inspect.signature(mod.probe).parameters, name


def test_idle_gaps_of_a_timeline():
    """benchmarks/probe_main.py's timeline helpers: kernels on a side stream that overlap
    count as busy; a wait is measured from the latest end before it, and names the kernel
    that ended last and the one that starts after; short waits are left out."""
    pm = bench_script("probe_main")
    events = [("a", 0.0, 100.0), ("side", 50.0, 300.0), ("b", 120.0, 200.0),  # b inside side
              ("c", 350.0, 400.0), ("d", 405.0, 500.0), ("e", 600.0, 610.0)]
    assert pm.idle_gaps(events) == [{"us": 50.0, "after": "side", "before": "c"},
                                    {"us": 100.0, "after": "d", "before": "e"}]
    assert pm.idle_gaps(events, min_us=1.0)[1] == {"us": 5.0, "after": "c", "before": "d"}
    assert pm.idle_gaps(list(reversed(events))) == pm.idle_gaps(events)  # any order in
    assert pm.idle_gaps([]) == []
    per = pm.per_kernel_ms(events + [("a", 700.0, 900.0)], calls=2)
    assert list(per)[:2] == ["a", "side"] and per["a"] == pytest.approx(0.15) and per["e"] == pytest.approx(0.005)


def test_host_ms_times_the_host_side_of_a_call():
    """benchmarks/probe_main.py's host_ms: the median host time of the calls, enqueued back
    to back after one `busy`, and the warm-up call untimed. A fake clock that fn advances
    keeps the test exact on a loaded machine (a real sleep overran its bound in CI)."""
    pm = bench_script("probe_main")
    steps, now = [], [0.0]
    naps = iter([0.05, 0.002, 0.003, 0.007])  # the first, the warm-up, is slow

    def fn():
        steps.append("fn")
        now[0] += next(naps)
    ms = pm.host_ms(fn, calls=3, busy=lambda: steps.append("busy"),
                    sync=lambda: steps.append("sync"), clock=lambda: now[0])
    assert steps == ["fn", "sync", "busy", "fn", "fn", "fn", "sync"]
    assert ms == pytest.approx(3.0)  # the median of 2, 3 and 7 ms, not the warm-up's 50


def test_host_top_names_the_functions_of_one_call():
    """benchmarks/probe_main.py's host_top: cProfile of one call after `busy`, the functions
    with the most time of their own first, each with its calls."""
    pm = bench_script("probe_main")

    def slow():
        time.sleep(0.004)

    def fn():
        for _ in range(3):
            slow()
    top = pm.host_top(fn, n=5, busy=lambda: None, sync=lambda: None)
    assert len(top) <= 5 and top == sorted(top, key=lambda r: -r["own_ms"])
    mine = next(r for r in top if r["function"].endswith("(slow)"))
    assert mine["calls"] == 3 and mine["total_ms"] >= 12.0
    assert mine["function"].startswith("test_benchmark.py:")


def test_error_line_of_a_probe():
    """benchmarks/probe_main.py's error_line: the type and the first line of the message, cut
    at 300 characters; an empty message leaves the type alone."""
    pm = bench_script("probe_main")
    assert pm.error_line(ValueError("bad tile\nsecond line")) == "ValueError: bad tile"
    assert pm.error_line(RuntimeError("x" * 400)) == "RuntimeError: " + "x" * 300
    assert pm.error_line(KeyError()) == "KeyError: "
