"""compress_mean's backward at 64k: session 15's first form (fp32 dx, an indexed add per
chunk position of a block) against the chunk-sum form on main (dx written once)."""
import torch
from triton.testing import do_bench
from nsa_gen.ops.compression import compress_mean_bwd
from nsa_gen.spec import load_spec


def first_form(dx_cmp, shape, l, d):
    B, T, H, D = shape
    dx = torch.zeros(B * T, H, D, device=dx_cmp.device, dtype=torch.float32)
    n = dx_cmp.shape[0] * dx_cmp.shape[1]
    i = torch.arange(n, device=dx.device)
    NC = dx_cmp.shape[1]
    first = (i // NC) * T + (i % NC) * d
    g = (dx_cmp.reshape(n, H, D).float() / l).repeat_interleave(d, 0)
    r_d = torch.arange(d, device=dx.device)
    for j in range(l // d):
        dx[((first + j * d)[:, None] + r_d).flatten()] += g
    return dx.view(B, T, H, D).to(dx_cmp.dtype)


for name in ("fla-compat", "deepseek-nsa", "small-group"):
    spec = load_spec(name)
    T = 65536
    NC = (T - spec.l) // spec.d + 1
    for D in sorted({spec.DK, spec.DV}):
        g = torch.randn(1, NC, spec.H, D, device="cuda", dtype=torch.bfloat16)
        shape = torch.Size((1, T, spec.H, D))
        a, b = first_form(g, shape, spec.l, spec.d), compress_mean_bwd(g, shape, spec.l, spec.d, None, None)
        same = torch.equal(a, b)
        ta = do_bench(lambda: first_form(g, shape, spec.l, spec.d), return_mode="median")
        tb = do_bench(lambda: compress_mean_bwd(g, shape, spec.l, spec.d, None, None), return_mode="median")
        print(f"{name} D={D}: first form {ta:.3f} ms, chunk sums {tb:.3f} ms, equal {same}")
