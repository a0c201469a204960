"""The `nsa-gen` command (also `python cli.py` from a checkout)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import __version__, env
from .spec import SpecError, builtin_specs, load_spec


def _device(arg: str | None) -> str:
    import torch
    if arg:
        return arg
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtypes(arg: list[str] | None, spec, device: str):
    import torch
    from .harness import DTYPES
    if arg:
        return [DTYPES[a] for a in arg]
    if device == "cpu":
        # The interpreter's tl.dot on bf16 is unreliable: CPU runs check fp32 and fp16.
        return [torch.float32, torch.float16]
    return [DTYPES[spec.dtype]]


def cmd_specs(args) -> int:
    for name in builtin_specs():
        s = load_spec(name)
        print(f"{name:14s} HQ/H={s.HQ}/{s.H} G={s.G} DK/DV={s.DK}/{s.DV} l={s.l} d={s.d} "
              f"l'={s.BS} n={s.S} w={s.w} phi={s.phi} branches={','.join(s.branches)}")
    return 0


def cmd_show(args) -> int:
    import yaml
    s = load_spec(args.spec)
    print(yaml.safe_dump(s.to_dict(), sort_keys=False).rstrip())
    print(f"# G={s.G} scale={s.softmax_scale:.6g} spec_hash={s.spec_hash}")
    return 0


def cmd_generate(args) -> int:
    from .codegen import atomic_write
    from .kernels import kernel_source
    from .verify import applicable_kernels
    spec = load_spec(args.spec)
    out = Path(args.output)
    for stem in applicable_kernels(spec):
        path = out / f"{stem}.py"
        atomic_write(path, kernel_source(stem, spec))
        print(path)
    return 0


def cmd_verify(args) -> int:
    from .verify import format_table, verify_specs
    device = _device(args.device)
    specs = [load_spec(name) for name in args.spec]
    runs = [(spec, dict(T=args.seqlen, B=args.batch, dtypes=_dtypes(args.dtype, spec, device),
                        device=device, kernels=args.kernels, seed=args.seed,
                        db_seqlens=tuple(args.db_seqlens), variants=not args.no_variants))
            for spec in specs]
    failed = False
    for spec, res in verify_specs(runs, jobs=args.jobs):
        print(format_table(spec.name, res), flush=True)
        failed |= not all(r.ok for r in res)
    return 1 if failed else 0


def cmd_build(args) -> int:
    """The main job: generate and verify every built-in spec; tune where a GPU exists."""
    import torch
    rc = 0
    for name in builtin_specs():
        a = argparse.Namespace(spec=name, output=str(Path(args.out) / name))
        rc |= cmd_generate(a)
    # On a CPU only default configs ever run (no DB entries are keyed to the interpreter):
    # the structural variants, three times the rows in the slow interpreter, are checked on
    # a GPU, by `nsa-gen verify` and by the tests.
    gpu = torch.cuda.is_available()
    variants = gpu or args.all_variants
    if not variants:
        print("no GPU here: verifying each kernel's default config (--all-variants adds the "
              "structural variants the tuner picks from on a GPU)", flush=True)
    a = argparse.Namespace(spec=builtin_specs(), seqlen=args.seqlen, batch=1, dtype=None,
                           device=None, kernels=None, seed=0, db_seqlens=(), no_variants=not variants,
                           jobs=args.jobs or (1 if gpu else os.cpu_count()))
    rc |= cmd_verify(a)
    if gpu and not args.no_tune:
        from .tuning.commands import run_tune_all
        rc |= run_tune_all(builtin_specs(), trials=args.trials)
    elif not gpu:
        print("no GPU here: tuning skipped (kernels were verified in Triton's interpreter)")
    return rc


def build_parser() -> argparse.ArgumentParser:
    from .tuning.commands import seqlens_arg
    p = argparse.ArgumentParser(prog="nsa-gen", description="Generated, autotuned Triton kernels "
                                "for Native Sparse Attention.")
    p.add_argument("--version", action="version", version=f"nsa-gen {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("specs", help="list the built-in specs")
    s.set_defaults(func=cmd_specs)

    s = sub.add_parser("show", help="validate a spec and print it")
    s.add_argument("spec", help="built-in spec name or YAML path")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("generate", help="write a spec's kernels as standalone .py files")
    s.add_argument("spec")
    s.add_argument("-o", "--output", required=True, help="output directory")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("verify", help="check each kernel against the fp32 reference")
    s.add_argument("spec", nargs="+")
    s.add_argument("--seqlen", "-T", type=int, default=None,
                   help="tokens (default 100 on the CPU, 4096 on a GPU)")
    s.add_argument("--batch", "-B", type=int, default=1)
    s.add_argument("--dtype", nargs="+", choices=["float32", "float16", "bfloat16"])
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.add_argument("--kernels", nargs="+", help="kernel stems (default: all the spec uses)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--db-seqlens", type=seqlens_arg, default=(), metavar="T[,T...]",
                   help="also check the configs the tuning DB dispatches at these token counts "
                   "(e.g. 64k), each run at --seqlen")
    s.add_argument("--no-variants", action="store_true",
                   help="run each kernel's default config alone, not its structural variants")
    s.add_argument("--jobs", "-j", type=int, default=1,
                   help="specs verified at once, each in a process of its own (default 1)")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("build", help="the main job: generate + verify the built-in specs, "
                       "tune where a GPU exists")
    s.add_argument("--out", default="out/kernels", help="where generated kernels go")
    s.add_argument("--seqlen", "-T", type=int, default=None)
    s.add_argument("--trials", type=int, default=40)
    s.add_argument("--no-tune", action="store_true")
    s.add_argument("--all-variants", action="store_true",
                   help="on a CPU also verify each kernel's structural variants (always on a GPU)")
    s.add_argument("--jobs", "-j", type=int, default=None,
                   help="specs verified at once (default: one per core on a CPU, 1 on a GPU)")
    s.set_defaults(func=cmd_build)

    from .benchmark import register as register_bench
    from .tuning.commands import register as register_tuning
    register_bench(sub)
    register_tuning(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="nsa-gen: %(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command in ("verify", "build"):
        device = _device(getattr(args, "device", None))
        if device == "cpu" and not env.interpret():
            # No GPU: kernels run in Triton's interpreter, which must be on before triton loads.
            env.use_interpreter()
        if args.seqlen is None:
            args.seqlen = 4096 if device == "cuda" else 100
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # The reader went away (`nsa-gen db show | head`): not an error. Point stdout at
        # /dev/null so that the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except SpecError as e:
        print(f"nsa-gen: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
        print(f"nsa-gen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
