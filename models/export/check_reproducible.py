#!/usr/bin/env python3
"""Re-run the exporter command recorded in a bundle's manifest into a temporary folder and check
that every file comes out identical (sha256) to the bundle's.

  models/.venv/bin/python models/export/check_reproducible.py models/coca-tiny-random
"""
import json
import os
import shlex
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    bundle = sys.argv[1]
    with open(os.path.join(bundle, "coca.json")) as f:
        manifest = json.load(f)
    argv = shlex.split(manifest["source"]["command"])
    assert argv[0].endswith("export.py"), argv
    out_ix = argv.index("--out") + 1
    with tempfile.TemporaryDirectory() as td:
        argv[out_ix] = td
        if "--force" not in argv:
            argv.append("--force")
        cmd = [sys.executable, os.path.join(ROOT, argv[0])] + argv[1:]
        print("+", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True, cwd=ROOT)
        with open(os.path.join(td, "coca.json")) as f:
            again = json.load(f)
    bad = []
    for name, spec in manifest["files"].items():
        other = again["files"].get(name)
        same = other is not None and other["sha256"] == spec["sha256"]
        print(f"{'same' if same else 'DIFFERENT'}  {name}  {spec['sha256'][:16]}")
        if not same:
            bad.append(name)
    if bad:
        raise SystemExit(f"not reproduced: {', '.join(bad)}")
    print(f"{bundle}: every file reproduced byte for byte")


if __name__ == "__main__":
    main()
