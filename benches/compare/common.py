"""Shared by the side-by-side scripts: build/export the reference geometry, rebuild the same
PyTorch model, find the coca binary."""
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "models", "export"))
import export  # noqa: E402


def ensure_bundle(model, seed, out):
    """Export `model` with random init (seed) to `out` unless a bundle for it is already there."""
    manifest = os.path.join(out, "coca.json")
    if os.path.exists(manifest):
        with open(manifest) as f:
            m = json.load(f)
        if m["source"].get("model") == model and m["source"].get("seed") == seed and "decoder_step" in m["graphs"]:
            return m
    cmd = [sys.executable, os.path.join(ROOT, "models", "export", "export.py"), "--model", model,
           "--random-init", "--seed", str(seed), "--out", out, "--force"]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    with open(manifest) as f:
        return json.load(f)


def torch_model(manifest):
    """The exact PyTorch model the bundle was exported from (deterministic random init)."""
    src = manifest["source"]
    args = export.argparse.Namespace(config=None, model=src["model"], random_init=True, seed=src["seed"],
                                     pretrained=None, checkpoint=None)
    model, cfg, name, _ = export.build_model(args)
    return model, name


def preprocess_for(model):
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2
    return image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(model)), is_train=False)


def photos():
    """The real photos (JPEG and PNG) of tests/fixtures/images, in name order."""
    import glob
    return sorted(p for p in glob.glob(os.path.join(ROOT, "tests", "fixtures", "images", "*")) if p.endswith((".jpg", ".png")))


def coca_binary():
    p = os.environ.get("COCA_BIN", os.path.join(ROOT, "target", "release", "coca"))
    if not os.path.exists(p):
        raise SystemExit(f"error: {p} not found: run `cargo build --release` first (or set COCA_BIN)")
    return p


def machine():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def median_ms(fn, runs, warmup=0):
    """Median wall time of fn() in ms over `runs` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)
