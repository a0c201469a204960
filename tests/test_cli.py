"""CLI end to end as a user on a machine without a GPU runs it: in fresh processes, except where
a test watches which rows a command asks the verifier for."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _run(*args, tmp_path, extra_env=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user has it
    env["NSA_GEN_CACHE_DIR"] = str(tmp_path / "cache")
    env.update(extra_env or {})
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True,
                          text=True, timeout=900, env=env, cwd=tmp_path)


TINY = {"name": "tiny", "heads": {"q": 4, "kv": 2}, "head_dim": {"k": 32, "v": 16},
        "compression": {"block": 16, "stride": 8}, "selection": {"block": 16, "top_n": 3},
        "window": 16}


def test_verify_without_gpu_turns_on_the_interpreter(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    r = _run("verify", str(p), "-T", "40", "--dtype", "float32", tmp_path=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| tiny")]
    kernels = {line.split("|")[2].strip() for line in rows}
    assert {k.split()[0] for k in kernels} == {
        "compress_mean", "selection_fwd", "selection_fwd_gated", "topn", "selection_bwd", "compression_fwd",
        "window_fwd", "compression_bwd", "window_bwd", "gate_fwd", "decode_select",
        "decode_attend", "nsa", "nsa_varlen", "nsa_decode"}
    # Each structural variant of a kernel is a row of its own, unless it computes the same
    # as one already run (every split is longer than 40 tokens: one pass, as the default).
    assert {"topn MERGE=sort", "topn MERGE=rank", "selection_fwd BLOCK_Q=16"} <= kernels
    assert not any(k.startswith("compression_bwd DKV_SPLIT_T") for k in kernels)
    assert all("pass" in line for line in rows)


def test_verify_checks_the_config_the_db_dispatches_at_a_longer_seqlen(tmp_path):
    # A 64k entry is checked at a short T: its row names the entry's config, which differs
    # from every config verify runs by itself (BLOCK_T 8, BJ 32 are no variant of the default).
    from nsa_gen.db import CPU_DEVICE, Entry, TuneKey, TuningDB
    from nsa_gen.kernels import KERNELS
    from nsa_gen.spec import load_spec
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    spec = load_spec(str(p))
    entry = KERNELS["topn"].default(spec, 65536).replace(BLOCK_T=8, BJ=32, MERGE="rank", num_warps=2)
    TuningDB(tmp_path / "db").put(TuneKey.make(CPU_DEVICE, "topn", spec, 65536),
                                  Entry(entry, 1.0, 0.1, 10, "2026-01-01"))
    r = _run("verify", str(p), "-T", "40", "--dtype", "float32", "--kernels", "topn",
             "--db-seqlens", "64k", "--no-variants", tmp_path=tmp_path, extra_env={"NSA_GEN_DB": str(tmp_path / "db")})
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line.split("|") for line in r.stdout.splitlines() if line.startswith("| tiny")]
    db_rows = [row for row in rows if "db[T=65536]" in row[2]]
    assert len(db_rows) == 1 and f"db[T=65536] {entry}" in db_rows[0][2], r.stdout
    assert "pass" in db_rows[0][-2]
    assert [row[2].strip() for row in rows if row not in db_rows] == ["topn"]  # no variants
    r = _run("verify", str(p), "--db-seqlens", "64q", tmp_path=tmp_path)
    assert r.returncode == 2 and "not a sequence length" in r.stderr


def test_verify_jobs_runs_specs_in_processes_and_prints_them_in_order(tmp_path):
    paths = []
    for name, top_n in (("tiny", 3), ("tiny2", 4)):
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump({**TINY, "name": name,
                                             "selection": {"block": 16, "top_n": top_n}}))
    r = _run("verify", *map(str, paths), "-T", "40", "--dtype", "float32", "--kernels", "topn",
             "--no-variants", "--jobs", "2", tmp_path=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line.split("|") for line in r.stdout.splitlines() if line.startswith("| tiny")]
    assert [(row[1].strip(), row[2].strip()) for row in rows] == [("tiny", "topn"), ("tiny2", "topn")]
    assert all("pass" in row[-2] for row in rows)


def test_unknown_spec_exit_2(tmp_path):
    r = _run("verify", "no-such-spec", tmp_path=tmp_path)
    assert r.returncode == 2 and "no such spec" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("all_variants", [False, True])
def test_build_on_a_cpu_verifies_default_configs_unless_asked(tmp_path, monkeypatch, capsys, all_variants):
    # The verify itself is the other tests' job: here, which rows build asks it for.
    import nsa_gen.verify
    from nsa_gen.cli import main
    from nsa_gen.spec import builtin_specs
    calls = []
    monkeypatch.setattr(nsa_gen.verify, "verify_spec",
                        lambda spec, **kw: calls.append((spec.name, kw["variants"])) or [])
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    argv = ["build", "--out", str(tmp_path / "k"), "--jobs", "1"] + (["--all-variants"] if all_variants else [])
    assert main(argv) == 0
    assert calls == [(name, all_variants) for name in builtin_specs()]
    out = capsys.readouterr().out
    assert ("verifying each kernel's default config" in out) is not all_variants
    assert "tuning skipped" in out
    assert (tmp_path / "k" / "deepseek-nsa" / "topn.py").is_file()
