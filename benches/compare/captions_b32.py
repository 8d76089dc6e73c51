#!/usr/bin/env python3
"""Caption parity of coca-edge with open_clip 3.3.0 on a real CoCa geometry (random init).

For each photo: `coca caption --json` (default beam search: 6 beams, 3 groups) against
open_clip's `generate()` with its defaults, and `coca caption --sampling greedy` against both
open_clip's greedy `generate(generation_type="top_k", top_k=1)` and a full-recompute greedy loop
written from open_clip's forward (the whole sequence re-run at every step, no cache).
Prints a table of agreement; exits 1 on any difference.

  cargo build --release
  models/.venv/bin/python benches/compare/captions_b32.py [--model coca_ViT-B-32] [--max-tokens 30]
"""
import argparse
import json
import os
import subprocess
import sys

import torch
from PIL import Image

import common


def full_recompute_greedy(model, x, seq_len, min_seq_len, sot=49406, eot=49407, pad=0):
    lat, embs = model._encode_image(x)
    out = [sot]
    while True:
        logits = model(x, torch.tensor([out]), image_latent=lat, image_embs=embs, output_labels=False)["logits"][0, -1]
        if len(out) < min_seq_len:
            logits[eot] = float("-inf")
        nxt = eot if len(out) + 1 == seq_len else int(torch.argmax(logits))
        out.append(nxt)
        if nxt in (eot, pad) or len(out) >= seq_len:
            return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="coca_ViT-B-32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--max-tokens", type=int, default=30)
    ap.add_argument("--photos", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    bundle = args.bundle or os.path.join(common.ROOT, "build", f"{args.model}-random{args.seed}")
    manifest = common.ensure_bundle(args.model, args.seed, bundle)
    torch.set_grad_enabled(False)
    model, name = common.torch_model(manifest)
    pre = common.preprocess_for(model)
    coca = common.coca_binary()
    photos = common.photos()[: args.photos]

    def ours(extra):
        out = subprocess.run([coca, "--model", bundle, "--threads", str(args.threads), "caption", "--json",
                              "--max-tokens", str(args.max_tokens), *extra, *photos], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"coca caption failed: {out.stderr}")
        return {os.path.basename(json.loads(l)["image"]): json.loads(l)["ids"] for l in out.stdout.splitlines()}

    beam, greedy = ours([]), ours(["--sampling", "greedy"])
    ok = True
    n_beam = n_greedy = 0
    print(f"## {name}: coca caption vs open_clip {open_clip_version()} generate() (seq_len {args.max_tokens})\n")
    print("| image | beam ids identical | greedy = generate(top_k=1) | greedy = full-recompute loop | length (beam / greedy) |")
    print("|---|---|---|---|---|")
    for p in photos:
        f = os.path.basename(p)
        with Image.open(p) as im:
            x = pre(im).unsqueeze(0)
        ref_beam = model.generate(x, seq_len=args.max_tokens)[0].tolist()
        ref_greedy = model.generate(x, generation_type="top_k", top_k=1, seq_len=args.max_tokens)[0].tolist()
        ref_loop = full_recompute_greedy(model, x, args.max_tokens, 5)
        b, g1, g2 = beam[f] == ref_beam, greedy[f] == ref_greedy, greedy[f] == ref_loop
        ok &= b and g1 and g2
        n_beam += b
        n_greedy += g1 and g2
        print(f"| {f} | {'yes' if b else 'NO'} | {'yes' if g1 else 'NO'} | {'yes' if g2 else 'NO'} | {len(ref_beam)} / {len(ref_greedy)} |")
        if not (b and g1 and g2):
            print(f"<!-- {f}: ours beam {beam[f]} ref {ref_beam}; ours greedy {greedy[f]} ref {ref_greedy} loop {ref_loop} -->")
    print(f"\n{len(photos)} photos: beam search identical on {n_beam}/{len(photos)}, greedy identical (both references) on {n_greedy}/{len(photos)}")
    sys.exit(0 if ok else 1)


def open_clip_version():
    import open_clip
    return open_clip.__version__


if __name__ == "__main__":
    main()
