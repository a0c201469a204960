"""Shared test setup: kernels run in Triton's interpreter on the CPU; outputs are poisoned."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    """Rendered modules go to a per-session cache, never the user's."""
    monkeypatch.setenv("NSA_GEN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kernel-cache"))


@pytest.fixture
def poison(monkeypatch):
    """Every tensor a launcher allocates with torch.empty starts as NaN (floats) or a
    sentinel (ints), so an element the kernel fails to write fails the comparison."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        wide = t.dtype in (torch.int32, torch.int64)
        t.fill_(float("nan") if t.is_floating_point() else -77777 if wide else 77)  # bytes: 77
        return t

    monkeypatch.setattr(torch, "empty", empty)
    return empty


def shrink(name: str, **changes):
    """A built-in spec with test-sized heads/dims; other fields as given."""
    from nsa_gen.spec import load_spec
    return load_spec(name).replace(**changes)


def cmp_spec(G: int, DK: int = 48, DV: int = 32, l: int = 8, d: int = 4, H: int = 1):  # noqa: E741
    """The paper's spec scaled down for the compressed branch's tests; DK = 48 is cut into
    32 + 16 tiles, DK != DV."""
    from nsa_gen.spec import load_spec
    return load_spec("deepseek-nsa").replace(
        heads={"q": G * H, "kv": H}, head_dim={"k": DK, "v": DV},
        compression={"block": l, "stride": d, "phi": "mean"},
        selection={"block": max(16, l), "top_n": 4, "initial_blocks": 1, "local_blocks": 2},
        window=16)


def check_deterministic(spec, run_function, dtype):
    """No float atomics: two runs of run_function(spec, q, k, v, do, cu=...) over two packed
    sequences give bit-for-bit equal outputs and gradients."""
    cu = [0, 41, 83]
    q, k, v, do = rand_inputs(spec, 1, cu[-1], dtype, seed=7)
    a = run_function(spec, q, k, v, do, cu=cu)
    b = run_function(spec, q, k, v, do, cu=cu)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def cudnn_config(stem: str, spec, T: int):
    """The default config at T of a kernel with a CUDNN variant (compression_fwd/bwd,
    window_fwd/bwd) with CUDNN = 1, in canonical form (the form the tuner tries and the DB
    would hold)."""
    from nsa_gen.kernels import kernel_def
    kd = kernel_def(stem)
    return kd.canonical(spec, kd.default(spec, T).replace(CUDNN=1))


def check_cudnn_matches_kernels(run, cfg, names: tuple[str, ...]) -> None:
    """run(config) -> outputs of a CUDNN = 1 config equal CUDNN = 0's to rounding (fp32's in
    the interpreter, fp16's on a GPU), output by output (`names`)."""
    for name, a, b in zip(names, run(cfg), run(cfg.replace(CUDNN=0))):
        assert rel_err(a, b) < (1e-5 if CUDNN_DTYPE == torch.float32 else 5e-3), name


def check_cudnn_falls_back(stem: str, why: str, spec, run, refusing: tuple, monkeypatch, caplog):
    """A CUDNN config of `stem` runs the generated kernels instead, with a warning, and gives
    CUDNN = 0's outputs bit for bit: for packed sequences (why "packed": cuDNN would need
    their lengths), under torch.use_deterministic_algorithms ("deterministic", the backward
    variants: cuDNN's is not deterministic), and when cuDNN raises ("error": refusing =
    (module, name) of the cuDNN call, made to raise). run(config, cu) -> outputs over 113
    tokens, cu the packed sequences' bounds or None."""
    from nsa_gen.ops import common
    message = {"packed": "CUDNN=1 runs without cu_seqlens",
               "deterministic": "deterministic algorithms requested",
               "error": "cuDNN attention failed"}[why]
    common._FALLBACKS_WARNED.discard((stem, message))
    monkeypatch.setattr(common, "_CUDNN_REFUSED", set())
    if why == "deterministic":
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    if why == "error":
        def refuse(*a, **kw):
            raise RuntimeError("cuDNN: no engine for this graph")
        monkeypatch.setattr(*refusing, refuse)
    cu = [0, 45, 50, 113] if why == "packed" else None
    cfg = cudnn_config(stem, spec, 113)
    with caplog.at_level("WARNING", logger="nsa_gen"):
        got = run(cfg, cu)
    assert any(message in r.getMessage() for r in caplog.records)
    want = run(cfg.replace(CUDNN=0), cu)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# Kernel tests run on the CPU interpreter unless TRITON_INTERPRET=0 is given on a GPU machine,
# where bf16 (garbage in the interpreter's tl.dot) is added.
def _device() -> str:
    from nsa_gen import env
    return "cpu" if env.interpret() or not torch.cuda.is_available() else "cuda"


DEVICE = _device()
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
# The CUDNN variants' test dtype: cuDNN attention takes 16-bit inputs only (fp32 on a GPU falls
# back to the kernels), and the interpreter's stand-in is fp32 math.
CUDNN_DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
# A harness case of a CUDNN variant: the error it passes under, and the error a wrong output
# must exceed (fp32 rounding in the interpreter; fp16's on a GPU).
CUDNN_TOL, CUDNN_WRONG = (1e-5, 1e-3) if CUDNN_DTYPE == torch.float32 else (TOL[torch.float16] / 2, TOL[torch.float16])


def rel_err(x, ref) -> float:
    """||x - ref|| / ||ref||; the absolute error where ref is zero (e.g. dq = 0 when w = 1);
    inf where x holds NaN or inf."""
    from nsa_gen.harness import rel_error
    return rel_error(x, ref)


def rand_inputs(spec, B: int, T: int, dtype, seed: int):
    """q, k, v and an upstream gradient do on DEVICE: fresh seeded normals (never zeros)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, T, spec.HQ, spec.DK), (B, T, spec.H, spec.DK), (B, T, spec.H, spec.DV),
              (B, T, spec.HQ, spec.DV)]
    return [torch.randn(*s, generator=g).to(DEVICE, dtype) for s in shapes]


def check_grads(got, ref, dtype, names=("o", "dq", "dk", "dv")):
    """Each kernel output in `dtype`, fully written (no NaN poison left), within TOL of ref."""
    for name, x, r in zip(names, got, ref):
        assert x.dtype == dtype, name
        assert not x.isnan().any(), f"{name}: unwritten (NaN-poisoned) elements"
        err = rel_err(x, r)
        assert err < TOL[dtype], f"{name}: relative error {err:.3g}"
