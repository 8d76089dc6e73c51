#!/usr/bin/env python3
"""Writes the committed held-out set of the default model: scenes never used in training.

    models/.venv/bin/python models/train/make_heldout.py --out tests/fixtures/scenes

- test/:  attribute combinations seen in training, other seeds (in distribution)
- novel/: (color, shape) pairs never drawn in training (compositional generalisation)
Images are JPEG (quality 95, 4:4:4) of the generator's 96x96 output; truth.json holds every
image's attributes, its canonical caption and every phrasing that counts as exact.
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import scenes  # noqa: E402

# far from the training seeds (0..train_images) and from train.py's validation (10_000_000+)
SEED_BASE = {"test": 20_000_000, "novel": 30_000_000}


def zero_shot_spec():
    """Per attribute: the class values (as in the truth), the label of each class and the
    templates its prompts come from (one per count: the determiner always follows the count)."""
    def per_count(fmt):
        return [fmt.format(det="a", s=""), fmt.format(det="two", s="s"), fmt.format(det="three", s="s")]
    return {
        "color": {"values": list(scenes.COLORS), "labels": list(scenes.COLORS),
                  "templates": per_count("a photo of {det} {{}} shape{s}.")},
        "shape": {"values": scenes.SHAPES, "labels": scenes.SHAPES,
                  "templates": per_count("a photo of {det} {{}}{s}.")},
        "size": {"values": scenes.SIZES, "labels": scenes.SIZES,
                 "templates": per_count("a photo of {det} {{}} shape{s}.")},
        "position": {"values": scenes.POSITIONS, "labels": [scenes.POSITION_PHRASES[p] for p in scenes.POSITIONS],
                     "templates": per_count("a photo of {det} shape{s} {{}}.")},
        "count": {"values": scenes.COUNTS, "labels": ["a shape", "two shapes", "three shapes"],
                  "templates": ["a photo of {}."]},
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--test", type=int, default=250)
    ap.add_argument("--novel", type=int, default=150)
    ap.add_argument("--size", type=int, default=96)
    args = ap.parse_args()
    items = []
    for split, n in (("test", args.test), ("novel", args.novel)):
        os.makedirs(os.path.join(args.out, split), exist_ok=True)
        for i in range(n):
            s, img = scenes.scene(SEED_BASE[split] + i, split, args.size)
            rel = f"{split}/{i:04d}.jpg"
            img.save(os.path.join(args.out, rel), "JPEG", quality=95, subsampling=0)
            items.append({"file": rel, "split": split, **s, "caption": scenes.canonical_caption(s),
                          "valid_captions": scenes.valid_captions(s)})
    with open(os.path.join(args.out, "truth.json"), "w") as f:
        json.dump({"generator": "models/train/scenes.py", "command": "models/train/make_heldout.py " + " ".join(sys.argv[1:]),
                   "zero_shot": zero_shot_spec(), "items": items}, f, indent=1)
        f.write("\n")
    print(f"wrote {len(items)} scenes to {args.out}")


if __name__ == "__main__":
    main()
