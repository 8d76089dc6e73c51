#!/usr/bin/env python3
"""Stream throughput: the sample clip (examples/scenes.mjpeg, 320x240 MJPEG) or a 640x480 Y4M
made from the test photos (BT.601 limited-range I420) through `coca stream --every-frame`, for
each bundle with JSON output alone and with `--save` (overlay + JPEG encode + file); prints
frames/s, per-stage medians from the JSON lines, the means of capture (read + decode/convert,
on the capture thread) and outputs from the summary, and the stream overhead (capture +
outputs) relative to the encoder time.

  cargo build --release
  models/.venv/bin/python benches/compare/stream_bench.py [--bundle DIR] [--threads 2] [--md]
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess

import numpy as np
from PIL import Image

import common


def make_clip(path, frames, w=640, h=480):
    photos = common.photos()
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F30:1 Ip A1:1 C420jpeg\n".encode())
        for i in range(frames):
            rgb = np.asarray(Image.open(photos[i % len(photos)]).convert("RGB").resize((w, h)), dtype=np.float32)
            r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
            y = 16 + 0.257 * r + 0.504 * g + 0.098 * b
            u = 128 - 0.148 * r - 0.291 * g + 0.439 * b
            v = 128 + 0.439 * r - 0.368 * g - 0.071 * b
            sub = lambda c: c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
            f.write(b"FRAME\n")
            for plane in (y, sub(u), sub(v)):
                f.write(np.clip(np.rint(plane), 0, 255).astype(np.uint8).tobytes())


def run_one(bundle, clip, threads, frames, save=None):
    cmd = [common.coca_binary(), "--model", bundle, "--threads", str(threads), "stream", clip, "--every-frame",
           "--max-frames", str(frames), "--labels", "red,green,blue,yellow,purple,orange,white,black"]
    if save:
        cmd += ["--save", save]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    lines = [json.loads(l) for l in out.stdout.splitlines()]
    return lines[-1], lines[:-1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", action="append", help="bundle folder (repeatable; default: the shipped default model and build/coca_ViT-B-32-random0)")
    ap.add_argument("--clip", default="examples/scenes.mjpeg", help="the sample clip (default), or 'y4m' for a 640x480 Y4M made from the test photos")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--md", action="store_true")
    args = ap.parse_args()
    bundles = args.bundle or [os.path.join(common.ROOT, "models", "coca-scenes"), os.path.join(common.ROOT, "build", "coca_ViT-B-32-random0")]
    if args.clip == "y4m":
        clip = os.path.join(common.ROOT, "build", "stream_640x480.y4m")
        os.makedirs(os.path.dirname(clip), exist_ok=True)
        make_clip(clip, args.frames)
    else:
        clip = os.path.join(common.ROOT, args.clip)
    save = os.path.join(common.ROOT, "build", "stream_bench_annotated.mjpeg")
    rows = []
    for bundle in bundles:
        name = json.load(open(os.path.join(bundle, "coca.json")))["name"]
        for outputs, extra in (("JSON", None), ("JSON + --save", save)):
            summary, frames = run_one(bundle, clip, args.threads, args.frames, extra)
            med = lambda k: statistics.median(f["latency"][k] for f in frames)
            mean = summary["mean_ms"]
            per_frame = summary["seconds"] * 1e3 / summary["processed"]
            enc = med("encoder_ms")
            # stream overhead in CPU time: the source (read + decode/convert, on its own thread)
            # and the outputs; in wall time: per frame beyond the models' own stages
            overhead = mean["capture"] + mean["outputs"]
            wall = per_frame - (mean["preprocess"] + mean["encoder"] + mean["classify"])
            rows.append(f"| {name} | {outputs} | {args.threads} | {summary['processed']} | {summary['fps']:.1f} | {per_frame:.2f} | "
                        f"{mean['capture']:.2f} | {med('preprocess_ms'):.2f} | {enc:.2f} | {med('classify_ms'):.3f} | {mean['outputs']:.2f} | "
                        f"{overhead:.2f} ({100 * overhead / enc:.1f}%) | {wall:.2f} ({100 * wall / mean['encoder']:.1f}%) |")
    if args.md:
        cmd = " ".join(["models/.venv/bin/python benches/compare/stream_bench.py", *[f"--bundle {os.path.relpath(b, common.ROOT)}" for b in bundles],
                        f"--clip {args.clip}", f"--threads {args.threads}", f"--frames {args.frames}", "--md"])
        print(f"Command: `{cmd}` ({datetime.date.today().isoformat()}, {common.machine()})\n")
        print("| bundle | outputs | threads | frames | frames/s | wall ms/frame | capture ms | preprocess ms | encoder ms | classify ms | outputs ms | overhead, CPU: capture + outputs (of encoder) | overhead, wall: per frame beyond the models (of encoder) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
