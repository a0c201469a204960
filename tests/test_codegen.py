"""Codegen: strict templates, checked context, generated-file header, content-hash cache."""
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest

from nsa_gen import codegen
from nsa_gen.kernels import KERNELS, kernel_module, kernel_source
from nsa_gen.spec import SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parent.parent
HOSTILE = ['"; import os; os.system("echo pwned") #', "{{ 7*7 }}", "\n\nimport os\n", "__import__('os')"]


def test_header_and_every_kernel_renders():
    spec = load_spec("deepseek-nsa")
    for stem, kd in KERNELS.items():
        src = kernel_source(stem, spec)
        first, second = src.splitlines()[:2]
        # a tuning key of another kernel (selection_fwd_gated) renders that kernel's template
        own = kd.renders or stem
        assert f"templates/{own}.py.j2" in first and "do not edit" in first
        assert spec.spec_hash in second and "triton" in second
        assert f"def nsa_{own}_kernel(" in src and kd.kernel_name == f"nsa_{own}_kernel"
        compile(src, stem, "exec")  # valid Python


@pytest.mark.parametrize("bad", HOSTILE)
def test_hostile_strings_never_reach_code(bad):
    d = load_spec("small-group").to_dict()
    for field in ("name", "dtype"):
        dd = dict(d, **{field: bad})
        with pytest.raises(SpecError):
            parse_spec(dd)
    dd = dict(d, compression=dict(d["compression"], phi=bad))
    with pytest.raises(SpecError):
        parse_spec(dd)
    dd = dict(d, heads={"q": bad, "kv": 4})
    with pytest.raises(SpecError):
        parse_spec(dd)
    # Even if a caller bypasses the spec, render refuses free text in the context.
    with pytest.raises(ValueError, match="not allowed in generated code"):
        codegen.render("selection_fwd.py.j2", {"G": bad}, "0" * 16)


def test_name_is_not_in_generated_code():
    spec = load_spec("small-group").replace(name="zz-unique-name-42")
    for stem in KERNELS:
        assert "zz-unique-name-42" not in kernel_source(stem, spec)


def test_strict_undefined():
    with pytest.raises(jinja2.UndefinedError):
        codegen.render("selection_fwd.py.j2", {"G": 1}, "0" * 16)


def test_module_cached_by_content_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_GEN_CACHE_DIR", str(tmp_path))
    spec = load_spec("mqa")
    kd = KERNELS["selection_fwd"]
    cfg = kd.default(spec, 1024)
    mod = kernel_module("selection_fwd", spec, cfg)
    files = list(tmp_path.glob("selection_fwd_*.py"))
    assert len(files) == 1 and Path(mod.__file__) == files[0]
    assert files[0].read_text() == kernel_source("selection_fwd", spec, cfg)
    assert kernel_module("selection_fwd", spec, cfg) is mod
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"


def _render_in_process(cache):
    os.environ["NSA_GEN_CACHE_DIR"] = cache
    from nsa_gen.kernels import kernel_module as km
    spec = load_spec("deepseek-nsa")
    m = km("topn", spec, KERNELS["topn"].default(spec, 4096))
    return Path(m.__file__).read_text()


def test_concurrent_renders(tmp_path):
    """Several processes render and import the same kernel at once: one whole file results."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        texts = pool.map(_render_in_process, [str(tmp_path)] * 8)
    assert len(set(texts)) == 1
    assert len(list(tmp_path.glob("topn_*.py"))) == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_atomic_write_gives_the_usual_mode(tmp_path):
    old = os.umask(0o022)
    try:
        codegen.atomic_write(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~codegen._UMASK


def test_atomic_write_failure_leaves_old_file(tmp_path):
    p = tmp_path / "f.txt"
    codegen.atomic_write(p, "old")

    with pytest.raises(TypeError):
        codegen.atomic_write(p, 123)  # write() fails midway
    assert p.read_text() == "old"
    assert not list(tmp_path.glob(".*.tmp"))


def test_generate_cli(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "generate", "small-group", "-o",
                        str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in tmp_path.glob("*.py"))
    assert "selection_fwd.py" in names and "topn.py" in names
    for p in tmp_path.glob("*.py"):
        compile(p.read_text(), str(p), "exec")


@pytest.mark.parametrize("stem", list(KERNELS))
def test_default_config_valid(stem):
    """Every kernel's heuristic default is in its config space for every built-in spec and
    any T."""
    kd = KERNELS[stem]
    for name in ("deepseek-nsa", "mqa", "small-group", "fla-compat"):
        spec = load_spec(name)
        for T in (1, 7, 100, 4096, 65536):
            assert kd.valid(spec, kd.default(spec, T)), (name, T)


def test_template_sources_follow_imports(tmp_path, monkeypatch):
    """What a kernel's DB source hash covers: its template and, once each, every template
    it imports, so that editing shared template code makes the old entries stale."""
    (tmp_path / "a.py.j2").write_text('{% import "m.j2" as m with context %}{{ m.x() }}\n')
    (tmp_path / "m.j2").write_text('{% include "n.j2" %}{% macro x() %}1{% endmacro %}')
    (tmp_path / "n.j2").write_text('{% import "m.j2" as again %}')  # a cycle is read once
    monkeypatch.setattr(codegen, "template_dir", lambda: tmp_path)
    monkeypatch.setattr(codegen, "_ENV", None)
    got = codegen.template_sources("a.py.j2")
    assert got == [(tmp_path / n).read_bytes() for n in ("a.py.j2", "m.j2", "n.j2")]


def test_shared_backward_macros_are_hashed():
    from nsa_gen.db.store import kernel_source_hash
    shared = (codegen.template_dir() / "bwd_common.j2").read_bytes()
    for stem in ("compression_bwd", "window_bwd"):
        assert codegen.template_sources(f"{stem}.py.j2")[1:] == [shared]
    # A template that imports nothing hashes as before shared templates existed.
    import hashlib
    text = (codegen.template_dir() / "topn.py.j2").read_bytes()
    assert kernel_source_hash("topn") == hashlib.sha256(text).hexdigest()[:16]
