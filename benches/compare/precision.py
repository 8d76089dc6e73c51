#!/usr/bin/env python3
"""int8 (and f16) against f32, through coca-edge, in one run: accuracy on real photos and speed
beside onnxruntime on the same machine and threads.

  cargo build --release
  models/.venv/bin/python benches/compare/precision.py [--bundle build/coca_ViT-B-32-random0]
      [--threads 1,2] [--runs 20] [--md]

Accuracy (every precision the bundle has besides f32, f16 forced where this CPU has no fp16):
embedding cosine against f32 (mean and worst photo), zero-shot top-1 agreement on a fixed label
list, greedy caption token agreement (identical sequences, and positions that agree).
Photos: the real photos shipped in scikit-image's wheel (`pip install scikit-image`, pinned in
models/export/requirements.txt) plus tests/fixtures/images' china, flower and grace_hopper;
--photos DIR takes a folder instead.

Speed (image encoder, batch 1, medians): coca-edge f32 and int8 (`coca bench`), onnxruntime f32,
onnxruntime on our int8 graph, and onnxruntime on its own best int8 graph for itself (static QDQ,
symmetric per-channel, made here with onnxruntime.quantization from the same calibration set);
with --decoder, also the decoder step (batch 1 and 6 beams) in f32 and int8, both int8 designs.
Missing int8 variants are added to the bundle first (models/export/quantize.py).
"""
import argparse
import datetime
import glob
import json
import os
import subprocess
import sys

import numpy as np

import common

sys.path.insert(0, os.path.join(common.ROOT, "models", "export"))
import quantize  # noqa: E402

LABELS = ("an astronaut,a cat,a dog,a rocket launch,coins,a cup of coffee,a flower,a city street,a portrait of a woman,"
          "a motorcycle,a clock,the moon,a brick wall,grass,gravel,a page of text,cells under a microscope,"
          "a galaxy,an eye,a camera")
SKIMAGE_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
                  "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "microaneurysms.png",
                  "moon.png", "motorcycle_left.png", "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg",
                  "text.png")


def default_photos():
    try:
        import skimage.data
    except ImportError:
        raise SystemExit("error: scikit-image is needed for the photo set: models/.venv/bin/pip install -r "
                         "models/export/requirements.txt (or pass --photos DIR)")
    d = os.path.dirname(skimage.data.__file__)
    own = [os.path.join(common.ROOT, "tests", "fixtures", "images", f) for f in ("china.jpg", "flower.jpg", "grace_hopper.jpg")]
    return [os.path.join(d, f) for f in SKIMAGE_PHOTOS] + own


def coca_json(coca, bundle, precision, args, extra=()):
    cmd = [coca, "--model", bundle, "--precision", precision, *extra, *args]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[:8])} ...: {out.stderr.strip()}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def accuracy(coca, bundle, precision, photos, labels, force):
    extra = ["--force-precision"] if force else []
    base = {"f32": {}, precision: {}}
    for p, d in base.items():
        ex = extra if p == precision else []
        d["emb"] = [np.array(r["embedding"]) for r in coca_json(coca, bundle, p, ["embed", "--json", *photos], ex)]
        d["top"] = [r["top"][0]["label"] for r in coca_json(coca, bundle, p, ["classify", "--json", "--labels", labels, "--top-k", "1", *photos], ex)]
        d["cap"] = [r["ids"] for r in coca_json(coca, bundle, p, ["caption", "--json", "--sampling", "greedy", *photos], ex)]
    a, b = base["f32"], base[precision]
    cos = [float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)) for x, y in zip(a["emb"], b["emb"])]
    same_seq = sum(x == y for x, y in zip(a["cap"], b["cap"]))
    pos = sum(sum(u == v for u, v in zip(x, y)) for x, y in zip(a["cap"], b["cap"]))
    npos = sum(max(len(x), len(y)) for x, y in zip(a["cap"], b["cap"]))
    worst = int(np.argmin(cos))
    return {"precision": precision, "photos": len(photos), "cos_mean": float(np.mean(cos)), "cos_worst": cos[worst],
            "worst_photo": os.path.basename(photos[worst]),
            "zero_shot_agree": sum(x == y for x, y in zip(a["top"], b["top"])), "caption_same": same_seq,
            "token_agree": pos / max(npos, 1)}


def ort_ms(path, xn, threads, runs, warmup):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return common.median_ms(lambda: sess.run(None, {"image": xn}), runs, warmup)


def ort_own_int8(bundle, feeds):
    """onnxruntime's own static QDQ int8 of the image encoder (its fast path), cached in the bundle."""
    out = os.path.join(bundle, "image_encoder.ort-qdq.onnx")
    if not os.path.exists(out):
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(feeds)

            def get_next(self):
                return next(self.it, None)

        quantize_static(os.path.join(bundle, "image_encoder.onnx"), out, Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["MatMul", "Gemm"],
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return out


def variant_bundle(bundle, manifest, name, graph_path):
    """A bundle folder beside `bundle` whose int8 image encoder is `graph_path` (hard links)."""
    import hashlib
    d = os.path.join(os.path.dirname(os.path.abspath(bundle)), "precision-variants", name)
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(bundle):
        if f.endswith((".onnx", ".gz")) and ".int8." not in f and not os.path.exists(os.path.join(d, f)):
            os.link(os.path.join(bundle, f), os.path.join(d, f))
    target = os.path.join(d, "image_encoder.int8.onnx")
    if os.path.exists(target):
        os.remove(target)
    os.link(graph_path, target)
    m = json.loads(json.dumps(manifest))
    m["graphs"]["image_encoder"]["precisions"]["int8"] = "image_encoder.int8.onnx"
    with open(target, "rb") as f:
        m["files"]["image_encoder.int8.onnx"] = {"sha256": hashlib.sha256(f.read()).hexdigest(), "size": os.path.getsize(target)}
    for k in [k for k in m["files"] if ".int8." in k and k != "image_encoder.int8.onnx"]:
        del m["files"][k]
    for g in m["graphs"].values():
        if g is not m["graphs"]["image_encoder"]:
            g["precisions"].pop("int8", None)
    with open(os.path.join(d, "coca.json"), "w") as f:
        json.dump(m, f, indent=2)
    return d


def decoder_bundle(bundle, design="w8"):
    """A copy of `bundle` (hard links) with int8 captioning graphs added by quantize.py: the
    decoder step of `design` (quantize.py's --int8-design: w8, the default, or mmi) and cross_kv
    (its default, mmi)."""
    import shutil
    d = os.path.join(os.path.dirname(os.path.abspath(bundle)), "precision-variants", f"decoder-int8-{design}")
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(bundle):
        if f.endswith((".onnx", ".gz")) and not f.startswith(("decoder_step.int8", "cross_kv.int8")) and not os.path.exists(os.path.join(d, f)):
            os.link(os.path.join(bundle, f), os.path.join(d, f))
    with open(os.path.join(d, "coca.json")) if os.path.exists(os.path.join(d, "coca.json")) else open(os.path.join(bundle, "coca.json")) as f:
        m = json.load(f)
    if "int8" not in m["graphs"]["decoder_step"]["precisions"]:
        shutil.copy(os.path.join(bundle, "coca.json"), os.path.join(d, "coca.json"))
        print(f"adding an int8 decoder step ({design}) to {d}", file=sys.stderr, flush=True)
        quantize.add_variants(d, ["int8"], ["decoder_step"], design=design)
    if "int8" not in m["graphs"]["cross_kv"]["precisions"]:
        print(f"adding an int8 cross_kv to {d}", file=sys.stderr, flush=True)
        quantize.add_variants(d, ["int8"], ["cross_kv"])
    return d


def variants_table(coca, bundle, manifest, photos, runs, warmup):
    """The int8 designs tried, each through coca-edge at 1 thread: accuracy and speed, one run."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    feeds = quantize.image_calibration(manifest, os.path.join(common.ROOT, "tests", "fixtures", "images"))
    f32 = os.path.join(bundle, manifest["graphs"]["image_encoder"]["precisions"]["f32"])
    work = os.path.join(os.path.dirname(os.path.abspath(bundle)), "precision-variants")
    os.makedirs(work, exist_ok=True)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    def static(path, act_mm):
        import onnx
        m = onnx.load(f32, load_external_data=False)
        inits = {i.name for i in m.graph.initializer}
        exclude = [] if act_mm else [n.name for n in m.graph.node if n.op_type == "MatMul" and n.input[1] not in inits]
        quantize_static(f32, path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                        nodes_to_exclude=exclude, extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})

    ours = os.path.join(bundle, manifest["graphs"]["image_encoder"]["precisions"]["int8"])
    designs = [
        ("onnxruntime dynamic (DynamicQuantizeLinear u8 + MatMulInteger)", "ort-dynamic",
         lambda p: quantize_dynamic(f32, p, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul", "Gemm"]), {}),
        ("onnxruntime static QDQ, symmetric, weight products only", "ort-qdq-weights", lambda p: static(p, False), {}),
        ("onnxruntime static QDQ, symmetric, all products", "ort-qdq-all", lambda p: static(p, True), {}),
        (f"ours ({quantize.METHOD}), tract's own QuantizeLinear and LayerNorm", "ours-tract-ops", None, {"COCA_TRACT_OPS": "1"}),
        (f"ours ({quantize.METHOD}), coca-edge's QuantizeLinear and LayerNorm", "ours", None, {}),
    ]
    image = os.path.join(common.ROOT, "tests", "fixtures", "images", "china.jpg")

    def run(b, precision, env, args):
        out = subprocess.run([coca, "--model", b, "--precision", precision, *args], capture_output=True, text=True,
                             env={**os.environ, **env})
        if out.returncode != 0:
            raise SystemExit(f"error: coca {' '.join(args[:3])}: {out.stderr.strip()}")
        return [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]

    base = [np.array(r["embedding"]) for r in run(bundle, "f32", {}, ["embed", "--json", *photos])]
    f32_ms = run(bundle, "f32", {}, ["--threads", "1", "bench", image, "--json", "--runs", str(runs), "--warmup", str(warmup)])[0]["encoder_ms_median"]
    f32_tract = run(bundle, "f32", {"COCA_TRACT_OPS": "1"}, ["--threads", "1", "bench", image, "--json", "--runs", str(runs), "--warmup", str(warmup)])[0]["encoder_ms_median"]
    rows = [("f32, tract's own LayerNorm", f32_tract, os.path.getsize(f32), 1.0, 1.0),
            ("f32, coca-edge's LayerNorm", f32_ms, os.path.getsize(f32), 1.0, 1.0)]
    for title, name, make, env in designs:
        if make is None:
            path = ours
        else:
            path = os.path.join(work, name + ".onnx")
            if not os.path.exists(path):
                print(f"making {name}", file=sys.stderr, flush=True)
                make(path)
                import onnx
                g = onnx.load(path)  # onnxruntime's shape inference pins batch to 1 in value_info
                del g.graph.value_info[:]
                onnx.save(g, path)
        b = bundle if make is None else variant_bundle(bundle, manifest, name, path)
        emb = [np.array(r["embedding"]) for r in run(b, "int8", env, ["embed", "--json", *photos])]
        cos = [float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)) for x, y in zip(base, emb)]
        ms = run(b, "int8", env, ["--threads", "1", "bench", image, "--json", "--runs", str(runs), "--warmup", str(warmup)])[0]["encoder_ms_median"]
        rows.append((title, ms, os.path.getsize(path), float(np.mean(cos)), float(np.min(cos))))
        print(f"{title}: {ms:.1f} ms, cosine mean {np.mean(cos):.5f} worst {np.min(cos):.5f}", file=sys.stderr, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=os.path.join(common.ROOT, "build", "coca_ViT-B-32-random0"))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--photos", default=None, help="folder of photos (default: scikit-image's + three fixtures)")
    ap.add_argument("--labels", default=LABELS)
    ap.add_argument("--decoder", action="store_true", help="also quantize and time the decoder step")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--variants", action="store_true",
                    help="also the table of int8 designs tried (onnxruntime's dynamic and QDQ graphs, ours with and "
                         "without coca-edge's ops), each through coca-edge at 1 thread")
    ap.add_argument("--md", action="store_true")
    args = ap.parse_args()
    coca = common.coca_binary()
    bundle = args.bundle
    with open(os.path.join(bundle, "coca.json")) as f:
        manifest = json.load(f)
    if "int8" not in manifest["graphs"]["image_encoder"]["precisions"]:
        print(f"adding an int8 image encoder to {bundle}", file=sys.stderr, flush=True)
        quantize.add_variants(bundle, ["int8"], ["image_encoder"])
        with open(os.path.join(bundle, "coca.json")) as f:
            manifest = json.load(f)
    # the int8 decoder step lives in a copy of the bundle, so the accuracy rows of the bundle
    # itself are those of its shipped form (int8 image encoder only)
    dec_bundle = decoder_bundle(bundle) if args.decoder else None
    mmi_bundle = decoder_bundle(bundle, "mmi") if args.decoder else None
    photos = sorted(glob.glob(os.path.join(args.photos, "*.png")) + glob.glob(os.path.join(args.photos, "*.jpg"))) \
        if args.photos else default_photos()

    precs = sorted({p for g in manifest["graphs"].values() for p in g["precisions"]} - {"f32"})
    kr = subprocess.run([coca, "--model", bundle, "info", "--json"], capture_output=True, text=True, check=True)
    fast_f16 = not (json.loads(kr.stdout).get("kernels", {}).get("matmul_f16") or "generic").startswith("generic")
    acc = []
    for p in precs:
        if p == "f16" and not fast_f16 and manifest["files"][manifest["graphs"]["image_encoder"]["precisions"]["f16"]]["size"] > 50e6:
            print("f16: skipped (no fp16 arithmetic here and the graph is large: the generic kernel would take minutes)",
                  file=sys.stderr)
            continue
        r = accuracy(coca, bundle, p, photos, args.labels, force=(p == "f16" and not fast_f16))
        acc.append(r)
        if p == "int8" and dec_bundle:
            rd = accuracy(coca, dec_bundle, p, photos, args.labels, False)
            rd["precision"] = "int8 (image encoder, cross_kv and decoder step; the step with int8 weights: sym-w8)"
            acc.append(rd)
            rm = accuracy(coca, mmi_bundle, p, photos, args.labels, False)
            rm["precision"] = "int8 (image encoder, cross_kv and decoder step; the step with int8 weights and activations: sym-mmi, not shipped)"
            acc.append(rm)
            print(f"int8 with the decoder: greedy captions identical {rd['caption_same']}/{rd['photos']}, tokens agreeing "
                  f"{100 * rd['token_agree']:.1f}%", file=sys.stderr, flush=True)
        print(f"{p}: cosine vs f32 mean {r['cos_mean']:.5f}, worst {r['cos_worst']:.5f} ({r['worst_photo']}); zero-shot "
              f"top-1 agreement {r['zero_shot_agree']}/{r['photos']}; greedy captions identical {r['caption_same']}/"
              f"{r['photos']}, tokens agreeing {100 * r['token_agree']:.1f}%", file=sys.stderr, flush=True)

    variants = variants_table(coca, bundle, manifest, photos, args.runs, args.warmup) if args.variants else []

    rows = []
    if not args.skip_speed:
        feeds = quantize.image_calibration(manifest, os.path.join(common.ROOT, "tests", "fixtures", "images"))
        xn = quantize.preprocess(os.path.join(common.ROOT, "tests", "fixtures", "images", "china.jpg"), manifest["image"])
        ort_qdq = ort_own_int8(bundle, feeds)
        f32_path = os.path.join(bundle, manifest["graphs"]["image_encoder"]["precisions"]["f32"])
        int8_path = os.path.join(bundle, manifest["graphs"]["image_encoder"]["precisions"]["int8"])
        for t in [int(v) for v in args.threads.split(",")]:
            row = {"threads": t}
            row["ort_f32"] = ort_ms(f32_path, xn, t, args.runs, args.warmup)
            row["ort_ours_int8"] = ort_ms(int8_path, xn, t, args.runs, args.warmup)
            row["ort_qdq_int8"] = ort_ms(ort_qdq, xn, t, args.runs, args.warmup)
            for p in ("f32", "int8"):
                extra = ["--caption", "--step-len", "10", "--caption-len", "21"] if args.decoder else []
                r = coca_json(coca, dec_bundle or bundle, p, ["--threads", str(t), "bench", os.path.join(common.ROOT, "tests", "fixtures", "images", "china.jpg"),
                                                "--json", "--runs", str(args.runs), "--warmup", str(args.warmup), *extra])[0]
                row[f"coca_{p}"] = r["encoder_ms_median"]
                row[f"coca_{p}_rss_mb"] = r["peak_rss_bytes"] / 1e6
                if args.decoder:
                    c = r["caption"]
                    row[f"step1_{p}"] = float(np.median(c["step_ms_by_past"]["batch1"]))
                    row[f"step6_{p}"] = float(np.median(c["step_ms_by_past"]["batch6"]))
                    row[f"greedy_{p}"] = c["whole_caption"]["greedy"]["ms_median"]
            if args.decoder:  # the design not chosen, same run
                r = coca_json(coca, mmi_bundle, "int8", ["--threads", str(t), "bench", os.path.join(common.ROOT, "tests", "fixtures", "images", "china.jpg"),
                                                      "--json", "--runs", str(args.runs), "--warmup", str(args.warmup), "--caption", "--step-len", "10", "--caption-len", "21"])[0]
                c = r["caption"]
                row["step1_mmi"] = float(np.median(c["step_ms_by_past"]["batch1"]))
                row["step6_mmi"] = float(np.median(c["step_ms_by_past"]["batch6"]))
                row["greedy_mmi"] = c["whole_caption"]["greedy"]["ms_median"]
            rows.append(row)
            print(f"threads {t}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items() if k != "threads"), file=sys.stderr, flush=True)

    if args.md:
        import onnxruntime as ort
        date = datetime.date.today().isoformat()
        size = lambda p: manifest["files"][manifest["graphs"]["image_encoder"]["precisions"][p]]["size"]
        print(f"### {manifest['name']}: int8 against f32 ({date})\n")
        import shlex
        print(f"Command: `models/.venv/bin/python benches/compare/precision.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}`  ")
        print(f"Machine: {common.machine()}. onnxruntime {ort.__version__}, tract 0.23.9. int8 = models/export/quantize.py "
              f"({quantize.METHOD}); image encoder {size('int8') / 1e6:.1f} MB = {100 * size('int8') / size('f32'):.0f}% of f32.\n")
        if acc:
            what = f"{acc[0]['photos']} images of {args.photos}" if args.photos else f"{acc[0]['photos']} real photos"
            print(f"Accuracy through coca-edge against its own f32 ({what}; zero-shot over {len(args.labels.split(','))} labels):\n")
            print("| precision | embedding cosine mean | worst photo | zero-shot top-1 agreement | greedy captions identical | caption tokens agreeing |")
            print("|---|---|---|---|---|---|")
            for r in acc:
                print(f"| {r['precision'] if r['precision'] != 'int8' else 'int8 (image encoder)'} | {r['cos_mean']:.5f} | {r['cos_worst']:.5f} ({r['worst_photo']}) | {r['zero_shot_agree']}/{r['photos']} | "
                      f"{r['caption_same']}/{r['photos']} | {100 * r['token_agree']:.1f}% |")
            print()
        if variants:
            print(f"int8 designs tried, image encoder through coca-edge at 1 thread (medians of {args.runs} runs; cosine "
                  f"of the embedding against coca-edge f32 over the same {len(photos)} photos):\n")
            print("| design | ms | vs f32 (coca-edge ops) | graph MB | cosine mean | worst |")
            print("|---|---|---|---|---|---|")
            f32_ms = variants[1][1]
            for title, ms, size_b, cm, cw in variants:
                print(f"| {title} | {ms:.1f} | {f32_ms / ms:.2f}x | {size_b / 1e6:.0f} | {cm:.5f} | {cw:.5f} |")
            print()
        if rows:
            print(f"Image encoder speed, batch 1, medians of {args.runs} runs after {args.warmup} warm-up, each runtime alone:\n")
            print("| threads | coca f32 ms | coca int8 ms | coca int8 speed-up | onnxruntime f32 ms | onnxruntime, our int8 graph ms | onnxruntime, its QDQ int8 ms | coca int8 / onnxruntime best int8 |")
            print("|---|---|---|---|---|---|---|---|")
            for r in rows:
                best = min(r["ort_ours_int8"], r["ort_qdq_int8"])
                print(f"| {r['threads']} | {r['coca_f32']:.1f} | {r['coca_int8']:.1f} | {r['coca_f32'] / r['coca_int8']:.2f}x | {r['ort_f32']:.1f} | "
                      f"{r['ort_ours_int8']:.1f} | {r['ort_qdq_int8']:.1f} | {r['coca_int8'] / best:.2f} |")
            if args.decoder:
                dsize = lambda b: os.path.getsize(os.path.join(b, "decoder_step.int8.onnx")) / 1e6
                print(f"\nDecoder step (medians over past 0..9) and a whole 21-token greedy caption (encoder excluded), coca-edge. "
                      f"int8 = sym-w8 (int8 weights, f32 activations; {dsize(dec_bundle):.0f} MB), the shipped design; "
                      f"sym-mmi (int8 weights and activations, MatMulInteger; {dsize(mmi_bundle):.0f} MB) beside it:\n")
                print("| threads | step B=1 f32 ms | int8 ms | speed-up | sym-mmi ms | step B=6 f32 ms | int8 ms | speed-up | sym-mmi ms | greedy caption f32 ms | int8 ms | sym-mmi ms |")
                print("|---|---|---|---|---|---|---|---|---|---|---|---|")
                for r in rows:
                    print(f"| {r['threads']} | {r['step1_f32']:.1f} | {r['step1_int8']:.1f} | {r['step1_f32'] / r['step1_int8']:.2f}x | {r['step1_mmi']:.1f} | "
                          f"{r['step6_f32']:.1f} | {r['step6_int8']:.1f} | {r['step6_f32'] / r['step6_int8']:.2f}x | {r['step6_mmi']:.1f} | "
                          f"{r['greedy_f32']:.0f} | {r['greedy_int8']:.0f} | {r['greedy_mmi']:.0f} |")


if __name__ == "__main__":
    main()
