"""Probe: NSA's sliding window through cuDNN's own sliding-window attention, on an H200.

torch's cuDNN attention (`_scaled_dot_product_cudnn_attention`) takes a causal flag but no
window, so `cudnn_swa_probe.py` had to cut the tokens into chunks and mask a band with a bias
(computing (C + w) / w of the window's work). cuDNN itself has a diagonal band: with top-left
alignment, right bound 0 and left bound w, query t sees keys t - w < s <= t, which is NSA's
window exactly. The cuDNN frontend's Python graph API (the `nvidia-cudnn-frontend` wheel,
imported as `cudnn`; put it in .whl/ with `--no-deps`) sets those bounds. This probe builds
that graph once per (spec, T) over q, k, v as they are ([1, T, HQ, DK] seen as [B, HQ, T, DK],
no copy; GQA by head counts) and times, at T tokens, B = 1, bf16:
- window_fwd (the DB's config) against the cuDNN graph, with o and lse compared;
- with --backward, window_bwd against cuDNN's backward graph (same bounds, from cuDNN's own
  o and stats), with dq, dk and dv compared to window_bwd's.

If cuDNN skips the tiles outside the band, its forward should run the window's real work
(T * w * HQ * (DK + DV) * 2 FLOPs, 1.37 TFLOP for deepseek-nsa at 64k) near the rate it runs
the compressed attention at (430-550 TFLOP/s, RESULTS run 37): about 2.5-3.2 ms for
deepseek-nsa against window_fwd's 4.09, and 1.0-1.3 ms for small-group against 1.82.

Usage: python benchmarks/cudnn_fe_window_probe.py [--seqlen 65536] [--out DIR] [--backward] deepseek-nsa small-group
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen.benchmark import _bench  # noqa: E402
from probe_main import max_diff, probe_main, random_qkv  # noqa: E402


def _bhsd(x):
    """[1, T, heads, D] -> the [B, heads, T, D] view cuDNN's graph describes (no copy)."""
    return x.transpose(1, 2)


def _build(graph, cudnn) -> None:
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()


def _graph(cudnn):
    return cudnn.pygraph(io_data_type=cudnn.data_type.BFLOAT16,
                         intermediate_data_type=cudnn.data_type.FLOAT,
                         compute_data_type=cudnn.data_type.FLOAT)


def _band(cudnn, w: int) -> dict:
    """Query t sees keys t - w < s <= t: NSA's window."""
    return dict(diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT, diagonal_band_left_bound=w,
                diagonal_band_right_bound=0)


def probe(name: str, T: int, backward: bool = False) -> dict:
    import cudnn
    import torch

    from nsa_gen.api import _configs
    from nsa_gen.ops.window import window_fwd
    from nsa_gen.spec import load_spec

    spec = load_spec(name)
    row = {"spec": name, "T": T, "w": spec.w, "cudnn": cudnn.backend_version()}
    dev, dt = "cuda", torch.bfloat16
    q, k, v = random_qkv(spec, T)
    cfg = _configs(spec, T, 1, None)("window_fwd")
    row["config"] = str(cfg)
    o_ref, lse_ref = window_fwd(q, k, v, spec, cfg)
    row["ours_ms"] = _bench(lambda: window_fwd(q, k, v, spec, cfg))
    handle = cudnn.create_handle()
    try:
        o = torch.empty(1, T, spec.HQ, spec.DV, device=dev, dtype=dt)
        stats = torch.empty(1, spec.HQ, T, 1, device=dev, dtype=torch.float32)
        g = _graph(cudnn)
        tq, tk, tv = (g.tensor_like(_bhsd(x)) for x in (q, k, v))
        to, ts = g.sdpa(name="swa", q=tq, k=tk, v=tv, generate_stats=True,
                        attn_scale=spec.softmax_scale, **_band(cudnn, spec.w))
        to.set_output(True).set_dim(list(_bhsd(o).shape)).set_stride(list(_bhsd(o).stride()))
        ts.set_output(True).set_data_type(cudnn.data_type.FLOAT)
        ts.set_dim(list(stats.shape)).set_stride(list(stats.stride()))
        _build(g, cudnn)
        ws = torch.empty(g.get_workspace_size(), device=dev, dtype=torch.uint8)
        pack = {tq: _bhsd(q), tk: _bhsd(k), tv: _bhsd(v), to: _bhsd(o), ts: stats}

        def fwd():
            g.execute(pack, ws, handle=handle)
        fwd()
        torch.cuda.synchronize()
        row["err_o"] = max_diff(o, o_ref)
        row["err_lse"] = max_diff(stats[0, :, :, 0].t(), lse_ref[0])
        row["cudnn_ms"] = _bench(fwd)
        row["workspace_MiB"] = g.get_workspace_size() / 2**20
        if backward:
            time_backward(row, spec, q, k, v, o, stats, o_ref, lse_ref, handle, cudnn)
    except Exception as e:  # noqa: BLE001 - a probe reports what failed and goes on
        row["cudnn_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        cudnn.destroy_handle(handle)
    torch.cuda.synchronize()
    return row


def time_backward(row, spec, q, k, v, o, stats, o_ref, lse_ref, handle, cudnn) -> None:
    import torch

    from nsa_gen.api import _configs
    from nsa_gen.ops.window import window_bwd
    T = q.shape[1]
    do = torch.randn_like(o)
    bcfg = _configs(spec, T, 1, None)("window_bwd")
    row["bwd_config"] = str(bcfg)
    want = window_bwd(q, k, v, o_ref, lse_ref, do, spec, bcfg)
    row["ours_bwd_ms"] = _bench(lambda: window_bwd(q, k, v, o_ref, lse_ref, do, spec, bcfg))
    got = [torch.empty_like(x) for x in (q, k, v)]
    g = _graph(cudnn)
    tq, tk, tv, to, tdo = (g.tensor_like(_bhsd(x)) for x in (q, k, v, o, do))
    ts = g.tensor_like(stats)
    grads = g.sdpa_backward(name="swa_bwd", q=tq, k=tk, v=tv, o=to, dO=tdo, stats=ts,
                            attn_scale=spec.softmax_scale, **_band(cudnn, spec.w))
    for t, x in zip(grads, got):
        t.set_output(True).set_dim(list(_bhsd(x).shape)).set_stride(list(_bhsd(x).stride()))
    _build(g, cudnn)
    ws = torch.empty(g.get_workspace_size(), device=q.device, dtype=torch.uint8)
    pack = {tq: _bhsd(q), tk: _bhsd(k), tv: _bhsd(v), to: _bhsd(o), tdo: _bhsd(do), ts: stats,
            **{t: _bhsd(x) for t, x in zip(grads, got)}}

    def bwd():
        g.execute(pack, ws, handle=handle)
    bwd()
    torch.cuda.synchronize()
    for n, a, b in zip(("dq", "dk", "dv"), got, want):
        row[f"err_{n}"] = max_diff(a, b)
        row[f"scale_{n}"] = float(b.float().abs().max())
    row["cudnn_bwd_ms"] = _bench(bwd)


if __name__ == "__main__":
    sys.exit(probe_main("cudnn_fe_window_probe", "SPEC", probe,
                        {"backward": "also window_bwd against cuDNN's backward graph"}))
