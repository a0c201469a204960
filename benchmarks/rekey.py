"""Re-key shipped DB entries of one kernel after a template change that leaves the generated
code of the old configs byte-identical (e.g. a new structural variant in its own branch).

Checks the claim before it writes: every entry's config, with the new params at the given
values, must render to exactly the code the old template (a file given on the command line)
rendered for the old config. Then the entries get the new source hash and the new params.

With --from SRC (a DB written by a tuning run on the old template, e.g. a device call's),
the entries of SRC measured on the old template (its source hash) or on the current one are
checked the same way and copied into --db, replacing entries of the same key.

A param the space gains without a template change (compression_fwd's CUDNN, read by the
launcher) leaves the source hash as it is: the entries that lack it get it.

With --added-only, the new code may also hold whole top-level definitions the old one did not
(new kernels beside the tuned ones, e.g. session 38's block-list kernels in selection_fwd's
query-batched module): an entry re-keys when the old render's lines are all there, in order
and unchanged, and every inserted run of lines starts at column 0 and ends before a line at
column 0 (or the end), so nothing was inserted into an old function. The kernels the config
governs are then byte-identical; what the new ones cost was not in the entry's time.

Usage: python benchmarks/rekey.py STEM OLD_TEMPLATE PARAM=VALUE... [--db tuning_db] [--from SRC]
       [--added-only]
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import sys
from pathlib import Path

import jinja2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen import codegen  # noqa: E402
from nsa_gen.config import Config, parse_assignments  # noqa: E402
from nsa_gen.db.store import TuningDB, kernel_source_hash  # noqa: E402
from nsa_gen.kernels import kernel_def  # noqa: E402
from nsa_gen.spec import load_spec  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("stem")
    ap.add_argument("old_template", help="the template file the entries were tuned with")
    ap.add_argument("params", nargs="*", help="NAME=INT for each param the new space adds")
    ap.add_argument("--db", default="tuning_db")
    ap.add_argument("--from", dest="src", default=None, help="copy checked entries from this DB")
    ap.add_argument("--added-only", action="store_true",
                    help="accept new code that only adds top-level definitions to the old")
    args = ap.parse_args()
    kd = kernel_def(args.stem)
    added = parse_assignments(args.params)
    old = Path(args.old_template)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(old.parent)),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True, autoescape=False)
    new_hash = kernel_source_hash(args.stem)

    def same_code(spec, new_cfg) -> bool:
        ctx = kd.context(spec, new_cfg)
        want = env.get_template(old.name).render(**ctx)
        got = codegen.environment().get_template(kd.template).render(**ctx)
        same = want == got or (args.added_only and only_added(want, got))
        return same and kd.valid(spec, new_cfg)

    if args.src:
        return adopt(args.stem, Path(args.src), TuningDB(args.db), added, new_hash,
                     hashlib.sha256(old.read_bytes()).hexdigest()[:16], same_code)
    for path in sorted(Path(args.db).glob(f"*/{args.stem}.json")):
        doc = json.loads(path.read_text())
        n = 0
        for e in doc["entries"]:
            if e["source_hash"] == new_hash and set(added) <= set(e["config"]):
                continue  # a param new to the space, not to the template: add it to the entry
            spec = load_spec(e["spec_name"])
            old_cfg = Config.from_dict(e["config"])
            new_cfg = Config.from_dict({**added, **e["config"]})  # the entry's own values win
            if not same_code(spec, new_cfg):
                print(f"{path}: {e['spec_name']} T={e['shape']['T']} {old_cfg}: code differs, left as is")
                continue
            e["source_hash"], e["config"] = new_hash, new_cfg.as_dict()
            n += 1
        codegen.atomic_write(path, json.dumps(doc, indent=2) + "\n")
        print(f"{path}: {n} entries re-keyed to {new_hash}")
    return 0


def only_added(old: str, new: str) -> bool:
    """Whether `new` is `old` with whole top-level blocks of lines inserted, nothing else."""
    a, b = old.splitlines(), new.splitlines()
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        if tag != "insert":
            return False
        run = [line for line in b[j1:j2] if line.strip()]
        after = a[i1] if i1 < len(a) else ""
        if run and (run[0][0].isspace() or after[:1].isspace()):
            return False
    return True


def adopt(stem, src: Path, db: TuningDB, added: dict, new_hash: str, old_hash: str,
          same_code) -> int:
    """Copy SRC's entries of `stem` measured on the old template (old_hash, whose configs
    must render to the current code with `added`) or on the current one into `db`."""
    took = []
    for key, e in TuningDB(src).load(stem).items():
        if key.source_hash not in (old_hash, new_hash) or not key.spec_name:
            continue
        cfg = Config.from_dict({**added, **e.config.as_dict()})  # the entry's own values win
        if key.source_hash == new_hash and cfg == e.config:
            took.append((key, e))
        elif same_code(load_spec(key.spec_name), cfg):
            took.append((dataclasses.replace(key, source_hash=new_hash),
                         dataclasses.replace(e, config=cfg)))
        else:
            print(f"{key.describe()} {e.config}: code differs, not copied")
    db.put_many(took)
    for key, e in took:
        print(f"copied {key.describe()}: {e.config} {e.ms:.4g} ms")
    print(f"{len(took)} entries of {stem} copied from {src} into {db.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
