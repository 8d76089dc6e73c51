#!/usr/bin/env python3
"""Writes the sample clip and stills of examples/: scenes whose objects move, appear and vanish.

    models/.venv/bin/python models/train/make_clip.py --out examples

- examples/scenes.mjpeg: 320x240 Motion-JPEG (JPEG frames back to back, as `ffmpeg -f mjpeg`
  writes them), 30 fps. The scene is drawn in the central 240x240 square, the part the model
  sees after its resize and center crop; the side bands are background only.
- examples/scenes.json: per frame, the scene's attributes and canonical caption (null while
  the frame is empty, between scenes).
- examples/*.jpg: a few stills (640x640) from the generator, one per position.
"""

import argparse
import json
import math
import os
import random
import sys

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import scenes  # noqa: E402

W, H, SQ = 320, 240, 240
SS = 2  # supersampling of the drawing


def clip_scenes(rng, n):
    """n scenes, each new one differing from the last in its position and its color."""
    out, last = [], None
    while len(out) < n:
        s = scenes.sample_scene(rng, "train")
        if last is None or (s["position"] != last["position"] and s["color"] != last["color"]):
            out.append(s)
            last = s
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--scenes", type=int, default=6)
    ap.add_argument("--frames-per-scene", type=int, default=36)
    ap.add_argument("--gap", type=int, default=6, help="empty frames between scenes")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    os.makedirs(args.out, exist_ok=True)

    bg = scenes._background(random.Random(args.seed + 1), W, H)
    frames_truth = []
    mjpeg = open(os.path.join(args.out, "scenes.mjpeg"), "wb")
    x0 = (W - SQ) // 2
    noise = np.random.default_rng(args.seed)
    for k, s in enumerate(clip_scenes(rng, args.scenes)):
        centers, r = scenes._layout(s, random.Random(rng.getrandbits(32)), SQ)
        draw_rng_seed = rng.getrandbits(32)
        # the group drifts along a small circle while it is on screen
        drift = rng.uniform(0, 2 * math.pi)
        for f in range(args.frames_per_scene + args.gap):
            img = Image.fromarray(bg.astype(np.uint8)).resize((W * SS, H * SS), Image.BILINEAR)
            visible = f < args.frames_per_scene
            if visible:
                t = drift + 2 * math.pi * f / args.frames_per_scene
                dx, dy = 0.035 * SQ * math.cos(t), 0.035 * SQ * math.sin(t)
                moved = [(x + x0 + dx, y + dy) for x, y in centers]
                scenes.draw_objects(img, s, random.Random(draw_rng_seed), moved, r, scale=SS)
            img = img.resize((W, H), Image.LANCZOS)
            a = np.asarray(img, dtype=np.float64) + noise.normal(0, 3, (H, W, 3))
            img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
            img.save(mjpeg, "JPEG", quality=85)
            frames_truth.append({**s, "caption": scenes.canonical_caption(s)} if visible else None)
    mjpeg.close()
    with open(os.path.join(args.out, "scenes.json"), "w") as f:
        json.dump({"generator": "models/train/make_clip.py", "command": "models/train/make_clip.py " + " ".join(sys.argv[1:]),
                   "width": W, "height": H, "fps": 30, "frames": frames_truth}, f, indent=1)
        f.write("\n")

    # stills: one scene per position, rendered large
    srng = random.Random(args.seed + 2)
    for pos in scenes.POSITIONS:
        while True:
            s = scenes.sample_scene(srng, "train")
            if s["position"] == pos:
                break
        img = scenes.render(s, srng.getrandbits(32), size=384)
        name = "_".join(scenes.canonical_caption(s).split()[1:4]) + f"_{pos}.jpg"
        img.save(os.path.join(args.out, name), "JPEG", quality=90)
        print(f"{name}: {scenes.canonical_caption(s)}")
    print(f"wrote {len(frames_truth)} frames to {args.out}/scenes.mjpeg")


if __name__ == "__main__":
    main()
