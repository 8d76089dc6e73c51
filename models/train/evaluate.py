#!/usr/bin/env python3
"""The reference side of the default model's evaluation: the trained checkpoint in PyTorch /
open_clip on the committed held-out set (tests/fixtures/scenes), with the metrics that
tests/default_model.rs computes through our runtime. The two tables should agree.

    models/.venv/bin/python models/train/evaluate.py --train-dir build/coca-scenes-train
"""

import argparse
import json
import os
import sys
from collections import defaultdict

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import open_clip  # noqa: E402
from train import CONFIG_NAME, CompactVocab, to_tensor  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-dir", required=True, help="train.py's --out")
    ap.add_argument("--heldout", default=os.path.join(HERE, "..", "..", "tests", "fixtures", "scenes"))
    ap.add_argument("--json", help="also write the metrics here")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    open_clip.add_model_config(os.path.join(args.train_dir, f"{CONFIG_NAME}.json"))
    model = open_clip.create_model(CONFIG_NAME, pretrained=os.path.join(args.train_dir, "checkpoint.pt"), device="cpu").eval()
    vocab = CompactVocab(open_clip.tokenizer.SimpleTokenizer())
    ctx = model.text.context_length
    truth = json.load(open(os.path.join(args.heldout, "truth.json")))
    items = truth["items"]
    imgs = np.stack([np.asarray(Image.open(os.path.join(args.heldout, it["file"])).convert("RGB")) for it in items])
    x = to_tensor(imgs)
    img_emb = model.encode_image(x)
    tally = defaultdict(lambda: [0, 0])
    for attr, spec in truth["zero_shot"].items():
        embs = []
        for label in spec["labels"]:
            e = model.encode_text(vocab.tokenize([t.replace("{}", label, 1) for t in spec["templates"]], ctx)).mean(0)
            embs.append(e / e.norm())
        pred = (img_emb @ torch.stack(embs).T).argmax(1).tolist()
        for it, k in zip(items, pred):
            r = tally[(it["split"], f"zero-shot {attr}")]
            r[0] += str(spec["values"][k]) == str(it[attr])
            r[1] += 1
    for i in range(0, len(items), 50):
        gen = model.generate(x[i:i + 50], generation_type="top_k", top_k=1, seq_len=30,
                             sot_token_id=vocab.sot, eos_token_id=vocab.eot, pad_token_id=0)
        for it, row in zip(items[i:i + 50], gen.tolist()):
            text = vocab.decode(row)
            r = tally[(it["split"], "caption exact")]
            r[0] += text in it["valid_captions"]
            r[1] += 1
            got = text.split()
            for k, w in enumerate(it["valid_captions"][0].split()):
                r = tally[(it["split"], "caption word")]
                r[0] += k < len(got) and got[k] == w
                r[1] += 1
    metrics = sorted({m for _, m in tally})
    print("held-out scenes through PyTorch (open_clip, greedy captions):")
    print(f"{'metric':<22} {'test':>8} {'novel':>8}")
    out = {}
    for m in metrics:
        row = []
        for split in ("test", "novel"):
            ok, n = tally[(split, m)]
            out[f"{split}/{m}"] = ok / n
            row.append(f"{100 * ok / n:.1f}%")
        print(f"{m:<22} {row[0]:>8} {row[1]:>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
