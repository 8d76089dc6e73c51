#!/usr/bin/env python3
"""Trains the shipped default model: a tiny CoCa on procedural scenes, from scratch, on CPU.

open_clip's own CoCa class and loss (contrastive + captioning, lambda_cap = 2.0, lambda_con = 1.0,
as in the paper), the CLIP BPE tokenizer with a restricted output vocabulary: only the BPE tokens
the scene texts use (plus pad, start and end), so the vocab-sized embedding and output projection
stay small. The map from the model's ids to BPE ids goes into the checkpoint and from there, through
the exporter, into the bundle's manifest (text.vocab_map), which the runtime's tokenizer applies.

    models/.venv/bin/python models/train/train.py --out build/coca-scenes-train

writes checkpoint.pt (the exporter's --checkpoint), config.json (the exporter's --config),
log.csv (loss curves) and summary.json. Deterministic for a given --seed, --threads and machine.
"""

import argparse
import contextlib
import csv
import json
import math
import os
import sys
import time
from multiprocessing import Pool

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import scenes  # noqa: E402

import open_clip  # noqa: E402
from open_clip.loss import CoCaLoss  # noqa: E402

CONFIG_NAME = "coca_scenes"
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
# zero-shot labels go through this template unless the user gives others (the manifest carries it)
TEMPLATES = ["a photo of a {}."]


def model_config(vocab_size, args):
    return {
        "embed_dim": 128,
        "vision_cfg": {
            "image_size": args.image_size, "layers": 4, "width": 128, "head_width": 32,
            "patch_size": 12, "attentional_pool": True, "attn_pooler_heads": 4, "output_tokens": True,
            # 64 queries (1 contrastive + 63 captioning tokens) instead of CoCa's 256: a scene
            # has few things to say, and the decoder's cross-attention cost scales with them
            "attn_pooler_queries": 64,
        },
        "text_cfg": {
            "context_length": args.context_length, "vocab_size": vocab_size, "width": 128, "heads": 4, "layers": 2,
            "embed_cls": True, "output_tokens": True,
        },
        "multimodal_cfg": {
            "context_length": args.context_length, "vocab_size": vocab_size, "width": 128, "heads": 4, "layers": 3,
            "attn_pooler_heads": 4,
        },
        "custom_text": True,
    }


class CompactVocab:
    """Model id <-> BPE id. Model id 0 is BPE 0 (the pad id open_clip and its loss use), the scene
    words' tokens follow in BPE order, start and end of text come last (so EOT keeps the largest id,
    as in CLIP)."""

    def __init__(self, bpe):
        self.bpe = bpe
        ids = set()
        for w in scenes.all_words() + ["."]:
            ids.update(bpe.encode(w))
        ids.discard(0)
        self.to_bpe = [0] + sorted(ids) + [bpe.sot_token_id, bpe.eot_token_id]
        self.from_bpe = {b: i for i, b in enumerate(self.to_bpe)}
        self.sot, self.eot = len(self.to_bpe) - 2, len(self.to_bpe) - 1

    def __len__(self):
        return len(self.to_bpe)

    def tokenize(self, texts, ctx):
        out = torch.zeros(len(texts), ctx, dtype=torch.long)
        for i, t in enumerate(texts):
            bpe = self.bpe.encode(t)
            missing = [b for b in bpe if b not in self.from_bpe]
            if missing:
                raise ValueError(f"text {t!r} has tokens outside the vocabulary: {missing}")
            ids = [self.sot] + [self.from_bpe[b] for b in bpe][: ctx - 2] + [self.eot]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids):
        body = [self.to_bpe[i] for i in ids if i not in (0, self.sot, self.eot)]
        return self.bpe.decode(body).strip()


def _render(args):
    seed, split, size = args
    s, img = scenes.scene(seed, split, size)
    return s, np.asarray(img, dtype=np.uint8)


def make_images(n, split, size, procs, offset=0):
    with Pool(procs) as pool:
        out = pool.map(_render, [(offset + i, split, size) for i in range(n)], chunksize=256)
    attrs = [s for s, _ in out]
    imgs = np.stack([a for _, a in out])
    return attrs, imgs


def to_tensor(imgs):
    x = (imgs.astype(np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def zero_shot_prompts():
    """Per attribute: class names and, per class, the prompts averaged into its text embedding
    (one per count, since the determiner always follows the count)."""
    def per_count(fmt):
        return [fmt.format(det="a", s=""), fmt.format(det="two", s="s"), fmt.format(det="three", s="s")]
    return {
        "color": {c: per_count("a photo of {det} " + c + " shape{s}.") for c in scenes.COLORS},
        "shape": {sh: per_count("a photo of {det} " + sh + "{s}.") for sh in scenes.SHAPES},
        "size": {z: per_count("a photo of {det} " + z + " shape{s}.") for z in scenes.SIZES},
        "position": {p: per_count("a photo of {det} shape{s} " + scenes.POSITION_PHRASES[p] + ".")
                     for p in scenes.POSITIONS},
        "count": {str(n): [f"a photo of {scenes.COUNT_WORDS[n]} shape{'s' if n > 1 else ''}."] for n in scenes.COUNTS},
    }


@torch.no_grad()
def evaluate(model, vocab, attrs, imgs, ctx, captions=True):
    model.eval()
    x = to_tensor(imgs)
    img_emb = torch.cat([model.encode_image(x[i:i + 256]) for i in range(0, len(x), 256)])
    res = {}
    for attr, classes in zero_shot_prompts().items():
        names = list(classes)
        embs = []
        for name in names:
            e = model.encode_text(vocab.tokenize(classes[name], ctx))
            e = e.mean(0)
            embs.append(e / e.norm())
        pred = (img_emb @ torch.stack(embs).T).argmax(1)
        truth = [names.index(str(a[attr])) for a in attrs]
        res[f"zeroshot_{attr}"] = float((pred == torch.tensor(truth)).float().mean())
    if captions:
        exact, tok_ok, tok_n = 0, 0, 0
        for i in range(0, len(x), 64):
            gen = model.generate(x[i:i + 64], generation_type="top_k", top_k=1, seq_len=24,
                                 sot_token_id=vocab.sot, eos_token_id=vocab.eot, pad_token_id=0)
            for j, row in enumerate(gen.tolist()):
                a = attrs[i + j]
                text = vocab.decode(row)
                exact += text in scenes.valid_captions(a)
                truth = scenes.canonical_caption(a).split()
                words = text.split()
                tok_ok += sum(1 for k, w in enumerate(truth) if k < len(words) and words[k] == w)
                tok_n += len(truth)
        res["caption_exact"] = exact / len(x)
        res["caption_word_acc"] = tok_ok / tok_n
    model.train()
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--train-images", type=int, default=40000)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--context-length", type=int, default=16,
                    help="text positions; the longest scene text is 12 BPE tokens plus start and end, so 16 "
                         "fits all and costs half the text side of CLIP's 32")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                    help="bf16: autocast the towers to bfloat16 (open_clip's amp_bf16) with the losses in "
                         "fp32; about 1.3x faster steps on a CPU with AVX512-BF16 (0.52 vs 0.68 s here), the exported model is fp32 either way")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--hard-negatives", type=int, default=4,
                    help="group size G: batches are made of groups of G scenes that share color, position "
                         "and count (differing in shape and size), 0 for uniform batches")
    ap.add_argument("--uniform-fraction", type=float, default=0.0,
                    help="with --hard-negatives: this fraction of each batch is drawn uniformly instead "
                         "(keeps the contrast on the attributes the groups share)")
    ap.add_argument("--group-shapes", choices=["random", "distinct"], default="random",
                    help="with --hard-negatives: random draws a group's members at random from its bucket, so "
                         "two members often have the same shape and size and hence the same caption (a false "
                         "negative for the contrastive loss); distinct gives every member of a group its own shape")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()

    bpe = open_clip.tokenizer.SimpleTokenizer()
    vocab = CompactVocab(bpe)
    cfg = model_config(len(vocab), args)
    cfg_path = os.path.join(args.out, f"{CONFIG_NAME}.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    open_clip.add_model_config(cfg_path)
    model = open_clip.create_model(CONFIG_NAME, device="cpu")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters, vocabulary {len(vocab)} tokens", flush=True)

    print(f"rendering {args.train_images} training scenes ...", flush=True)
    attrs, imgs = make_images(args.train_images, "train", args.image_size, args.threads)
    val_attrs, val_imgs = make_images(512, "test", args.image_size, args.threads, offset=10_000_000)
    print(f"  done in {time.time() - t0:.0f}s", flush=True)
    ctx = cfg["text_cfg"]["context_length"]

    loss_fn = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * 0.5 * (1 + math.cos(math.pi * t))

    text_rng = __import__("random").Random(args.seed)
    log_path = os.path.join(args.out, "log.csv")
    logf = open(log_path, "w", newline="")
    log = csv.writer(logf)
    log.writerow(["step", "seconds", "lr", "loss", "contrastive_loss", "caption_loss"])
    model.train()
    order = rng.permutation(len(imgs))
    pos = 0
    # hard negatives: color, position and count tell most scenes of a uniform batch apart, so the
    # contrastive loss alone would barely need shape and size. Batches of groups that share
    # those three make the image embedding carry shape and size too.
    buckets = {}
    for i, a in enumerate(attrs):
        buckets.setdefault((a["color"], a["position"], a["count"]), []).append(i)
    bucket_keys = sorted(buckets)
    by_shape = {k: {} for k in bucket_keys}
    for k in bucket_keys:
        for i in buckets[k]:
            by_shape[k].setdefault(attrs[i]["shape"], []).append(i)

    def draw_group(key, n):
        if args.group_shapes == "distinct":
            shapes = sorted(by_shape[key])
            pick = rng.choice(len(shapes), size=min(n, len(shapes)), replace=False)
            return [int(rng.choice(by_shape[key][shapes[j]])) for j in pick]
        members = buckets[key]
        pick = rng.choice(len(members), size=min(n, len(members)), replace=False)
        return [members[j] for j in pick]

    def grouped_batch():
        g = args.hard_negatives
        n_uniform = int(round(args.uniform_fraction * args.batch))
        out = list(rng.choice(len(attrs), size=n_uniform, replace=False)) if n_uniform else []
        while len(out) < args.batch:
            out.extend(draw_group(bucket_keys[rng.integers(len(bucket_keys))], min(g, args.batch - len(out))))
        return np.array(out)
    def autocast():
        if args.precision == "fp32":
            return contextlib.nullcontext()
        # PyTorch's CPU flash-attention kernel is slower than the plain product for these short
        # sequences (16-65 tokens); with bf16 the plain one is what makes the step faster
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        return stack

    evals = []
    t_train = time.time()
    for step in range(args.steps):
        if args.hard_negatives > 1:
            idx = grouped_batch()
        else:
            if pos + args.batch > len(order):
                order, pos = rng.permutation(len(imgs)), 0
            idx = order[pos:pos + args.batch]
            pos += args.batch
        x = to_tensor(imgs[idx])
        text = vocab.tokenize([scenes.texts_for(attrs[i], text_rng) for i in idx], ctx)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with autocast():
            out = model(x, text)
        con, cap = loss_fn(out["image_features"].float(), out["text_features"].float(), out["logits"].float(),
                           out["labels"], out["logit_scale"])
        loss = con + cap
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        log.writerow([step, round(time.time() - t_train, 1), f"{lr_at(step):.6g}", f"{loss.item():.5f}",
                      f"{con.item():.5f}", f"{cap.item():.5f}"])
        if step % 50 == 0:
            logf.flush()
            el = time.time() - t_train
            print(f"step {step}/{args.steps}  loss {loss.item():.3f} (con {con.item():.3f}, cap {cap.item():.3f})"
                  f"  {el:.0f}s elapsed, ~{el / (step + 1) * (args.steps - step - 1) / 60:.1f} min left", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            r = evaluate(model, vocab, val_attrs, val_imgs, ctx, captions=(step + 1 == args.steps or (step + 1) % (2 * args.eval_every) == 0))
            r["step"] = step + 1
            evals.append(r)
            print("  eval (PyTorch, 512 held-out scenes): " + ", ".join(f"{k} {v:.3f}" for k, v in r.items() if k != "step"), flush=True)
    logf.close()
    train_s = time.time() - t_train

    ckpt = os.path.join(args.out, "checkpoint.pt")
    torch.save({
        "state_dict": model.state_dict(),
        "coca_edge": {"vocab_map": vocab.to_bpe, "sot": vocab.sot, "eot": vocab.eot, "pad": 0,
                      "templates": TEMPLATES},
    }, ckpt)
    summary = {
        "command": "models/train/train.py " + " ".join(sys.argv[1:]),
        "parameters": n_params, "vocabulary": len(vocab), "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t0, 1), "torch_threads": args.threads, "precision": args.precision,
        "torch_version": torch.__version__, "open_clip_version": open_clip.__version__,
        "evals": evals,
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {ckpt}; training took {train_s / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
