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
import json
import os
import shutil
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bundle_files import logger, sha256_of  # noqa: E402

import numpy as np
import torch
import torch.nn.functional as F

import open_clip
from open_clip.transformer import AttentionalPooler

FORMAT = "coca-edge-bundle"
FORMAT_VERSION = 1
VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"


log = logger("export")


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
    if cfg["text_cfg"].get("hf_model_name"):
        raise SystemExit(f"error: '{name}' uses a Hugging Face text tower ({cfg['text_cfg']['hf_model_name']}): "
                         "only open_clip's own TextTransformer is supported")
    if width_t != width_m:
        raise SystemExit(f"error: CoCa needs text width == multimodal width (the decoder reads the text "
                         f"tower's token embeddings), got {width_t} and {width_m}")

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
    eot_scale = getattr(args, "eot_scale", None)
    if eot_scale is not None:
        if not args.random_init:
            raise SystemExit("error: --eot-scale is for random-init test bundles only")
        # random decoders almost never emit EOT, which leaves beam search's finishing path
        # untested; scaling EOT's output column makes it win at some steps
        with torch.no_grad():
            model.text_decoder.text_projection[:, 49407] *= eot_scale
        source["eot_scale"] = eot_scale
        log(f"test bundle: EOT logit column scaled by {eot_scale}")
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
    """embedding, captioning tokens; with frozen=True also the ViT's token output before the
    attentional pooler (what attentional-pooler heads are trained on), the same computation as
    open_clip's VisionTransformer.forward."""
    def __init__(self, model, frozen=False):
        super().__init__()
        self.visual = model.visual
        self.frozen = frozen

    def forward(self, image):
        if not self.frozen:
            pooled, tokens = self.visual(image)
            return F.normalize(pooled, dim=-1), tokens
        v = self.visual
        x = v.transformer(v._embeds(image))
        pooled, tokens = v._pool(x)
        if v.proj is not None:
            pooled = pooled @ v.proj
        return F.normalize(pooled, dim=-1), tokens, x


class TextEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, text):
        return self.model.encode_text(text, normalize=True)


def _proj(attn, x, which):
    """q (0), k (1) or v (2) projection of an nn.MultiheadAttention with packed weights."""
    d = attn.embed_dim
    w = attn.in_proj_weight[which * d:(which + 1) * d]
    b = attn.in_proj_bias[which * d:(which + 1) * d] if attn.in_proj_bias is not None else None
    return F.linear(x, w, b)


def _heads(x, n_heads):
    """[B, T, D] -> [B, H, T, D/H]"""
    return x.reshape(x.shape[0], x.shape[1], n_heads, x.shape[2] // n_heads).transpose(1, 2)


def _attend(attn, q, k, v, mask):
    """softmax(q k^T / sqrt(hd) + mask) v, heads merged, output projection."""
    hd = q.shape[-1]
    s = torch.matmul(q, k.transpose(-1, -2)) * (hd ** -0.5)
    if mask is not None:
        s = s + mask
    o = torch.matmul(s.softmax(dim=-1), v)
    o = o.transpose(1, 2)
    o = o.reshape(o.shape[0], o.shape[1], o.shape[2] * o.shape[3])
    return attn.out_proj(o)


class CrossKV(torch.nn.Module):
    """Captioning tokens [1,N,D] -> keys/values of every multimodal cross-attention layer,
    [layers, 2, 1, heads, N, head_dim]: ln_1_kv then the k/v projections. Once per image."""

    def __init__(self, model):
        super().__init__()
        self.dec = model.text_decoder

    def forward(self, tokens):
        out = []
        for blk in self.dec.cross_attn:
            h = blk.attn.num_heads
            kv = blk.ln_1_kv(tokens)
            out.append(torch.stack([_heads(_proj(blk.attn, kv, 1), h), _heads(_proj(blk.attn, kv, 2), h)]))
        return torch.stack(out)


class DecoderStep(torch.nn.Module):
    """One KV-cached step of CoCa's captioning path, written over open_clip's own modules.

    ids [B,S] (new tokens), key_mask [B,P+S] (additive, 0 or -inf: open_clip's legacy pad mask
    of the unimodal tower, key j masked when token j-1 is the pad id 0), self_kv
    [Lt+Lm, 2, B, H, P, hd] (self-attention caches: unimodal text layers, then multimodal
    layers), cross_kv [Lm, 2, 1, H, N, hd] (from cross_kv, shared by the B beams of one image)
    -> logits [B, V] of the last new position, self_kv_out [Lt+Lm, 2, B, H, P+S, hd].
    Positions are P + arange(S); the CLS token of the unimodal tower is not part of decoding
    (it is appended after the text and the mask is causal, so it never affects the tokens)."""

    def __init__(self, model):
        super().__init__()
        self.text = model.text
        self.dec = model.text_decoder

    def forward(self, ids, key_mask, self_kv, cross_kv):
        past = self_kv.shape[4]
        pos = torch.arange(ids.shape[1]) + past
        x = self.text.token_embedding(ids) + self.text.positional_embedding[pos]
        kpos = torch.arange(key_mask.shape[1])
        causal = torch.zeros(pos.shape[0], kpos.shape[0]).masked_fill(kpos[None, :] > pos[:, None], float("-inf"))
        uni_mask = causal[None, None] + key_mask[:, None, None, :]
        dec_mask = causal[None, None]
        new_kv = []
        layer = 0
        for blk in self.text.transformer.resblocks:
            x, kv = self._self_block(blk, x, self_kv[layer], uni_mask)
            new_kv.append(kv)
            layer += 1
        for blk, cblk in zip(self.dec.resblocks, self.dec.cross_attn):
            x, kv = self._self_block(blk, x, self_kv[layer], dec_mask)
            new_kv.append(kv)
            m = layer - len(self.text.transformer.resblocks)
            q = _heads(_proj(cblk.attn, cblk.ln_1(x), 0), cblk.attn.num_heads)
            x = x + cblk.ls_1(_attend(cblk.attn, q, cross_kv[m, 0], cross_kv[m, 1], None))
            x = x + cblk.ls_2(cblk.mlp(cblk.ln_2(x)))
            layer += 1
        last = x[:, -1]
        logits = self.dec.ln_final(last) @ self.dec.text_projection
        return logits, torch.stack(new_kv)

    @staticmethod
    def _self_block(blk, x, cache, mask):
        h = blk.attn.num_heads
        y = blk.ln_1(x)
        q = _heads(_proj(blk.attn, y, 0), h)
        k = torch.cat([cache[0], _heads(_proj(blk.attn, y, 1), h)], dim=2)
        v = torch.cat([cache[1], _heads(_proj(blk.attn, y, 2), h)], dim=2)
        x = x + blk.ls_1(_attend(blk.attn, q, k, v, mask))
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        return x, torch.stack([k, v])


def legacy_key_mask(ids_full, pad_id):
    """open_clip's legacy CoCa pad mask for keys 0..T-1 of a token sequence [B,T] (additive)."""
    valid = torch.cat([torch.ones_like(ids_full[:, :1], dtype=torch.bool), ids_full[:, :-1] != pad_id], dim=1)
    return torch.zeros(valid.shape).masked_fill(~valid, float("-inf"))


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


def checkpoint_meta(path):
    """coca-edge's own metadata stored beside a state_dict (models/train/train.py writes it):
    a restricted vocabulary (vocab_map: model id -> BPE id, and sot/eot/pad as model ids) and
    the prompt templates the model was trained to read. {} for plain checkpoints."""
    if not path or not os.path.isfile(path):
        return {}
    ck = torch.load(path, map_location="cpu", weights_only=True)
    meta = ck.get("coca_edge", {}) if isinstance(ck, dict) else {}
    if meta.get("vocab_map") is not None:
        vm = meta["vocab_map"]
        if len(set(vm)) != len(vm) or vm[meta["sot"]] != 49406 or vm[meta["eot"]] != 49407 or vm[meta["pad"]] != 0:
            raise SystemExit(f"error: {path}: inconsistent vocab_map / sot / eot / pad")
    return meta


class ModelTokenizer:
    """open_clip's tokenizer speaking the model's ids (a restricted vocabulary maps BPE ids;
    BPE tokens outside it are dropped: verification texts only)."""

    def __init__(self, tokenizer, meta):
        self.tok = tokenizer
        self.map = meta.get("vocab_map")
        if self.map is None:
            self.sot, self.eot, self.vocab_size = tokenizer.sot_token_id, tokenizer.eot_token_id, tokenizer.vocab_size
        else:
            self.inv = {b: i for i, b in enumerate(self.map)}
            self.sot, self.eot, self.vocab_size = meta["sot"], meta["eot"], len(self.map)

    def ids(self, bpe_ids):
        return list(bpe_ids) if self.map is None else [self.inv[b] for b in bpe_ids if b in self.inv]

    def __call__(self, texts):
        rows = self.tok(texts)
        if self.map is None:
            return rows
        out = torch.zeros_like(rows)
        for i, row in enumerate(rows.tolist()):
            ids = self.ids([b for b in row if b != 0])
            out[i, :len(ids)] = torch.tensor(ids, dtype=out.dtype)
        return out


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
    ap.add_argument("--eot-scale", type=float, default=None,
                    help="random-init test bundles: scale the decoder's EOT output column so captions end")
    ap.add_argument("--out", required=True, help="bundle folder to write")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--force", action="store_true", help="overwrite a non-empty --out folder")
    ap.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    ap.add_argument("--frozen-tokens", action="store_true",
                    help="add the image encoder's token output before the attentional pooler as a third "
                         "output (frozen_tokens), for attentional-pooler heads (models/train/train_ap_head.py)")
    ap.add_argument("--caption-search", choices=["beam", "greedy"], default=None,
                    help="the model's default caption search, when the user names none (default: the "
                         "runtime's, open_clip's beam search); greedy suits models trained on several "
                         "phrasings, where beam search favours the generic ones")
    args = ap.parse_args(argv)
    if args.random_init and (args.pretrained or args.checkpoint):
        ap.error("--random-init excludes --pretrained/--checkpoint")

    torch.backends.mha.set_fastpath_enabled(False)
    torch.set_grad_enabled(False)
    t0 = time.time()

    model, cfg, name, source = build_model(args)
    meta = checkpoint_meta(args.checkpoint)
    out = args.out
    if os.path.isdir(out) and os.listdir(out) and not args.force:
        raise SystemExit(f"error: {out} exists and is not empty (use --force)")
    os.makedirs(out, exist_ok=True)

    pp = open_clip.get_model_preprocess_cfg(model)
    size = pp["size"]
    size = size if isinstance(size, int) else size[0]
    embed_dim = cfg["embed_dim"]
    ctx = model.text.context_length if hasattr(model.text, "context_length") else cfg["text_cfg"]["context_length"]
    tokenizer = ModelTokenizer(open_clip.get_tokenizer(name), meta)
    with torch.no_grad():
        _, probe_tokens = model.visual(torch.zeros(1, 3, size, size))
    n_tokens, token_dim = int(probe_tokens.shape[1]), int(probe_tokens.shape[2])
    text_width = int(cfg["text_cfg"]["width"])
    pooler = "attentional pooler" if getattr(model.visual, "attn_pool", None) is not None else "patch tokens"
    log(f"{name}: image {size}px, embed_dim {embed_dim}, context {ctx}, {n_tokens} captioning tokens "
        f"({pooler}) of width {token_dim}")
    if token_dim != text_width:
        raise SystemExit(f"error: captioning tokens have width {token_dim}, the decoder {text_width}")

    # ---- image encoder
    AttentionalPooler.forward = _pooler_forward_batch_dependent
    img_path = os.path.join(out, "image_encoder.onnx")
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    enc = ImageEncoder(model, args.frozen_tokens).eval()
    log("exporting image_encoder ...")
    img_outputs = ["embedding", "tokens"] + (["frozen_tokens"] if args.frozen_tokens else [])
    export_graph(enc, (example,), img_path, ["image"], img_outputs, {k: {0: "batch"} for k in ["image"] + img_outputs}, args.opset)
    if args.frozen_tokens:
        frozen_shape = [int(d) for d in enc(torch.zeros(1, 3, size, size))[2].shape[1:]]
    check_onnx(img_path)

    # ---- text encoder
    txt_path = os.path.join(out, "text_encoder.onnx")
    example_text = tokenizer(["a photo of a cat", "a diagram"])
    log("exporting text_encoder ...")
    export_graph(TextEncoder(model).eval(), (example_text,), txt_path, ["text"], ["embedding"],
                 {"text": {0: "batch"}, "embedding": {0: "batch"}}, args.opset)
    check_onnx(txt_path)

    # ---- captioning graphs: cross K/V once per image, one KV-cached decoder step
    text_blocks = list(model.text.transformer.resblocks)
    dec_blocks = list(model.text_decoder.resblocks)
    heads = {b.attn.num_heads for b in text_blocks + dec_blocks + list(model.text_decoder.cross_attn)}
    if len(heads) != 1:
        raise SystemExit(f"error: text and multimodal heads differ ({sorted(heads)}): unsupported")
    n_heads = heads.pop()
    head_dim = text_width // n_heads
    n_self, n_cross = len(text_blocks) + len(dec_blocks), len(dec_blocks)
    vocab_out = int(model.text_decoder.text_projection.shape[1])
    pad_id = int(getattr(model, "pad_id", 0))
    pad_mask = ("correct" if getattr(model.text, "correct_cls_mask", False) else "legacy") \
        if (model.text.cls_emb is not None or getattr(model.text, "use_pad_mask", False)) else "none"
    if pad_mask == "correct":
        raise SystemExit("error: correct_cls_mask CoCa text towers are not supported yet")
    cross = CrossKV(model).eval()
    step = DecoderStep(model).eval()
    ck_path = os.path.join(out, "cross_kv.onnx")
    step_path = os.path.join(out, "decoder_step.onnx")
    with torch.no_grad():
        ex_tokens = enc(example[:1])[1]
    log("exporting cross_kv ...")
    export_graph(cross, (ex_tokens,), ck_path, ["tokens"], ["cross_kv"], None, args.opset)
    check_onnx(ck_path)
    ex_cross = cross(ex_tokens)
    g = torch.Generator().manual_seed(3)
    ex_b, ex_s, ex_p = 2, 3, 5
    ex_ids = torch.randint(1, tokenizer.vocab_size - 2, (ex_b, ex_s), generator=g)
    ex_mask = torch.zeros(ex_b, ex_p + ex_s)
    ex_kv = torch.randn(n_self, 2, ex_b, n_heads, ex_p, head_dim, generator=g)
    log("exporting decoder_step ...")
    export_graph(step, (ex_ids, ex_mask, ex_kv, ex_cross), step_path, ["ids", "key_mask", "self_kv", "cross_kv"],
                 ["logits", "self_kv_out"],
                 {"ids": {0: "batch", 1: "step"}, "key_mask": {0: "batch", 1: "total"},
                  "self_kv": {2: "batch", 4: "past"}, "logits": {0: "batch"},
                  "self_kv_out": {2: "batch", 4: "total"}}, args.opset)
    check_onnx(step_path)

    # ---- verify the graphs against PyTorch with onnxruntime
    verify = {}
    if not args.no_verify:
        x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
        refs = enc(x)
        gots = ort_run(img_path, {"image": x.numpy()})
        verify["image_embedding_max_abs"] = float(np.abs(gots[0] - refs[0].numpy()).max())
        verify["image_tokens_max_abs"] = float(np.abs(gots[1] - refs[1].numpy()).max())
        if args.frozen_tokens:
            verify["image_frozen_tokens_max_abs"] = float(np.abs(gots[2] - refs[2].numpy()).max())
        t = tokenizer(["a red circle", "two small blue squares at the top", ""])
        ref = model.encode_text(t, normalize=True)
        (got,) = ort_run(txt_path, {"text": t.numpy()})
        verify["text_embedding_max_abs"] = float(np.abs(got - ref.numpy()).max())
        # the cached step against open_clip's own full forward (teacher forcing), with a pad
        # id 0 inside the text so the legacy pad mask is exercised
        x1 = x[:1]
        lat, embs = model._encode_image(x1)
        # "a cat<pad>of a dog." (BPE ids), or in a restricted vocabulary its ids 1..7 in turn
        body = [320, 1929, 0, 539, 320, 2533, 269] if tokenizer.map is None else [1, 2, 0, 3, 4, 5, 6]
        seq = torch.tensor([[tokenizer.sot] + [b % (tokenizer.vocab_size - 2) for b in body]])
        full = model(x1, seq, image_latent=lat, image_embs=embs, output_labels=False)["logits"][:, -1]
        ckv = cross(embs)
        kv = torch.zeros(n_self, 2, 1, n_heads, 0, head_dim)
        for a, b in ((0, 3), (3, 4), (4, 5), (5, 8)):
            logits, kv = step(seq[:, a:b], legacy_key_mask(seq[:, :b], pad_id), kv, ckv)
        verify["step_vs_full_forward_max_abs"] = float((logits - full).abs().max())
        # the exported graphs against the modules
        (got_ck,) = ort_run(ck_path, {"tokens": embs.numpy()})
        verify["cross_kv_max_abs"] = float(np.abs(got_ck - ckv.numpy()).max())
        kv_p = kv[:, :, :, :, :5]
        ref_l, ref_kv = step(seq[:, 5:8], legacy_key_mask(seq, pad_id), kv_p, ckv)
        got_l, got_kv = ort_run(step_path, {"ids": seq[:, 5:8].numpy(), "key_mask": legacy_key_mask(seq, pad_id).numpy(),
                                            "self_kv": kv_p.numpy(), "cross_kv": ckv.numpy()})
        verify["decoder_step_logits_max_abs"] = float(np.abs(got_l - ref_l.numpy()).max())
        verify["decoder_step_kv_max_abs"] = float(np.abs(got_kv - ref_kv.numpy()).max())
        log("onnxruntime vs PyTorch: " + ", ".join(f"{k} {v:.2e}" for k, v in verify.items()))
        if max(verify.values()) > 1e-4:
            raise SystemExit("error: exported graphs differ from PyTorch by more than 1e-4")

    # ---- vocab
    vocab_src = os.path.join(os.path.dirname(open_clip.__file__), VOCAB_NAME)
    shutil.copyfile(vocab_src, os.path.join(out, VOCAB_NAME))

    # ---- manifest
    files = {}
    for fname in ("image_encoder.onnx", "text_encoder.onnx", "cross_kv.onnx", "decoder_step.onnx", VOCAB_NAME):
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
            "vocab_size": int(tokenizer.vocab_size),
            "sot": int(tokenizer.sot),
            "eot": int(tokenizer.eot),
            "pad": int(getattr(model, "pad_id", 0)),
            "clean": "lower",
            "pad_mask": pad_mask,
            **({"vocab_map": [int(b) for b in tokenizer.map]} if tokenizer.map is not None else {}),
        },
        "decoder": {
            "self_layers": n_self,
            "text_layers": len(text_blocks),
            "cross_layers": n_cross,
            "heads": n_heads,
            "head_dim": head_dim,
            "vocab_size": vocab_out,
            "max_positions": int(model.text.positional_embedding.shape[0]),
        },
        "dims": {
            "embed_dim": int(embed_dim),
            "caption_tokens": n_tokens,
            "token_dim": token_dim,
        },
        "logit_scale": float(model.logit_scale.exp().item()),
        "graphs": {
            "image_encoder": {
                "precisions": {"f32": "image_encoder.onnx"},
                "inputs": [io_spec("image", "f32", ["batch", 3, size, size])],
                "outputs": [io_spec("embedding", "f32", ["batch", embed_dim]),
                            io_spec("tokens", "f32", ["batch", n_tokens, token_dim])]
                           + ([io_spec("frozen_tokens", "f32", ["batch"] + frozen_shape)] if args.frozen_tokens else []),
            },
            "text_encoder": {
                "precisions": {"f32": "text_encoder.onnx"},
                "inputs": [io_spec("text", "i64", ["batch", int(ctx)])],
                "outputs": [io_spec("embedding", "f32", ["batch", embed_dim])],
            },
            "cross_kv": {
                "precisions": {"f32": "cross_kv.onnx"},
                "inputs": [io_spec("tokens", "f32", [1, n_tokens, token_dim])],
                "outputs": [io_spec("cross_kv", "f32", [n_cross, 2, 1, n_heads, n_tokens, head_dim])],
            },
            "decoder_step": {
                "precisions": {"f32": "decoder_step.onnx"},
                "inputs": [io_spec("ids", "i64", ["batch", "step"]),
                           io_spec("key_mask", "f32", ["batch", "past+step"]),
                           io_spec("self_kv", "f32", [n_self, 2, "batch", n_heads, "past", head_dim]),
                           io_spec("cross_kv", "f32", [n_cross, 2, 1, n_heads, n_tokens, head_dim])],
                "outputs": [io_spec("logits", "f32", ["batch", vocab_out]),
                            io_spec("self_kv_out", "f32", [n_self, 2, "batch", n_heads, "past+step", head_dim])],
            },
        },
        "verify": verify,
        "files": files,
    }
    if args.frozen_tokens:
        manifest["dims"]["frozen_tokens"] = frozen_shape
    if meta.get("templates"):
        manifest["classify"] = {"templates": list(meta["templates"])}
    if args.caption_search:
        manifest["caption"] = {"search": args.caption_search}
    with open(os.path.join(out, "coca.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    log(f"wrote {out} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
