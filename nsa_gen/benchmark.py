"""`nsa-gen bench`: nsa-gen against torch SDPA (flash, cuDNN) and fla, in one process.

Times are medians of `triton.testing.do_bench`. For each T it reports the total and each
kernel, the achieved TFLOP/s against the spec's real FLOP count, and the peak extra GPU
memory of one nsa-gen call. Writes a markdown table, JSON and (with matplotlib) a PNG.
"""
from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

import torch

from .ops.common import FALLBACK_COUNTS
from .spec import BRANCHES, NSASpec, load_spec


def _visible_cmp(T: int, l: int, d: int) -> int:
    """sum over t of the compressed blocks visible to t: block i once i*d + l - 1 <= t."""
    t = torch.arange(T, dtype=torch.int64)
    return int(torch.clamp(torch.div(t - l + 1, d, rounding_mode="floor") + 1, min=0).sum())


def flops(spec: NSASpec, T: int, branch: str, B: int = 1) -> float:
    """Forward FLOPs of one branch (2 per multiply-add; QK and PV)."""
    per_key = 2 * spec.HQ * (spec.DK + spec.DV) * B
    if branch == "cmp":
        return per_key * _visible_cmp(T, spec.l, spec.d)
    if branch == "topn":  # QK again, to score
        return 2 * spec.HQ * spec.DK * B * _visible_cmp(T, spec.l, spec.d)
    if branch == "slc":
        n = spec.S * spec.BS
        return per_key * (n * (n + 1) / 2 + max(0, T - n) * n) if T > n else per_key * T * (T + 1) / 2
    if branch == "swa":
        w = spec.w
        return per_key * (w * (w + 1) / 2 + max(0, T - w) * w) if T > w else per_key * T * (T + 1) / 2
    if branch == "full":
        return per_key * T * (T + 1) / 2
    raise KeyError(branch)


def _bench(fn, warmup=25, rep=100, graph: bool = False) -> float:
    """Median ms of fn (do_bench). graph: replayed from a CUDA graph, for launches shorter
    than their launcher's CPU time (phi), which eager timing would measure instead."""
    import triton.testing
    if graph:
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _sdpa(q, k, v, backend, backward=False):
    """Full causal attention with K/V expanded to the query heads (outside the timer)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    G = q.shape[2] // k.shape[2]
    qt = q.detach().transpose(1, 2).requires_grad_(backward)
    kt = k.detach().repeat_interleave(G, 2).transpose(1, 2).requires_grad_(backward)
    vt = v.detach().repeat_interleave(G, 2).transpose(1, 2).requires_grad_(backward)

    def fwd():
        with sdpa_kernel(be):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    run = _with_backward(fwd, [qt, kt, vt]) if backward else fwd
    run()  # fails here, not inside the timer, when the backend can't take the shape
    return run


def _with_backward(fwd, leaves):
    """fwd + backward with a fixed random upstream gradient (made once, outside the timer)."""
    out = fwd()
    do = torch.randn_like(out)
    return lambda: torch.autograd.grad(fwd(), leaves, do)


def _fla(spec: NSASpec, q, k, v, g_cmp, g_slc, backward=False):
    from fla.ops.nsa import parallel_nsa
    if not (spec.l == spec.d == spec.BS == 64 and spec.phi == "mean" and spec.w == 0
            and spec.G >= 16 and spec.G & (spec.G - 1) == 0):
        raise RuntimeError("fla runs only l = l' = d = 64, mean, no window, G a power of 2 >= 16")
    leaves = [x.detach().requires_grad_(backward) for x in (q, k, v, g_cmp, g_slc)]

    def fwd():
        return parallel_nsa(*leaves, None, block_counts=spec.S, block_size=spec.BS,
                            window_size=0, scale=spec.softmax_scale)
    run = _with_backward(fwd, leaves) if backward else fwd
    run()
    return run


def bench_spec(spec: NSASpec, seqlens: list[int], *, dtype=torch.bfloat16, backward: bool = False,
               baselines: bool = True, log=print, device: str = "cuda") -> list[dict]:
    """One row per T: ms of nsa-gen (total and per kernel), SDPA flash/cudnn, fla."""
    from . import api
    from .ops.compression import compress_mean, compression_fwd
    from .ops.gate import gate_fwd
    from .ops.selection import selection_fwd, topn
    from .ops.window import window_fwd

    dev = device
    cuda = torch.device(dev).type == "cuda"
    rows = []
    for T in seqlens:
        torch.manual_seed(T)
        B = 1
        q = torch.randn(B, T, spec.HQ, spec.DK, device=dev, dtype=dtype)
        k = torch.randn(B, T, spec.H, spec.DK, device=dev, dtype=dtype)
        v = torch.randn(B, T, spec.H, spec.DV, device=dev, dtype=dtype)
        gates = {b: torch.sigmoid(torch.randn(B, T, spec.HQ, device=dev, dtype=dtype)) if spec.has(b)
                 else None for b in BRANCHES}
        row: dict = {"spec": spec.name, "T": T}
        cfg = api._configs(spec, T, B, None)
        stems = ("compress_mean", "compression_fwd", "topn", "selection_fwd",
                 "selection_fwd_gated", "window_fwd", "gate_fwd")
        row["configs"] = {s: str(cfg(s)) for s in stems}
        row["config_origin"] = _origins(spec, T, B, stems)
        fell_before = FALLBACK_COUNTS.copy()

        def total():
            return api.nsa(q, k, v, gates["cmp"], gates["slc"], gates["swa"], spec=spec)
        total()
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            total()
            torch.cuda.synchronize()
            row["peak_extra_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        row["nsa_gen"] = _bench(total)

        # Per kernel, on the same inputs and configs.
        phi = cfg("compress_mean")
        k_cmp, _ = compress_mean(k, spec, phi)
        v_cmp, _ = compress_mean(v, spec, phi)
        row["compress"] = _bench(lambda: (compress_mean(k, spec, phi), compress_mean(v, spec, phi)),
                                 graph=cuda)
        o_cmp, lse = compression_fwd(q, k_cmp, v_cmp, spec, cfg("compression_fwd"))
        # As nsa() runs it without autograd: a CUDNN config's output stays where cuDNN wrote it.
        row["compression_fwd"] = _bench(lambda: compression_fwd(q, k_cmp, v_cmp, spec, cfg("compression_fwd"),
                                                                pieces=True))
        outs = {"cmp": o_cmp} if spec.has("cmp") else {}
        idx = None
        if spec.has("slc"):
            idx = topn(q, k_cmp, lse, spec, cfg("topn"))
            row["topn"] = _bench(lambda: topn(q, k_cmp, lse, spec, cfg("topn")))
            # As nsa() runs it: topn's lists are canonical and hold every forced block.
            slc = dict(canonical=True, forced_listed=True)
            outs["slc"] = selection_fwd(q, k, v, idx, spec, cfg("selection_fwd"), **slc)[0]
            row["selection_fwd"] = _bench(lambda: selection_fwd(q, k, v, idx, spec,
                                                                cfg("selection_fwd"), **slc))
        if spec.has("swa"):
            outs["swa"] = window_fwd(q, k, v, spec, cfg("window_fwd"))[0]
            row["window_fwd"] = _bench(lambda: window_fwd(q, k, v, spec, cfg("window_fwd")))
        g_outs = {b: gates[b] for b in outs}
        row["gate_fwd"] = _bench(lambda: gate_fwd(outs, g_outs, spec, cfg("gate_fwd")))
        del outs, g_outs

        if backward:
            leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
            gl = [g.detach().requires_grad_(True) if g is not None else None for g in gates.values()]
            try:
                row["nsa_gen_fb"] = _bench(_with_backward(
                    lambda: api.nsa(*leaves, *gl, spec=spec), leaves + [g for g in gl if g is not None]))
                _bench_bwd_kernels(row, spec, cfg, q, k, v, k_cmp, v_cmp, o_cmp, lse, idx)
            except Exception as e:  # keep the forward numbers and the baselines
                row["nsa_gen_fb_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                log(f"{spec.name} T={T}: backward failed: {row['nsa_gen_fb_error']}")

        # A launch that fell back did not run the config `configs` names: say so beside it.
        fell = FALLBACK_COUNTS - fell_before
        if fell:
            row["fallbacks"] = {f"{stem}: {why}": n for (stem, why), n in sorted(fell.items())}
            log(f"{spec.name} T={T}: launches that fell back: {row['fallbacks']}")

        fl = {b: flops(spec, T, b) for b in ("cmp", "topn", "slc", "swa", "full")}
        real = fl["cmp"] + (fl["topn"] + fl["slc"] if spec.has("slc") else 0) + (fl["swa"] if spec.has("swa") else 0)
        row["tflops"] = real / row["nsa_gen"] / 1e9
        for name, b in (("compression_fwd", "cmp"), ("topn", "topn"), ("selection_fwd", "slc"), ("window_fwd", "swa")):
            if name in row:
                row[f"{name}_tflops"] = fl[b] / row[name] / 1e9

        if baselines:
            for sfx, bwd in (("", False), ("_fb", True)) if backward else (("", False),):
                for be in ("flash", "cudnn"):
                    try:
                        row[f"sdpa_{be}{sfx}"] = _bench(_sdpa(q, k, v, be, bwd))
                    except Exception as e:  # backend refuses the shape: a table cell, not a crash
                        row[f"sdpa_{be}{sfx}"] = None
                        row[f"sdpa_{be}{sfx}_error"] = f"{type(e).__name__}: {str(e)[:80]}"
                try:
                    row[f"fla{sfx}"] = _bench(_fla(spec, q, k, v, gates["cmp"], gates["slc"], bwd))
                except Exception as e:
                    row[f"fla{sfx}"] = None
                    row[f"fla{sfx}_error"] = f"{type(e).__name__}: {str(e)[:80]}"
            if row.get("sdpa_flash"):
                row["sdpa_flash_tflops"] = fl["full"] / row["sdpa_flash"] / 1e9
            if row.get("sdpa_cudnn"):
                row["sdpa_cudnn_tflops"] = fl["full"] / row["sdpa_cudnn"] / 1e9
        log(_fmt_row(row))
        rows.append(row)
        del q, k, v, gates
        if cuda:
            torch.cuda.empty_cache()
    return rows


def decode_bytes(spec: NSASpec, T: int, B: int) -> tuple[int, int]:
    """(nsa-gen decode, full attention) bytes of the cache read for one new token per
    sequence at position T - 1 (2-byte elements): the compressed keys and values once, the
    fp32 scores written and read again, the S selected blocks, the window; full attention
    reads every key and value."""
    kv = 2 * (spec.DK + spec.DV) * spec.H * B
    from .kernels import num_cmp_blocks
    nc = num_cmp_blocks(T, spec.l, spec.d) if (spec.has("cmp") or spec.has("slc")) else 0
    ours = (2 * (spec.DK + spec.DV) * spec.H + 2 * 4 * spec.HQ) * B * nc
    ours += kv * (spec.S * spec.BS if spec.has("slc") else 0) + kv * (spec.w if spec.has("swa") else 0)
    return ours, kv * T


def _sdpa_decode(q, k, v, backend):
    """Full attention of one new token over the whole cache (GQA read as is)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def fwd():
        with sdpa_kernel([be]):
            return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
    fwd()
    return fwd


def bench_decode(spec: NSASpec, seqlens: list[int], batches: list[int], *, dtype=torch.bfloat16,
                 baselines: bool = True, log=print, device: str = "cuda") -> list[dict]:
    """One row per (B, T): one new token for each of B sequences of T cached tokens.
    nsa-gen eager and replayed from a CUDA graph (how serving runs a decode step), each
    kernel, and SDPA over the whole cache (flash and cuDNN backends)."""
    from . import api
    from .ops import decode

    cuda = torch.device(device).type == "cuda"
    rows = []
    for B in batches:
        for T in seqlens:
            torch.manual_seed(T + B)
            row: dict = {"spec": spec.name, "B": B, "T": T}
            k = torch.randn(B, T, spec.H, spec.DK, device=device, dtype=dtype)
            v = torch.randn(B, T, spec.H, spec.DV, device=device, dtype=dtype)
            cache = decode.NSACache(spec, B, T, device=device, dtype=dtype)
            cache.append(k, v)
            q = torch.randn(B, 1, spec.HQ, spec.DK, device=device, dtype=dtype)
            gates = [torch.sigmoid(torch.randn(B, 1, spec.HQ, device=device, dtype=dtype))
                     if spec.has(b) else None for b in BRANCHES]
            cfg = api._configs(spec, T, B, None)
            row["configs"] = {s: str(cfg(s)) for s in ("decode_select", "decode_attend")}
            row["config_origin"] = _origins(spec, T, B, ("decode_select", "decode_attend"))

            def step():
                return api.nsa_decode(q, cache, *gates)
            step()
            row["nsa_gen"] = _bench(step)
            row["nsa_gen_graph"] = _bench(step, graph=True)
            q2 = q.reshape(B, spec.HQ, spec.DK)
            parts = idx = None
            if spec.has("cmp") or spec.has("slc"):
                *parts, gp = decode.decode_select(q2, cache, 1, cfg("decode_select"))
                row["decode_select"] = _bench(
                    lambda: decode.decode_select(q2, cache, 1, cfg("decode_select")), graph=True)
            if spec.has("slc"):
                idx = decode.decode_topn(gp, cache, 1, cfg("decode_select"))
                row["decode_topn"] = _bench(lambda: decode.decode_topn(gp, cache, 1, cfg("decode_select")),
                                            graph=True)
            on = {b: g.reshape(B, spec.HQ) for b, g in zip(BRANCHES, gates) if g is not None}
            row["decode_attend"] = _bench(lambda: decode.decode_attend(
                q2, cache, 1, idx, parts, on, cfg("decode_attend")), graph=True)
            # The whole step, append included, replayed from a DecodeGraph and called from
            # Python (input copies, replay): what an eager caller pays with the graph. The
            # cache is reset to T - 1 tokens before each step.
            if cuda:
                cache.lengths.fill_(T - 1)
                step_graph = api.DecodeGraph(cache, 1, tuple(b for b, g in zip(BRANCHES, gates)
                                                            if g is not None))
                k1, v1 = k[:, -1:].contiguous(), v[:, -1:].contiguous()
                row["decode_graph"] = _bench(lambda: (cache.lengths.fill_(T - 1),
                                                      step_graph(q, k1, v1, *gates)))
                del step_graph
            ours, full = decode_bytes(spec, T, B)
            row["MB_read"], row["full_MB_read"] = ours / 2**20, full / 2**20
            row["TBps"] = ours / row["nsa_gen_graph"] / 1e9
            if baselines:
                # Both ways, as ours: eager (do_bench flushes L2 before each run) and replayed
                # from a CUDA graph (no flush: a short batch's cache stays in L2).
                for be in ("flash", "cudnn"):
                    try:
                        fn = _sdpa_decode(q, k, v, be)
                        row[f"sdpa_{be}"] = _bench(fn)
                        row[f"sdpa_{be}_graph"] = _bench(fn, graph=True)
                    except Exception as e:  # backend refuses the shape: a table cell
                        row[f"sdpa_{be}"] = row[f"sdpa_{be}_graph"] = None
                        row[f"sdpa_{be}_error"] = f"{type(e).__name__}: {str(e)[:80]}"
            log(f"{spec.name} decode B={B} T={T}: nsa-gen {_ms(row['nsa_gen'])} ms eager, "
                f"{_ms(row['nsa_gen_graph'])} graph; cudnn {_ms(row.get('sdpa_cudnn'))} eager, "
                f"{_ms(row.get('sdpa_cudnn_graph'))} graph")
            rows.append(row)
            del k, v, cache
            if cuda:
                torch.cuda.empty_cache()
    return rows


def _bench_bwd_kernels(row, spec, cfg, q, k, v, k_cmp, v_cmp, o_cmp, lse, idx) -> None:
    """Each backward launcher alone, on the forward's outputs (o_cmp, lse, idx as
    bench_spec computed them) and a random upstream grad."""
    from .ops.compression import compression_bwd
    from .ops.selection import selection_bwd, selection_fwd
    from .ops.window import window_bwd, window_fwd
    do = torch.randn_like(o_cmp)
    row["compression_bwd"] = _bench(lambda: compression_bwd(q, k_cmp, v_cmp, o_cmp, lse, do, spec,
                                                            cfg("compression_bwd")))
    if idx is not None:
        o_s, lse_s = selection_fwd(q, k, v, idx, spec, cfg("selection_fwd"), canonical=True,
                                   forced_listed=True)
        row["selection_bwd"] = _bench(lambda: selection_bwd(q, k, v, o_s, lse_s, do, idx, spec,
                                                            cfg("selection_bwd")))
    if spec.has("swa"):
        o_w, lse_w = window_fwd(q, k, v, spec, cfg("window_fwd"))
        row["window_bwd"] = _bench(lambda: window_bwd(q, k, v, o_w, lse_w, do, spec, cfg("window_bwd")))


def _ms(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _fmt_row(r: dict) -> str:
    line = (f"{r['spec']} T={r['T']}: nsa-gen {_ms(r['nsa_gen'])} ms ({r['tflops']:.0f} TFLOP/s), "
            f"flash {_ms(r.get('sdpa_flash'))}, cudnn {_ms(r.get('sdpa_cudnn'))}, fla {_ms(r.get('fla'))}")
    if "nsa_gen_fb" in r:
        line += (f"; fwd+bwd nsa-gen {_ms(r['nsa_gen_fb'])}, flash {_ms(r.get('sdpa_flash_fb'))}, "
                 f"cudnn {_ms(r.get('sdpa_cudnn_fb'))}, fla {_ms(r.get('fla_fb'))}")
    return line


COLS = [("T", "T"), ("nsa_gen", "nsa-gen ms"), ("tflops", "TFLOP/s"), ("peak_extra_MiB", "peak extra MiB"),
        ("compress", "phi"), ("compression_fwd", "cmp"), ("topn", "top-n"), ("selection_fwd", "slc"),
        ("window_fwd", "swa"), ("gate_fwd", "gate"), ("sdpa_flash", "sdpa flash"), ("sdpa_cudnn", "sdpa cudnn"), ("fla", "fla"),
        ("vs_cudnn", "x cudnn"), ("vs_fla", "x fla")]
COLS_FB = [("T", "T"), ("nsa_gen_fb", "nsa-gen fwd+bwd ms"), ("compression_bwd", "cmp bwd"),
           ("selection_bwd", "slc bwd"), ("window_bwd", "swa bwd"), ("sdpa_flash_fb", "sdpa flash"),
           ("sdpa_cudnn_fb", "sdpa cudnn"), ("fla_fb", "fla"), ("vs_cudnn_fb", "x cudnn"),
           ("vs_fla_fb", "x fla")]


COLS_DECODE = [("B", "B"), ("T", "T"), ("nsa_gen", "nsa-gen ms"), ("nsa_gen_graph", "nsa-gen graph ms"),
               ("decode_graph", "DecodeGraph step ms"),
               ("decode_select", "select"), ("decode_topn", "top-n"), ("decode_attend", "attend"),
               ("MB_read", "MB read"), ("TBps", "TB/s"), ("full_MB_read", "full attn MB"),
               ("sdpa_flash", "sdpa flash"), ("sdpa_cudnn", "sdpa cudnn"),
               ("sdpa_flash_graph", "sdpa flash graph"), ("sdpa_cudnn_graph", "sdpa cudnn graph"),
               ("vs_cudnn", "x cudnn"), ("vs_cudnn_graph", "x cudnn (graphs)")]


def _ratio(r: dict, base: str, ours: str):
    return r[base] / r[ours] if r.get(base) and r.get(ours) else None


def _table(rows: list[dict], cols) -> list[str]:
    out = ["| spec | " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        cells = []
        for key, _ in cols:
            x = r.get(key)
            cells.append("-" if x is None else (str(x) if isinstance(x, int) else f"{x:.2f}"))
        out.append(f"| {r['spec']} | " + " | ".join(cells) + " |")
    return out


def markdown(rows: list[dict]) -> str:
    for r in rows:
        r["vs_cudnn"], r["vs_fla"] = _ratio(r, "sdpa_cudnn", "nsa_gen"), _ratio(r, "fla", "nsa_gen")
        r["vs_cudnn_fb"] = _ratio(r, "sdpa_cudnn_fb", "nsa_gen_fb")
        r["vs_fla_fb"] = _ratio(r, "fla_fb", "nsa_gen_fb")
    dec = [r for r in rows if "B" in r]
    for r in dec:  # each way against the same way
        r["vs_cudnn"] = _ratio(r, "sdpa_cudnn", "nsa_gen")
        r["vs_cudnn_graph"] = _ratio(r, "sdpa_cudnn_graph", "nsa_gen_graph")
    rows = [r for r in rows if "B" not in r]
    out = (["Forward:", ""] + _table(rows, COLS)) if rows else []
    if dec:
        out += (["", ""] if out else []) + ["Decode (one new token a sequence):", ""] + _table(dec, COLS_DECODE)
    if any("nsa_gen_fb" in r for r in rows):
        out += ["", "Forward + backward:", ""] + _table(rows, COLS_FB)
    fell = [f"- {r['spec']} T={r['T']}: {what} ({n} launches)" for r in rows
            for what, n in r.get("fallbacks", {}).items()]
    if fell:
        out += ["", "Launches that fell back from the config named (their times are the "
                "fallback's):", ""] + fell
    untuned = [f"- {r['spec']} T={r['T']}" + (f" B={r['B']}" if "B" in r else "") + f": {stem}: {where}"
               for r in rows + dec for stem, where in r.get("config_origin", {}).items()
               if "heuristic default" in where]
    if untuned:
        out += ["", "Kernels that ran without a DB entry:", ""] + untuned
    return "\n".join(out)


def _origins(spec: NSASpec, T: int, B: int, stems) -> dict[str, str]:
    """Where the dispatcher's config of each kernel the spec runs comes from (a DB entry or
    the default); kernels of branches it lacks (fla-compat's window) are left out."""
    from .db import default_dispatcher
    from .kernels import kernel_def
    return {s: default_dispatcher().origin(s, spec, T, B) for s in stems if kernel_def(s).applies(spec)}


def environment() -> dict:
    import triton
    d = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
         "triton": triton.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name()
    try:
        import fla
        d["fla"] = getattr(fla, "__version__", "?")
    except ImportError:
        d["fla"] = None
    return d


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for spec in sorted({r["spec"] for r in rows}):
        rs = [r for r in rows if r["spec"] == spec]
        for key, style in (("nsa_gen", "-o"), ("sdpa_cudnn", "--s"), ("fla", ":^")):
            pts = [(r["T"], r[key]) for r in rs if r.get(key)]
            if pts:
                ax.plot(*zip(*pts), style, label=f"{spec} {key}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T (tokens)")
    ax.set_ylabel("ms (median)")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def run(specs: list[str], seqlens: list[int], out: Path, baselines: bool = True,
        backward: bool = False, decode: list[int] | None = None) -> int:
    if not torch.cuda.is_available():
        print("nsa-gen: error: bench needs a CUDA GPU")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in specs:
        if decode:
            rows += bench_decode(load_spec(name), seqlens, decode, baselines=baselines)
        else:
            rows += bench_spec(load_spec(name), seqlens, baselines=baselines, backward=backward)
    envd = environment()
    md = f"{envd}\n\n" + markdown(rows)
    (out / "bench.md").write_text(md + "\n")
    (out / "bench.json").write_text(json.dumps({"env": envd, "rows": rows}, indent=1, default=str))
    plot(rows, out / "bench.png")
    print(md)
    return 0


def register(sub) -> None:
    s = sub.add_parser("bench", help="benchmark against torch SDPA and fla on the GPU")
    s.add_argument("spec", nargs="+")
    s.add_argument("--seqlens", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    s.add_argument("--out", default="out/bench")
    s.add_argument("--no-baselines", action="store_true")
    s.add_argument("--backward", action="store_true", help="also time forward + backward")
    s.add_argument("--decode", type=int, nargs="+", metavar="B",
                   help="time decode instead: one new token for each of B sequences of T cached "
                        "tokens (T from --seqlens), for each B given")
    s.set_defaults(func=lambda a: run(a.spec, a.seqlens, Path(a.out), not a.no_baselines,
                                      a.backward, a.decode))

