#!/usr/bin/env python3
"""Parity of coca-edge with open_clip on a real CoCa geometry (random init, no weights here).

Exports coca_ViT-B-32 (random init, seed 0) if needed, then compares on the real photos in
tests/fixtures/images:
  * `coca embed` vs open_clip's encode_image (PIL preprocessing), max abs diff <= 1e-4
  * `coca classify` top-5 vs open_clip's zero-shot code (build_zero_shot_classifier) with the
    same labels and templates.
Prints a table; exits 1 on any mismatch.

  models/.venv/bin/python benches/compare/parity_b32.py [--model coca_ViT-B-32] [--bundle DIR]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from PIL import Image

import common

LABELS = ["cat", "dog", "car", "tree", "person", "bird", "house", "boat", "flower", "mountain",
          "rocket", "coffee cup"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of a {}.", "a close-up photo of the {}.", "art of the {}."]
TOL = 1e-4


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="coca_ViT-B-32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    bundle = args.bundle or os.path.join(common.ROOT, "build", f"{args.model}-random{args.seed}")
    manifest = common.ensure_bundle(args.model, args.seed, bundle)
    torch.set_grad_enabled(False)
    model, name = common.torch_model(manifest)
    import open_clip
    tokenizer = open_clip.get_tokenizer(name)
    preprocess = common.preprocess_for(model)
    coca = common.coca_binary()

    photos = common.photos()
    env = dict(os.environ, COCA_CACHE_DIR=tempfile.mkdtemp())
    out = subprocess.run([coca, "--model", bundle, "--threads", str(args.threads), "embed", "--json", *photos],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"coca embed failed: {out.stderr}")
    ours = {os.path.basename(json.loads(l)["image"]): json.loads(l)["embedding"] for l in out.stdout.splitlines()}

    ok = True
    print(f"## {name}: coca embed vs open_clip encode_image (tolerance {TOL:g})")
    print("| image | mode | size | max abs diff | ok |")
    print("|---|---|---|---|---|")
    ref = {}
    for p in photos:
        f = os.path.basename(p)
        with Image.open(p) as im:
            mode, size = im.mode, im.size
            e = model.encode_image(preprocess(im).unsqueeze(0), normalize=True)[0]
        ref[f] = e
        d = float((torch.tensor(ours[f]) - e).abs().max())
        good = d <= TOL
        ok &= good
        print(f"| {f} | {mode} | {size[0]}x{size[1]} | {d:.2e} | {'yes' if good else 'NO'} |")

    clf = open_clip.build_zero_shot_classifier(model, tokenizer=tokenizer, classnames=LABELS,
                                               templates=TEMPLATES, num_classes_per_batch=4, device="cpu")
    with tempfile.TemporaryDirectory() as td:
        lf, tf = os.path.join(td, "labels.txt"), os.path.join(td, "templates.txt")
        open(lf, "w").write("\n".join(LABELS) + "\n")
        open(tf, "w").write("\n".join(TEMPLATES) + "\n")
        out = subprocess.run([coca, "--model", bundle, "--threads", str(args.threads), "classify", "--json",
                              "--top-k", "5", "--labels-file", lf, "--templates", tf, *photos],
                             capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"coca classify failed: {out.stderr}")
    ours_top = {os.path.basename(json.loads(l)["image"]): [t["label"] for t in json.loads(l)["top"]]
                for l in out.stdout.splitlines()}
    print()
    print(f"## {name}: coca classify top-5 vs open_clip zero-shot ({len(LABELS)} labels x {len(TEMPLATES)} templates)")
    print("| image | open_clip top-5 | coca top-5 | same |")
    print("|---|---|---|---|")
    n_same = 0
    for f, e in ref.items():
        top = torch.topk(e @ clf, 5).indices.tolist()
        theirs = [LABELS[i] for i in top]
        same = theirs == ours_top[f]
        n_same += same
        ok &= same
        print(f"| {f} | {', '.join(theirs)} | {', '.join(ours_top[f])} | {'yes' if same else 'NO'} |")
    print()
    print(f"{len(ref)} photos: embeddings {'all' if ok else 'NOT all'} within {TOL:g}; top-5 identical on {n_same}/{len(ref)}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
