#!/usr/bin/env python3
"""Calibration scenes for the default model's int8 variant: the first N training scenes
(training seeds 0..N-1, the same images train.py saw), never the held-out ones.

    models/.venv/bin/python models/train/make_calibration.py --out build/calib-scenes
    models/.venv/bin/python models/export/quantize.py models/coca-scenes --precision int8,f16 \\
        --calib-images build/calib-scenes
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import scenes  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--size", type=int, default=96)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for i in range(args.n):
        _, img = scenes.scene(i, "train", args.size)
        img.save(os.path.join(args.out, f"{i:04d}.png"))
    print(f"wrote {args.n} training scenes to {args.out}")


if __name__ == "__main__":
    main()
