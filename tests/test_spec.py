"""Spec loading and validation: every rule gives a one-line error naming the field."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nsa_gen.spec import SpecError, builtin_specs, load_spec, parse_spec

ROOT = Path(__file__).resolve().parent.parent


def base():
    return load_spec("deepseek-nsa").to_dict()


def test_builtins():
    assert set(builtin_specs()) >= {"deepseek-nsa", "fla-compat", "small-group", "mqa"}
    ds = load_spec("deepseek-nsa")
    assert (ds.HQ, ds.H, ds.G, ds.DK, ds.DV, ds.l, ds.d, ds.BS, ds.S, ds.w) == \
        (64, 4, 16, 192, 128, 32, 16, 64, 16, 512)
    assert (ds.initial_blocks, ds.local_blocks, ds.phi) == (1, 2, "mean")
    assert ds.softmax_scale == pytest.approx(192 ** -0.5)
    fla = load_spec("fla-compat")
    assert (fla.l, fla.d, fla.BS, fla.w, fla.has("swa")) == (64, 64, 64, 0, False)
    assert load_spec("small-group").G == 4 and load_spec("mqa").G == 1


def test_roundtrip_and_hash():
    s = load_spec("small-group")
    assert parse_spec(s.to_dict()) == s
    assert s.replace(name="other").spec_hash == s.spec_hash  # the name is not kernel-relevant
    assert s.replace(window=256).spec_hash != s.spec_hash
    with pytest.raises(Exception):
        s.heads_q = 3  # frozen


def _set(d, path, value):
    keys = path.split(".")
    for k in keys[:-1]:
        d = d[k]
    if value is _DEL:
        del d[keys[-1]]
    else:
        d[keys[-1]] = value


_DEL = object()

# (field path, value, expected path in the error, words of the rule)
BAD = [
    ("colour", "red", "colour", "unknown key"),
    ("compression.shape", 3, "compression.shape", "unknown key"),
    ("heads.q", "64", "heads.q", "must be an integer"),
    ("heads.q", True, "heads.q", "must be an integer"),
    ("heads.kv", 0, "heads.kv", "must be in [1"),
    ("heads.q", 65, "heads.q", "divisible by heads.kv"),
    ("heads", {"q": 128, "kv": 1}, "heads.q", "group size"),
    ("head_dim.k", 512, "head_dim.k", "must be in [16, 256]"),
    ("head_dim.v", 100, "head_dim.v", "multiple of 16"),
    ("compression.stride", 24, "compression.stride", "must divide compression.block"),
    ("compression.block", -32, "compression.block", "must be in [1"),
    ("compression.block", 128, "compression.block", "<= selection.block"),
    ("selection.block", 48, "selection.block", "power of two"),
    ("compression", {"block": 2, "stride": 2}, "selection.block", "must be <= 16"),
    ("selection.top_n", 2, "selection.top_n", ">= initial_blocks + local_blocks"),
    ("selection.initial_blocks", -1, "selection.initial_blocks", "must be in [0"),
    ("compression.phi", "max", "compression.phi", "must be one of mean, mlp"),
    ("dtype", "float64", "dtype", "must be one of"),
    ("window", 1.5, "window", "must be an integer"),
    ("scale", "0.1", "scale", "must be a number"),
    ("scale", -1.0, "scale", "finite number > 0"),
    ("scale", float("nan"), "scale", "finite number > 0"),
    ("branches", ["cmp", "dense"], "branches[1]", "must be one of cmp, slc, swa"),
    ("branches", [], "branches", "non-empty"),
    ("name", "x; import os", "name", "must match"),
    ("heads", _DEL, "heads", "is required"),
    ("selection.top_n", _DEL, "selection.top_n", "is required"),
    ("heads", [64, 4], "heads", "must be a mapping"),
]


@pytest.mark.parametrize("path,value,where,rule", BAD)
def test_bad_fields(path, value, where, rule):
    d = base()
    _set(d, path, value)
    with pytest.raises(SpecError) as e:
        parse_spec(d)
    assert e.value.path == where
    assert rule in e.value.rule
    msg = str(e.value)
    assert "\n" not in msg and where in msg


def test_window_zero_with_swa():
    d = base()
    d["window"] = 0
    with pytest.raises(SpecError, match="window"):
        parse_spec(d)
    d.pop("branches")
    assert parse_spec(d).branches == ("cmp", "slc")


def test_bad_files(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML at line"):
        load_spec(p)
    p.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(p)
    with pytest.raises(SpecError, match="no such spec"):
        load_spec(tmp_path / "missing.yaml")
    # safe_load: no Python objects from YAML tags
    p.write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(SpecError):
        load_spec(p)


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize("path,value,where,rule", BAD[:14])
def test_cli_bad_spec_exit_2(tmp_path, path, value, where, rule):
    d = base()
    _set(d, path, value)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(d))
    r = _cli("show", str(p))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and where in lines[0], r.stderr


def test_cli_show_and_specs():
    r = _cli("specs")
    assert r.returncode == 0 and "deepseek-nsa" in r.stdout and "small-group" in r.stdout
    r = _cli("show", "mqa")
    assert r.returncode == 0 and "G=1" in r.stdout
