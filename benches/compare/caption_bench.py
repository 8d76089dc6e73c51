#!/usr/bin/env python3
"""Side-by-side caption speed on a real CoCa geometry (random init), one run, same threads:
coca-edge (KV-cached step graph in tract) vs open_clip generate() (full recompute every step)
vs onnxruntime running our exported cross_kv + decoder_step graphs.

* per-token decoder step latency at batch 1 and 6 (beams) by past length;
* whole captions of --caption-len tokens (SOT included; random weights never emit EOT, so
  every caption has exactly that length): greedy and 6-beam/3-group beam search.
Encoder time is excluded everywhere (the image features are computed once before timing).

  cargo build --release
  models/.venv/bin/python benches/compare/caption_bench.py [--threads 1] [--md]
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

import common


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="coca_ViT-B-32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--caption-len", type=int, default=21)
    ap.add_argument("--step-len", type=int, default=30, help="decoder steps in the step-latency table")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--ref-runs", type=int, default=3)
    ap.add_argument("--image", default=os.path.join(common.ROOT, "tests", "fixtures", "images", "china.jpg"))
    ap.add_argument("--int8-bundle", default=None,
                    help="also time coca-edge --precision int8 on this bundle (one with int8 cross_kv and decoder_step, e.g. "
                         "build/precision-variants/decoder-int8-w8 made by precision.py --decoder)")
    ap.add_argument("--md", action="store_true")
    args = ap.parse_args()
    bundle = args.bundle or os.path.join(common.ROOT, "build", f"{args.model}-random{args.seed}")
    manifest = common.ensure_bundle(args.model, args.seed, bundle)
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    model, name = common.torch_model(manifest)
    pre = common.preprocess_for(model)
    with Image.open(args.image) as im:
        x = pre(im).unsqueeze(0)
    L = args.caption_len
    steps = args.step_len

    # ---- coca-edge
    out = subprocess.run([common.coca_binary(), "--model", bundle, "--threads", str(args.threads), "bench", args.image,
                          "--json", "--caption", "--caption-len", str(L), "--step-len", str(steps), "--runs", str(args.runs), "--warmup", "1"],
                         capture_output=True, text=True, check=True)
    ours = json.loads(out.stdout)["caption"]
    ours8 = None
    if args.int8_bundle:
        out = subprocess.run([common.coca_binary(), "--model", args.int8_bundle, "--precision", "int8", "--threads", str(args.threads),
                              "bench", args.image, "--json", "--caption", "--caption-len", str(L), "--step-len", str(steps),
                              "--runs", str(args.runs), "--warmup", "1"], capture_output=True, text=True, check=True)
        ours8 = json.loads(out.stdout)["caption"]

    # ---- open_clip generate(), encoder excluded: image features computed once and passed in
    lat, embs = model._encode_image(x)
    orig = model._encode_image
    model._encode_image = lambda images, normalize=True: (lat.expand(images.shape[0], -1), embs.expand(images.shape[0], -1, -1))
    ref_greedy = common.median_ms(lambda: model.generate(x, generation_type="top_k", top_k=1, seq_len=L, min_seq_len=5), args.ref_runs)
    ref_beam = common.median_ms(lambda: model.generate(x, seq_len=L), args.ref_runs)
    model._encode_image = orig

    # ---- onnxruntime on our graphs
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    ck = ort.InferenceSession(os.path.join(bundle, "cross_kv.onnx"), so, providers=["CPUExecutionProvider"])
    st = ort.InferenceSession(os.path.join(bundle, "decoder_step.onnx"), so, providers=["CPUExecutionProvider"])
    d = manifest["decoder"]
    (cross,) = ck.run(None, {"tokens": embs.numpy()})

    def ort_steps(b, record=None, n=steps):
        kv = np.zeros((d["self_layers"], 2, b, d["heads"], 0, d["head_dim"]), np.float32)
        ids = np.full((b, 1), 49406, np.int64)
        for past in range(n):
            t = time.perf_counter()
            logits, kv = st.run(None, {"ids": ids, "key_mask": np.zeros((b, past + 1), np.float32), "self_kv": kv, "cross_kv": cross})
            if record is not None:
                record[past].append((time.perf_counter() - t) * 1e3)
            ids = logits.argmax(-1)[:, None].astype(np.int64)

    ort_step = {}
    for b in (1, 6):
        rec = [[] for _ in range(steps)]
        ort_steps(b)  # warm-up
        for _ in range(args.runs):
            ort_steps(b, rec)
        ort_step[b] = [statistics.median(r) for r in rec]
    ort_greedy = common.median_ms(lambda: (ck.run(None, {"tokens": embs.numpy()}), ort_steps(1, None, L - 1)), args.runs)

    ours_step = {1: ours["step_ms_by_past"]["batch1"], 6: ours["step_ms_by_past"]["batch6"]}
    g_ours, b_ours = ours["whole_caption"]["greedy"]["ms_median"], ours["whole_caption"]["beam"]["ms_median"]
    print(f"threads {args.threads}: greedy {L - 1} tokens: open_clip {ref_greedy:.0f} ms, onnxruntime {ort_greedy:.0f} ms, "
          f"coca {g_ours:.0f} ms (x{ref_greedy / g_ours:.1f} faster than open_clip); beam 6: open_clip {ref_beam:.0f} ms, "
          f"coca {b_ours:.0f} ms (x{ref_beam / b_ours:.1f})", file=sys.stderr)
    if args.md:
        import open_clip
        print(f"### {name} captions, {args.threads} thread(s) ({datetime.date.today().isoformat()})\n")
        print(f"Command: `models/.venv/bin/python benches/compare/caption_bench.py --model {args.model} --threads {args.threads} "
              f"--caption-len {L} --step-len {steps} --runs {args.runs} --ref-runs {args.ref_runs}"
              f"{' --int8-bundle ' + args.int8_bundle if args.int8_bundle else ''} --md`  ")
        print(f"Machine: {common.machine()}. open_clip {open_clip.__version__} (transformers "
              f"{__import__('transformers').__version__}), torch {torch.__version__}, onnxruntime {ort.__version__}, tract 0.23.9. "
              f"Encoder excluded everywhere. Medians: coca and onnxruntime {args.runs} runs, open_clip {args.ref_runs} runs.\n")
        print(f"Whole caption, {L} tokens with SOT ({L - 1} generated; random weights never stop early):\n")
        if ours8:
            g8, b8 = ours8["whole_caption"]["greedy"]["ms_median"], ours8["whole_caption"]["beam"]["ms_median"]
            print("| search | open_clip generate() ms | onnxruntime (our graphs) ms | coca-edge ms | coca speed-up vs open_clip | coca-edge int8 ms | int8 speed-up vs open_clip |")
            print("|---|---|---|---|---|---|---|")
            print(f"| greedy | {ref_greedy:.0f} | {ort_greedy:.0f} | {g_ours:.0f} | {ref_greedy / g_ours:.1f}x | {g8:.0f} | {ref_greedy / g8:.1f}x |")
            print(f"| beam (6 beams, 3 groups) | {ref_beam:.0f} | n/a | {b_ours:.0f} | {ref_beam / b_ours:.1f}x | {b8:.0f} | {ref_beam / b8:.1f}x |")
        else:
            print("| search | open_clip generate() ms | onnxruntime (our graphs) ms | coca-edge ms | coca speed-up vs open_clip |")
            print("|---|---|---|---|---|")
            print(f"| greedy | {ref_greedy:.0f} | {ort_greedy:.0f} | {g_ours:.0f} | {ref_greedy / g_ours:.1f}x |")
            print(f"| beam (6 beams, 3 groups) | {ref_beam:.0f} | n/a | {b_ours:.0f} | {ref_beam / b_ours:.1f}x |")
        print("\nDecoder step latency (ms, median) by tokens already in the cache:\n")
        i8 = (lambda b, p: f" {ours8['step_ms_by_past']['batch%d' % b][p]:.1f} |") if ours8 else (lambda b, p: "")
        print("| past | coca B=1 | onnxruntime B=1 | coca B=6 | onnxruntime B=6 |" + (" coca int8 B=1 | coca int8 B=6 |" if ours8 else ""))
        print("|---|---|---|---|---|" + ("---|---|" if ours8 else ""))
        for past in sorted({0, 5, 10, 15, 20, 25, steps - 1}):
            print(f"| {past} | {ours_step[1][past]:.1f} | {ort_step[1][past]:.1f} | {ours_step[6][past]:.1f} | {ort_step[6][past]:.1f} |"
                  + i8(1, past) + i8(6, past))
        print(f"\nKV cache: {ours['cache_bytes_per_beam_token']} bytes per beam per token.")


if __name__ == "__main__":
    main()
