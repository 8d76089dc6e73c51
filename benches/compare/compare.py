#!/usr/bin/env python3
"""Side-by-side speed of the image path (ViT + attentional pooler, batch 1, f32): coca-edge
(tract) vs onnxruntime vs PyTorch, on the same weights, the same preprocessed input and the same
thread counts, in one run. Medians of --runs timed runs after --warmup runs; each runtime runs
alone (one after the other), never concurrently.

  cargo build --release
  models/.venv/bin/python benches/compare/compare.py [--model coca_ViT-B-32] [--threads 1,2] [--md]

--md prints a Markdown table for BENCHMARKS.md (with command, date, machine).
"""
import argparse
import datetime
import json
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

import common


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="coca_ViT-B-32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--image", default=os.path.join(common.ROOT, "tests", "fixtures", "images", "china.jpg"))
    ap.add_argument("--md", action="store_true")
    args = ap.parse_args()
    bundle = args.bundle or os.path.join(common.ROOT, "build", f"{args.model}-random{args.seed}")
    manifest = common.ensure_bundle(args.model, args.seed, bundle)
    coca = common.coca_binary()
    torch.set_grad_enabled(False)
    model, name = common.torch_model(manifest)
    model.eval()
    pre = common.preprocess_for(model)
    with Image.open(args.image) as im:
        x = pre(im).unsqueeze(0)
    xn = x.numpy()

    import onnxruntime as ort
    import open_clip

    # the same weights everywhere: check before timing
    e_torch = model.encode_image(x, normalize=True)[0].numpy()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    e_ort = ort.InferenceSession(os.path.join(bundle, "image_encoder.onnx"), so,
                                 providers=["CPUExecutionProvider"]).run(None, {"image": xn})[0][0]
    assert np.abs(e_torch - e_ort).max() < 1e-4, "onnxruntime and PyTorch disagree"

    rows = []
    for t in [int(v) for v in args.threads.split(",")]:
        # PyTorch: the image tower as open_clip runs it (visual + normalize)
        torch.set_num_threads(t)
        ms_torch = common.median_ms(lambda: model.encode_image(x, normalize=True), args.runs, args.warmup)
        # onnxruntime on the exported graph
        so = ort.SessionOptions()
        so.intra_op_num_threads = t
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(os.path.join(bundle, "image_encoder.onnx"), so, providers=["CPUExecutionProvider"])
        ms_ort = common.median_ms(lambda: sess.run(None, {"image": xn}), args.runs, args.warmup)
        del sess
        # coca-edge: the encoder on its own preprocessed tensor (preprocessing timed apart)
        out = subprocess.run([coca, "--model", bundle, "--threads", str(t), "bench", args.image, "--json",
                              "--runs", str(args.runs), "--warmup", str(args.warmup)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout)
        # and coca-edge computes the same embedding (end to end: its own decode and preprocessing)
        emb = subprocess.run([coca, "--model", bundle, "--threads", str(t), "embed", args.image, "--json"],
                             capture_output=True, text=True, check=True)
        e_coca = np.array(json.loads(emb.stdout.splitlines()[0])["embedding"], dtype=np.float32)
        diff = float(np.abs(e_coca - e_torch).max())
        assert diff < 1e-4, f"coca-edge and PyTorch disagree at {t} thread(s): max |diff| {diff:.2e}"
        rows.append({"threads": t, "onnxruntime": ms_ort, "pytorch": ms_torch, "coca": r["encoder_ms_median"],
                     "coca_preprocess": r["preprocess_ms_median"], "coca_decode": r["decode_ms_median"],
                     "coca_load_s": r["load_s"], "coca_vs_torch": diff})
        print(f"threads {t}: onnxruntime {ms_ort:.1f} ms, PyTorch {ms_torch:.1f} ms, coca-edge {r['encoder_ms_median']:.1f} ms "
              f"(x{r['encoder_ms_median'] / ms_ort:.2f} of onnxruntime); coca preprocess {r['preprocess_ms_median']:.2f} ms, "
              f"decode {r['decode_ms_median']:.2f} ms, load {r['load_s']:.2f} s; "
              f"embedding max |coca - PyTorch| {diff:.1e}", file=sys.stderr, flush=True)

    if args.md:
        date = datetime.date.today().isoformat()
        print(f"### {name} image encoder, batch 1, f32 ({date})\n")
        print(f"Command: `models/.venv/bin/python benches/compare/compare.py --model {args.model} --threads {args.threads} "
              f"--runs {args.runs} --warmup {args.warmup} --md`  ")
        print(f"Machine: {common.machine()}. onnxruntime {ort.__version__}, torch {torch.__version__}, "
              f"open_clip {open_clip.__version__}, tract 0.23.9. Medians of {args.runs} runs after {args.warmup} warm-up; "
              f"same weights (random init, seed {args.seed}), same preprocessed input.\n")
        print("| threads | onnxruntime ms | PyTorch ms | coca-edge ms | coca / onnxruntime | coca preprocess ms | coca load s |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['threads']} | {r['onnxruntime']:.1f} | {r['pytorch']:.1f} | {r['coca']:.1f} | "
                  f"{r['coca'] / r['onnxruntime']:.2f} | {r['coca_preprocess']:.2f} | {r['coca_load_s']:.2f} |")


if __name__ == "__main__":
    main()
