#!/usr/bin/env python3
"""Accuracy vs shots of heads trained on the shipped default model (docs/heads.md), through the
`coca` CLI only: for each task of tests/fixtures/heads (models/train/make_head_data.py), and
1, 2, 5, 10, 20 images per class, a prototype head and a linear probe are trained
(`coca head train --shots N`) and scored on the task's held-out list; zero-shot labels (the class
names through the model's template) are the baseline, and "probe x zero-shot" multiplies the
probe's and zero-shot probabilities (weight 1, fixed in advance, not tuned on the test set).

  cargo build --release
  python3 benches/compare/heads_table.py [--md]      # no Python packages needed
"""
import argparse
import datetime
import json
import math
import os
import subprocess
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
COCA = os.path.join(ROOT, "target", "release", "coca")
MODEL = os.path.join(ROOT, "models", "coca-scenes")


def coca(*args):
    out = subprocess.run([COCA, "--model", MODEL, "-q", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"coca {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def probs(lines, key, classes):
    res = []
    for l in lines.splitlines():
        d = {s["label"]: s["probability"] for s in json.loads(l)[key]}
        res.append([d.get(c, 0.0) for c in classes])
    return res


def acc(p, truth):
    return 100.0 * sum(max(range(len(r)), key=r.__getitem__) == t for r, t in zip(p, truth)) / len(truth)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--md", action="store_true")
    args = ap.parse_args()
    rows = []
    tmp = tempfile.mkdtemp()
    for task in ("novel", "shape"):
        base = os.path.join(ROOT, "tests", "fixtures", "heads", task)
        items = [l.rstrip("\n").split("\t") for l in open(os.path.join(base, "test.tsv"))]
        classes = sorted(os.listdir(os.path.join(base, "train")))
        files = [os.path.normpath(os.path.join(base, p)) for _, p in items]
        truth = [classes.index(c) for c, _ in items]
        zs = probs(coca("classify", "--labels", ",".join(classes), "--top-k", str(len(classes)), "--json", *files), "top", classes)
        for shots in (1, 2, 5, 10, 20):
            cells = {}
            for kind in ("prototype", "linear"):
                if kind == "linear" and shots < 2:
                    continue
                head = os.path.join(tmp, f"{task}-{kind}-{shots}.json")
                rep = json.loads(coca("head", "train", "--data", os.path.join(base, "train"), "--out", head, "--shots", str(shots), "--kind", kind, "--json"))
                hp = probs(coca("classify", "--head", head, "--top-k", str(len(classes)), "--json", *files), "head", classes)
                cells[kind] = acc(hp, truth)
                if kind == "linear":
                    cells["blend"] = acc([[math.log(max(a, 1e-12)) + math.log(max(b, 1e-12)) for a, b in zip(h, z)] for h, z in zip(hp, zs)], truth)
                    cells["train_s"] = rep["train_seconds"]
            rows.append((task, shots, cells, acc(zs, truth), len(files)))
    if args.md:
        print(f"Command: `python3 benches/compare/heads_table.py --md` ({datetime.date.today().isoformat()}, model coca-scenes)\n")
        print("| task (test images) | shots per class | prototype | linear probe | probe x zero-shot | zero-shot | probe training s |")
        print("|---|---|---|---|---|---|---|")
    names = {"novel": "new objects: unseen (color, shape) pairs, by shape", "shape": "shape, seen pairs"}
    for task, shots, c, z, n in rows:
        f = lambda k: f"{c[k]:.1f}%" if k in c else "-"
        print(f"| {names[task]} ({n}) | {shots} | {f('prototype')} | {f('linear')} | {f('blend')} | {z:.1f}% | {c.get('train_s', float('nan')):.2f} |")


if __name__ == "__main__":
    main()
