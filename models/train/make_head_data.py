#!/usr/bin/env python3
"""Labelled frames for heads trained on the shipped default model (tests/heads.rs, docs/heads.md).

    models/.venv/bin/python models/train/make_head_data.py --out tests/fixtures/heads

Two tasks where zero-shot labels are weak, each with 20 training images per class in the
class-per-folder layout `coca head train` reads, drawn with seeds far from every other set:
- shape/train/<shape>/NN.jpg: the six shapes (other attributes random, pairs seen in training);
  tested on the held-out set's test split (tests/fixtures/scenes, 250 images): shape/test.tsv
- novel/train/<shape>/NN.jpg: the robot's new objects: the eight (color, shape) pairs the
  model never saw in training (zero-shot names their shape right 26% of the time), labelled by
  their shape; tested on the held-out set's novel split (150 images): novel/test.tsv. In these
  pairs each color belongs to one shape, so color is a legitimate cue for the head, as any
  visual cue of a real object is.
test.tsv lines are CLASS<TAB>PATH, paths relative to the list file.
"""

import argparse
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import scenes  # noqa: E402

SEED_BASE = {"shape": 40_000_000, "novel": 50_000_000}


def draw(task, cls, i):
    rng = random.Random(f"head:{task}:{cls}:{i}")
    while True:
        split = "novel" if task == "novel" else "test"
        s = scenes.sample_scene(rng, split)
        if s["shape"] == cls:
            return scenes.render(s, SEED_BASE[task] + rng.getrandbits(24))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--scenes", default=os.path.join(HERE, "..", "..", "tests", "fixtures", "scenes"))
    args = ap.parse_args()
    truth = json.load(open(os.path.join(args.scenes, "truth.json")))
    tasks = {"shape": scenes.SHAPES, "novel": scenes.SHAPES}
    for task, classes in tasks.items():
        for cls in classes:
            d = os.path.join(args.out, task, "train", cls)
            os.makedirs(d, exist_ok=True)
            for i in range(args.per_class):
                draw(task, cls, i).save(os.path.join(d, f"{i:02d}.jpg"), "JPEG", quality=95, subsampling=0)
        split = "test" if task == "shape" else "novel"
        rel = os.path.relpath(args.scenes, os.path.join(args.out, task))
        with open(os.path.join(args.out, task, "test.tsv"), "w") as f:
            for it in truth["items"]:
                if it["split"] == split:
                    cls = it["shape"]
                    f.write(f"{cls}\t{rel}/{it['file']}\n")
    print("written", args.out)


if __name__ == "__main__":
    main()
