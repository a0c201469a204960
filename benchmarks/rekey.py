"""Re-key shipped DB entries of one kernel after a template change that leaves the generated
code of the old configs byte-identical (e.g. a new structural variant in its own branch).

Checks the claim before it writes: every entry's config, with the new params at the given
values, must render to exactly the code the old template (a file given on the command line)
rendered for the old config. Then the entries get the new source hash and the new params.

Usage: python benchmarks/rekey.py STEM OLD_TEMPLATE PARAM=VALUE... [--db tuning_db]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jinja2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_gen import codegen  # noqa: E402
from nsa_gen.config import Config  # noqa: E402
from nsa_gen.db.store import kernel_source_hash  # noqa: E402
from nsa_gen.kernels import kernel_def  # noqa: E402
from nsa_gen.spec import load_spec  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("stem")
    ap.add_argument("old_template", help="the template file the entries were tuned with")
    ap.add_argument("params", nargs="*", help="NAME=INT for each param the new space adds")
    ap.add_argument("--db", default="tuning_db")
    args = ap.parse_args()
    kd = kernel_def(args.stem)
    added = {k: int(v) for k, v in (p.split("=", 1) for p in args.params)}
    old = Path(args.old_template)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(old.parent)),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True, autoescape=False)
    new_hash = kernel_source_hash(args.stem)
    for path in sorted(Path(args.db).glob(f"*/{args.stem}.json")):
        doc = json.loads(path.read_text())
        n = 0
        for e in doc["entries"]:
            if e["source_hash"] == new_hash:
                continue
            spec = load_spec(e["spec_name"])
            old_cfg = Config.from_dict(e["config"])
            new_cfg = Config.from_dict(dict(e["config"], **added))
            ctx = kd.context(spec, new_cfg)
            want = env.get_template(old.name).render(**ctx)
            got = codegen.environment().get_template(kd.template).render(**ctx)
            if want != got or not kd.valid(spec, new_cfg):
                print(f"{path}: {e['spec_name']} T={e['shape']['T']} {old_cfg}: code differs, left as is")
                continue
            e["source_hash"], e["config"] = new_hash, new_cfg.as_dict()
            n += 1
        codegen.atomic_write(path, json.dumps(doc, indent=2) + "\n")
        print(f"{path}: {n} entries re-keyed to {new_hash}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
