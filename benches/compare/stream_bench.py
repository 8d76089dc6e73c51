#!/usr/bin/env python3
"""Stream throughput: a 640x480 Y4M clip made from the test photos (BT.601 limited-range I420,
30 fps) through `coca stream --every-frame`; prints frames/s, per-stage medians from the JSON
lines, and the stream overhead (wall time per frame beyond preprocess + encoder + classify:
capture, Y4M read, YUV conversion, JSON output) relative to the encoder time.

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default=os.path.join(common.ROOT, "models", "coca-tiny-random"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--md", action="store_true")
    args = ap.parse_args()
    clip = os.path.join(common.ROOT, "build", "stream_640x480.y4m")
    os.makedirs(os.path.dirname(clip), exist_ok=True)
    make_clip(clip, args.frames)
    out = subprocess.run([common.coca_binary(), "--model", args.bundle, "--threads", str(args.threads), "stream", clip,
                          "--every-frame", "--labels", "cat,dog,person,car,flower,rocket"],
                         capture_output=True, text=True, check=True)
    lines = [json.loads(l) for l in out.stdout.splitlines()]
    summary, frames = lines[-1], lines[:-1]
    med = lambda k: statistics.median(f["latency"][k] for f in frames)
    per_frame = summary["seconds"] * 1e3 / summary["processed"]
    work = med("preprocess_ms") + med("encoder_ms") + med("classify_ms")
    overhead = per_frame - work
    name = json.load(open(os.path.join(args.bundle, "coca.json")))["name"]
    row = (f"| {name} | {args.threads} | {summary['processed']} | {summary['fps']:.1f} | {med('preprocess_ms'):.2f} | "
           f"{med('encoder_ms'):.1f} | {med('classify_ms'):.3f} | {overhead:.2f} ({100 * overhead / med('encoder_ms'):.0f}% of encoder) |")
    if args.md:
        print(f"Command: `models/.venv/bin/python benches/compare/stream_bench.py --bundle {os.path.relpath(args.bundle, common.ROOT)} "
              f"--threads {args.threads} --frames {args.frames} --md` ({datetime.date.today().isoformat()}, {common.machine()})\n")
        print("| bundle | threads | frames | frames/s | preprocess ms | encoder ms | classify ms | stream overhead ms per frame |")
        print("|---|---|---|---|---|---|---|---|")
    print(row)


if __name__ == "__main__":
    main()
