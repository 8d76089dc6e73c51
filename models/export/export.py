#!/usr/bin/env python3
"""Export an open_clip CoCa model (open-clip-torch 3.3.0) to a coca-edge model bundle.

A bundle is a folder holding `coca.json` (the manifest), the ONNX graphs and the BPE vocab.
The Rust runtime trusts nothing it has not checked against the manifest: every file is listed
with its sha256 and size, every graph with its input/output names, dtypes and shapes.

Graphs (f32):
  image_encoder  image [batch,3,S,S] f32 -> embedding [batch,D] (L2-normalised, = encode_image)
                                            tokens    [batch,N,D] (captioning tokens, queries 1..)
  text_encoder   text  [batch,L] i64     -> embedding [batch,D] (L2-normalised, = encode_text)

Examples (see README.md in this folder):
  export.py --model coca_ViT-B-32 --random-init --seed 0 --out build/coca_b32
  export.py --model coca_ViT-L-14 --pretrained mscoco_finetuned_laion2b_s13b_b90k --out coca_l14
  export.py --config my_coca.json --checkpoint weights.pt --out my_bundle
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

import open_clip
from open_clip.transformer import AttentionalPooler

FORMAT = "coca-edge-bundle"
FORMAT_VERSION = 1
VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"


def log(msg):
    print(f"[export] {msg}", file=sys.stderr, flush=True)


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# model construction
# --------------------------------------------------------------------------------------------

def build_model(args):
    """Returns (model, model_cfg dict, source description)."""
    if args.config:
        with open(args.config) as f:
            cfg = json.load(f)
        name = os.path.splitext(os.path.basename(args.config))[0]
        # register the config so open_clip's factory (and its tokenizer lookup) knows it
        open_clip.add_model_config(args.config)
    else:
        name = args.model
        cfg = open_clip.get_model_config(name)
        if cfg is None:
            raise SystemExit(f"error: unknown open_clip model config '{name}'")
    if "multimodal_cfg" not in cfg:
        raise SystemExit(f"error: '{name}' is not a CoCa config (no multimodal_cfg)")
    width_t = cfg["text_cfg"].get("width")
    width_m = cfg["multimodal_cfg"].get("width")
    if not (cfg["embed_dim"] == width_t == width_m):
        raise SystemExit(f"error: CoCa needs embed_dim == text width == multimodal width, got "
                         f"{cfg['embed_dim']}, {width_t}, {width_m}")

    if args.random_init:
        model = build_random(name, args.seed)
        source = {"model": name, "weights": "random-init", "seed": args.seed}
    else:
        pretrained = args.pretrained or args.checkpoint
        if not pretrained:
            raise SystemExit("error: give --pretrained TAG|FILE, --checkpoint FILE or --random-init")
        model = open_clip.create_model(name, pretrained=pretrained, device="cpu")
        source = {"model": name, "weights": pretrained}
        if os.path.isfile(pretrained):
            source["weights_sha256"] = sha256_of(pretrained)
    model.eval()
    for pname, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise SystemExit(f"error: parameter {pname} has non-finite values")
    return model, cfg, name, source


def build_random(name, seed):
    """A random-init model whose every parameter is a deterministic function of the seed.

    open_clip 3.3.0 creates some parameters with torch.empty and never initialises them in a
    random-init model (the decoder's text_projection): their values are whatever memory held.
    While the model is built, torch.empty returns NaN-filled float tensors, so a parameter that
    is still NaN afterwards was never initialised; it is then drawn from a seeded generator
    (normal, std = fan_in ** -0.5, as open_clip's own init_parameters does for projections).
    """
    real_empty = torch.empty

    def nan_empty(*a, **kw):
        t = real_empty(*a, **kw)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    torch.manual_seed(seed)
    torch.empty = nan_empty
    try:
        model = open_clip.create_model(name, pretrained=None, device="cpu")
    finally:
        torch.empty = real_empty
    gen = torch.Generator().manual_seed(seed + 7919)
    fixed = []
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if torch.isnan(p).any():
                if not torch.isnan(p).all():
                    raise SystemExit(f"error: parameter {pname} is partly initialised")
                fan_in = p.shape[0] if p.dim() >= 1 else 1
                p.copy_(torch.randn(p.shape, generator=gen) * fan_in ** -0.5)
                fixed.append(pname)
    if fixed:
        log(f"initialised {len(fixed)} parameter(s) open_clip left uninitialised: {', '.join(fixed)}")
    return model


# --------------------------------------------------------------------------------------------
# export wrappers
# --------------------------------------------------------------------------------------------

class ImageEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.visual = model.visual

    def forward(self, image):
        pooled, tokens = self.visual(image)
        return F.normalize(pooled, dim=-1), tokens


class TextEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, text):
        return self.model.encode_text(text, normalize=True)


def _pooler_forward_batch_dependent(self, x):
    # Same math as AttentionalPooler.forward, but the query is made to depend on the input
    # (adding a zero derived from x), so a symbolic batch dimension flows through the graph:
    # tract cannot broadcast a constant to a symbolic batch through Expand.
    N = x.shape[0]
    x = self.ln_k(x)
    q = self.ln_q(self.query)
    zero = (x[:, :1, :1] * 0.0)
    q = q.unsqueeze(0) + zero
    return self.attn(q, x, x, need_weights=False)[0]


def export_graph(module, args_tuple, path, input_names, output_names, dynamic_axes, opset):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args_tuple, path,
            input_names=input_names, output_names=output_names,
            dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True,
            dynamo=False,
        )


def check_onnx(path):
    import onnx
    m = onnx.load(path)
    onnx.checker.check_model(m)
    return m


def ort_run(path, feeds, threads=1):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def io_spec(name, dtype, shape):
    return {"name": name, "dtype": dtype, "shape": shape}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="open_clip model config name, e.g. coca_ViT-B-32")
    src.add_argument("--config", help="a CoCa model config JSON (open_clip format)")
    ap.add_argument("--pretrained", help="open_clip pretrained tag or checkpoint file (with --model)")
    ap.add_argument("--checkpoint", help="state_dict / checkpoint file (with --config)")
    ap.add_argument("--random-init", action="store_true", help="no weights: deterministic random init")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="bundle folder to write")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--force", action="store_true", help="overwrite a non-empty --out folder")
    ap.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    args = ap.parse_args(argv)
    if args.random_init and (args.pretrained or args.checkpoint):
        ap.error("--random-init excludes --pretrained/--checkpoint")

    torch.backends.mha.set_fastpath_enabled(False)
    torch.set_grad_enabled(False)
    t0 = time.time()

    model, cfg, name, source = build_model(args)
    out = args.out
    if os.path.isdir(out) and os.listdir(out) and not args.force:
        raise SystemExit(f"error: {out} exists and is not empty (use --force)")
    os.makedirs(out, exist_ok=True)

    pp = open_clip.get_model_preprocess_cfg(model)
    size = pp["size"]
    size = size if isinstance(size, int) else size[0]
    embed_dim = cfg["embed_dim"]
    ctx = model.text.context_length if hasattr(model.text, "context_length") else cfg["text_cfg"]["context_length"]
    n_queries = model.visual.attn_pool.query.shape[0]
    tokenizer = open_clip.get_tokenizer(name)
    log(f"{name}: image {size}px, embed_dim {embed_dim}, context {ctx}, {n_queries} pooler queries")

    # ---- image encoder
    AttentionalPooler.forward = _pooler_forward_batch_dependent
    img_path = os.path.join(out, "image_encoder.onnx")
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    enc = ImageEncoder(model).eval()
    log("exporting image_encoder ...")
    export_graph(enc, (example,), img_path, ["image"], ["embedding", "tokens"],
                 {"image": {0: "batch"}, "embedding": {0: "batch"}, "tokens": {0: "batch"}}, args.opset)
    check_onnx(img_path)

    # ---- text encoder
    txt_path = os.path.join(out, "text_encoder.onnx")
    example_text = tokenizer(["a photo of a cat", "a diagram"])
    log("exporting text_encoder ...")
    export_graph(TextEncoder(model).eval(), (example_text,), txt_path, ["text"], ["embedding"],
                 {"text": {0: "batch"}, "embedding": {0: "batch"}}, args.opset)
    check_onnx(txt_path)

    # ---- verify the graphs against PyTorch with onnxruntime
    verify = {}
    if not args.no_verify:
        x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
        ref_e, ref_t = enc(x)
        got_e, got_t = ort_run(img_path, {"image": x.numpy()})
        verify["image_embedding_max_abs"] = float(np.abs(got_e - ref_e.numpy()).max())
        verify["image_tokens_max_abs"] = float(np.abs(got_t - ref_t.numpy()).max())
        t = tokenizer(["a red circle", "two small blue squares at the top", ""])
        ref = model.encode_text(t, normalize=True)
        (got,) = ort_run(txt_path, {"text": t.numpy()})
        verify["text_embedding_max_abs"] = float(np.abs(got - ref.numpy()).max())
        log("onnxruntime vs PyTorch: " + ", ".join(f"{k} {v:.2e}" for k, v in verify.items()))
        if max(verify.values()) > 1e-4:
            raise SystemExit("error: exported graphs differ from PyTorch by more than 1e-4")

    # ---- vocab
    vocab_src = os.path.join(os.path.dirname(open_clip.__file__), VOCAB_NAME)
    shutil.copyfile(vocab_src, os.path.join(out, VOCAB_NAME))

    # ---- manifest
    files = {}
    for fname in ("image_encoder.onnx", "text_encoder.onnx", VOCAB_NAME):
        p = os.path.join(out, fname)
        files[fname] = {"sha256": sha256_of(p), "size": os.path.getsize(p)}
    mean = [float(v) for v in pp["mean"]]
    std = [float(v) for v in pp["std"]]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "source": {
            **source,
            "open_clip_version": open_clip.__version__,
            "torch_version": torch.__version__,
            "command": "models/export/export.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "model_config": cfg,
        },
        "image": {
            "size": size,
            "mean": mean,
            "std": std,
            "interpolation": pp.get("interpolation", "bicubic"),
            "resize_mode": pp.get("resize_mode", "shortest"),
        },
        "text": {
            "vocab": VOCAB_NAME,
            "context_length": int(ctx),
            "vocab_size": int(cfg["text_cfg"].get("vocab_size", 49408)),
            "sot": int(tokenizer.sot_token_id),
            "eot": int(tokenizer.eot_token_id),
            "pad": int(getattr(model, "pad_id", 0)),
            "clean": "lower",
        },
        "dims": {
            "embed_dim": int(embed_dim),
            "caption_tokens": int(n_queries - 1),
            "token_dim": int(ref_t.shape[-1]) if not args.no_verify else int(embed_dim),
        },
        "logit_scale": float(model.logit_scale.exp().item()),
        "graphs": {
            "image_encoder": {
                "precisions": {"f32": "image_encoder.onnx"},
                "inputs": [io_spec("image", "f32", ["batch", 3, size, size])],
                "outputs": [io_spec("embedding", "f32", ["batch", embed_dim]),
                            io_spec("tokens", "f32", ["batch", n_queries - 1, embed_dim])],
            },
            "text_encoder": {
                "precisions": {"f32": "text_encoder.onnx"},
                "inputs": [io_spec("text", "i64", ["batch", int(ctx)])],
                "outputs": [io_spec("embedding", "f32", ["batch", embed_dim])],
            },
        },
        "verify": verify,
        "files": files,
    }
    with open(os.path.join(out, "coca.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    log(f"wrote {out} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
