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

from .spec import NSASpec, load_spec


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


def _bench(fn, warmup=25, rep=100) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _sdpa(q, k, v, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    G = q.shape[2] // k.shape[2]
    qt = q.transpose(1, 2)
    kt = k.repeat_interleave(G, 2).transpose(1, 2)
    vt = v.repeat_interleave(G, 2).transpose(1, 2)

    def run():
        with sdpa_kernel(be):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    run()  # fails here, not inside the timer, when the backend can't take the shape
    return run


def _fla(spec: NSASpec, q, k, v, g_cmp, g_slc):
    from fla.ops.nsa import parallel_nsa
    if not (spec.l == spec.d == spec.BS == 64 and spec.phi == "mean" and spec.w == 0
            and spec.G >= 16 and spec.G & (spec.G - 1) == 0):
        raise RuntimeError("fla runs only l = l' = d = 64, mean, no window, G a power of 2 >= 16")

    def run():
        return parallel_nsa(q, k, v, g_cmp, g_slc, None, block_counts=spec.S,
                            block_size=spec.BS, window_size=0, scale=spec.softmax_scale)
    run()
    return run


def bench_spec(spec: NSASpec, seqlens: list[int], *, dtype=torch.bfloat16, backward: bool = False,
               baselines: bool = True, log=print) -> list[dict]:
    """One row per T: ms of nsa-gen (total and per kernel), SDPA flash/cudnn, fla."""
    from . import api
    from .ops.compression import compress_mean, compression_fwd
    from .ops.selection import selection_fwd, topn
    from .ops.window import window_fwd

    dev = "cuda"
    rows = []
    for T in seqlens:
        torch.manual_seed(T)
        B = 1
        q = torch.randn(B, T, spec.HQ, spec.DK, device=dev, dtype=dtype)
        k = torch.randn(B, T, spec.H, spec.DK, device=dev, dtype=dtype)
        v = torch.randn(B, T, spec.H, spec.DV, device=dev, dtype=dtype)
        gates = {b: torch.sigmoid(torch.randn(B, T, spec.HQ, device=dev, dtype=dtype)) if spec.has(b)
                 else None for b in ("cmp", "slc", "swa")}
        row: dict = {"spec": spec.name, "T": T}
        cfg = api._configs(spec, T, B, None)
        row["configs"] = {s: str(cfg(s)) for s in ("compression_fwd", "topn", "selection_fwd", "window_fwd")}

        def total():
            return api.nsa(q, k, v, gates["cmp"], gates["slc"], gates["swa"], spec=spec)
        total()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        total()
        torch.cuda.synchronize()
        row["peak_extra_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        row["nsa_gen"] = _bench(total)

        # Per kernel, on the same inputs and configs.
        k_cmp, _ = compress_mean(k, spec.l, spec.d)
        v_cmp, _ = compress_mean(v, spec.l, spec.d)
        row["compress"] = _bench(lambda: (compress_mean(k, spec.l, spec.d), compress_mean(v, spec.l, spec.d)))
        o_cmp, lse = compression_fwd(q, k_cmp, v_cmp, spec, cfg("compression_fwd"))
        row["compression_fwd"] = _bench(lambda: compression_fwd(q, k_cmp, v_cmp, spec, cfg("compression_fwd")))
        if spec.has("slc"):
            idx = topn(q, k_cmp, lse, spec, cfg("topn"))
            row["topn"] = _bench(lambda: topn(q, k_cmp, lse, spec, cfg("topn")))
            row["selection_fwd"] = _bench(lambda: selection_fwd(q, k, v, idx, spec, cfg("selection_fwd")))
        if spec.has("swa"):
            row["window_fwd"] = _bench(lambda: window_fwd(q, k, v, spec, cfg("window_fwd")))

        fl = {b: flops(spec, T, b) for b in ("cmp", "topn", "slc", "swa", "full")}
        real = fl["cmp"] + (fl["topn"] + fl["slc"] if spec.has("slc") else 0) + (fl["swa"] if spec.has("swa") else 0)
        row["tflops"] = real / row["nsa_gen"] / 1e9
        for name, b in (("compression_fwd", "cmp"), ("topn", "topn"), ("selection_fwd", "slc"), ("window_fwd", "swa")):
            if name in row:
                row[f"{name}_tflops"] = fl[b] / row[name] / 1e9

        if baselines:
            for be in ("flash", "cudnn"):
                try:
                    row[f"sdpa_{be}"] = _bench(_sdpa(q, k, v, be))
                    row[f"sdpa_{be}_tflops"] = fl["full"] / row[f"sdpa_{be}"] / 1e9
                except Exception as e:  # backend refuses the shape: a table cell, not a crash
                    row[f"sdpa_{be}"] = None
                    row[f"sdpa_{be}_error"] = f"{type(e).__name__}: {str(e)[:80]}"
            try:
                row["fla"] = _bench(_fla(spec, q, k, v, gates["cmp"], gates["slc"]))
            except Exception as e:
                row["fla"] = None
                row["fla_error"] = f"{type(e).__name__}: {str(e)[:80]}"
        log(_fmt_row(row))
        rows.append(row)
        del q, k, v, gates
        torch.cuda.empty_cache()
    return rows


def _ms(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _fmt_row(r: dict) -> str:
    return (f"{r['spec']} T={r['T']}: nsa-gen {_ms(r['nsa_gen'])} ms ({r['tflops']:.0f} TFLOP/s), "
            f"flash {_ms(r.get('sdpa_flash'))}, cudnn {_ms(r.get('sdpa_cudnn'))}, fla {_ms(r.get('fla'))}")


COLS = [("T", "T"), ("nsa_gen", "nsa-gen ms"), ("tflops", "TFLOP/s"), ("peak_extra_MiB", "peak extra MiB"),
        ("compress", "phi"), ("compression_fwd", "cmp"), ("topn", "top-n"), ("selection_fwd", "slc"),
        ("window_fwd", "swa"), ("sdpa_flash", "sdpa flash"), ("sdpa_cudnn", "sdpa cudnn"), ("fla", "fla"),
        ("vs_cudnn", "x cudnn"), ("vs_fla", "x fla")]


def markdown(rows: list[dict]) -> str:
    out = []
    for r in rows:
        r["vs_cudnn"] = r["sdpa_cudnn"] / r["nsa_gen"] if r.get("sdpa_cudnn") else None
        r["vs_fla"] = r["fla"] / r["nsa_gen"] if r.get("fla") else None
    out.append("| spec | " + " | ".join(h for _, h in COLS) + " |")
    out.append("|" + "---|" * (len(COLS) + 1))
    for r in rows:
        cells = []
        for key, _ in COLS:
            x = r.get(key)
            cells.append("-" if x is None else (str(x) if isinstance(x, int) else f"{x:.2f}"))
        out.append(f"| {r['spec']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


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


def run(specs: list[str], seqlens: list[int], out: Path, baselines: bool = True) -> int:
    if not torch.cuda.is_available():
        print("nsa-gen: error: bench needs a CUDA GPU")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in specs:
        rows += bench_spec(load_spec(name), seqlens, baselines=baselines)
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
    s.set_defaults(func=lambda a: run(a.spec, a.seqlens, Path(a.out), not a.no_baselines))

