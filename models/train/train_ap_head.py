#!/usr/bin/env python3
"""Attentional-pooler heads: the CoCa paper's frozen-feature protocol on a coca-edge bundle.

A fresh attentional pooler (one query, open_clip's AttentionalPooler) + LayerNorm + linear layer
is trained in PyTorch on the image encoder's frozen tokens (the ViT's output before CoCa's own
pooler: a bundle exported with `export.py --frozen-tokens`), then exported as a small ONNX graph
that coca runs after the encoder (`coca classify --head HEAD.json`, `coca stream --head`).
The tokens come from the bundle's own image_encoder.onnx through onnxruntime, with open_clip's
preprocessing, so the head sees what the runtime gives it.

    models/.venv/bin/python models/train/train_ap_head.py --bundle models/coca-scenes \
        --data tests/fixtures/heads/novel/train --shots 10 --out tests/fixtures/heads/novel/ap_head.json \
        --test tests/fixtures/heads/novel/test.tsv --golden tests/fixtures/heads/novel/ap_golden.json

Writes HEAD.json (kind "attentional_pooler", with the bundle id, classes and the graph's sha256)
and HEAD.onnx beside it; --golden writes PyTorch's logits for the first test images.
"""
import argparse
import hashlib
import json
import os
import sys

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

from open_clip.transform import PreprocessCfg, image_transform_v2
from open_clip.transformer import AttentionalPooler


def pooler_forward(self, x):
    # open_clip's AttentionalPooler.forward with the query tied to the input (as export.py does
    # for the encoder's pooler), so the graph has no constant broadcast tract must resolve
    x = self.ln_k(x)
    q = self.ln_q(self.query).unsqueeze(0) + x[:, :1, :1] * 0.0
    return self.attn(q, x, x, need_weights=False)[0]


AttentionalPooler.forward = pooler_forward


class APHead(torch.nn.Module):
    def __init__(self, width, classes, heads):
        super().__init__()
        self.pool = AttentionalPooler(width, width, n_head=heads, n_queries=1)
        self.ln = torch.nn.LayerNorm(width)
        self.fc = torch.nn.Linear(width, classes)

    def forward(self, frozen_tokens):
        return self.fc(self.ln(self.pool(frozen_tokens)[:, 0]))


def bundle_id(manifest):
    """The runtime's bundle id (src/bundle.rs): every file but the int8/f16 variants of graphs
    that also ship in f32, so adding variants to a bundle keeps its heads valid."""
    graphs = manifest["graphs"].values()
    f32_files = {g["precisions"]["f32"] for g in graphs if "f32" in g["precisions"]}
    variants = {f for g in graphs if "f32" in g["precisions"]
                for p, f in g["precisions"].items() if p != "f32" and f not in f32_files}
    h = hashlib.sha256()
    for name in sorted(n for n in manifest["files"] if n not in variants):
        h.update(name.encode() + b"\0" + manifest["files"][name]["sha256"].lower().encode() + b"\0")
    return h.hexdigest()[:32]


def scan(data, shots):
    if os.path.isdir(data):
        classes = sorted(d for d in os.listdir(data) if os.path.isdir(os.path.join(data, d)) and not d.startswith("."))
        items = []
        for k, c in enumerate(classes):
            files = sorted(f for f in os.listdir(os.path.join(data, c)) if f.lower().endswith((".jpg", ".jpeg", ".png")))
            items += [(os.path.join(data, c, f), k) for f in files[:shots]]
        return classes, items
    lines = [l.rstrip("\n").split("\t") for l in open(data) if l.strip()]
    classes = sorted({c for c, _ in lines})
    base = os.path.dirname(data)
    return classes, [(os.path.normpath(os.path.join(base, p)), classes.index(c)) for c, p in lines]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--data", required=True, help="class folders")
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--out", required=True, help="HEAD.json (HEAD.onnx is written beside it)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test", help="CLASS<TAB>PATH list: report accuracy")
    ap.add_argument("--golden", help="write PyTorch logits for the first 6 test images here")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    manifest = json.load(open(os.path.join(args.bundle, "coca.json")))
    if not manifest["dims"].get("frozen_tokens"):
        raise SystemExit(f"{args.bundle}: no frozen tokens: export it with export.py --frozen-tokens")
    n_tok, width = manifest["dims"]["frozen_tokens"]
    im = manifest["image"]
    pre = image_transform_v2(PreprocessCfg(size=im["size"], mean=tuple(im["mean"]), std=tuple(im["std"]),
                                           interpolation=im["interpolation"], resize_mode=im["resize_mode"]), is_train=False)
    sess = ort.InferenceSession(os.path.join(args.bundle, manifest["graphs"]["image_encoder"]["precisions"]["f32"]))
    names = [o.name for o in sess.get_outputs()]

    def tokens(path):
        x = pre(Image.open(path)).unsqueeze(0).numpy()
        return sess.run(None, {"image": x})[names.index("frozen_tokens")][0]

    classes, items = scan(args.data, args.shots)
    x = torch.tensor(np.stack([tokens(p) for p, _ in items]))
    y = torch.tensor([k for _, k in items])
    head = APHead(width, len(classes), args.heads)
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    for step in range(args.steps):
        loss = torch.nn.functional.cross_entropy(head(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    head.eval()
    print(f"trained on {len(items)} images, {len(classes)} classes, final loss {loss.item():.4f}", file=sys.stderr)

    onnx_path = os.path.splitext(args.out)[0] + ".onnx"
    with torch.no_grad():
        torch.onnx.export(head, (torch.zeros(1, n_tok, width),), onnx_path, input_names=["frozen_tokens"],
                          output_names=["logits"], opset_version=17, dynamo=False)
    sha = hashlib.sha256(open(onnx_path, "rb").read()).hexdigest()
    counts = [int((y == k).sum()) for k in range(len(classes))]
    doc = {"format": "coca-edge-head", "version": 1, "kind": "attentional_pooler", "bundle_id": bundle_id(manifest),
           "bundle_name": manifest["name"], "classes": classes, "dim": width, "weights": [], "bias": [], "scale": 1.0,
           "l2": None, "cv_accuracy": None, "images_per_class": counts, "graph": os.path.basename(onnx_path),
           "graph_sha256": sha, "tokens": n_tok}
    with open(args.out, "w") as f:
        json.dump(doc, f)
        f.write("\n")
    print(f"wrote {args.out} and {onnx_path}", file=sys.stderr)

    if args.test:
        _, test = scan(args.test, 10**9)
        tclasses = sorted({c for c, _ in (l.rstrip("\n").split("\t") for l in open(args.test) if l.strip())})
        tx = torch.tensor(np.stack([tokens(p) for p, _ in test]))
        with torch.no_grad():
            logits = head(tx)
        pred = logits.argmax(-1).tolist()
        acc = sum(classes[p] == tclasses[k] for p, (_, k) in zip(pred, test)) / len(test)
        print(json.dumps({"test_accuracy": acc, "test_images": len(test)}))
        if args.golden:
            root = os.path.dirname(os.path.abspath(args.golden))
            g = {"head": os.path.relpath(os.path.abspath(args.out), root),
                 "images": [os.path.relpath(os.path.abspath(p), root) for p, _ in test[:6]],
                 "logits": logits[:6].tolist(), "tolerance": 1e-4,
                 "note": "PyTorch head logits on frozen tokens from onnxruntime (train_ap_head.py)"}
            with open(args.golden, "w") as f:
                json.dump(g, f, indent=1)
                f.write("\n")


if __name__ == "__main__":
    main()
