#!/usr/bin/env python3
"""Add int8 and f16 variants of a bundle's graphs, in the forms tract runs fast and correctly.

    models/.venv/bin/python models/export/quantize.py BUNDLE --precision int8[,f16]
        [--graphs image_encoder] [--calib-images DIR]

int8, two designs (docs/precision.md measures them), chosen per graph by --int8-design:

"sym-w8" (default for decoder_step, a matrix-vector product per token at batch 1, bound by
the bytes of its weights): int8 weights, f32 activations, see quantize_w8.

"dyn-q8" (--int8-design dq8): int8 weights, activations quantised at run time per tensor
(DynamicQuantizeLinear -> MatMulInteger), see quantize_dq8: the decoder step in 8-bit dot
products (SDOT) on the Cortex-A76/A78 boards.

"sym-mmi" (default for the image encoder, whose products have a row per patch):
every matrix product with a constant weight (MatMul, Gemm) becomes

    x -> QuantizeLinear(x, s_x, 0) -> MatMulInteger(q, W8, 0, 0) -> Cast(f32) -> Mul(s_x * s_w) [-> Add(bias)]

- weights: int8, symmetric, one scale per output channel (s_w = max|W[:, n]| / 127);
- activations: int8, symmetric, one scale per tensor (s_x = max|x| / 127 over the calibration
  images), so every zero point is the constant 0 and tract's zero-point correction sums fold
  away at load time (its einsum codegen wires them, its declutter removes products by 0);
- LayerNorm, Softmax, GELU, the attention products between activations and the patch
  convolution stay f32: no Q/DQ pair ever surrounds a Softmax (tract 0.23.9 folds such a chain
  into an element-wise lookup table and miscomputes it; tests/precision.rs keeps an eye on it).

Weight-only or onnxruntime-made QDQ graphs were measured too and are slower in tract (they
dequantise large weights at every run); see docs/precision.md.

f16: every float initializer and op in f16, inputs and outputs kept f32 (a Cast at each
boundary), so the manifest's tensor specs are unchanged. tract picks fp16 kernels on ARMv8.2
cores (Cortex-A76/A78); the runtime declines f16 elsewhere.

Calibration images: --calib-images (default: tests/fixtures/images, the recorded sample set),
each preprocessed as the bundle's manifest says, plus a mirrored, shifted copy.
"""

import argparse
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bundle_files import logger, sha256_of  # noqa: E402

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
METHOD = "sym-mmi"


log = logger("quantize")


# ---------------------------------------------------------------- calibration data

def preprocess(path, image_cfg, flip=False, shift=0):
    """The bundle's preprocessing (resize shortest side, bicubic, centre crop, normalise)."""
    from PIL import Image
    size = int(image_cfg["size"])
    mean = np.array(image_cfg["mean"], np.float32)
    std = np.array(image_cfg["std"], np.float32)
    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left = min(max((w - size) // 2 + shift, 0), w - size)
    top = (h - size) // 2
    im = im.crop((left, top, left + size, top + size))
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    a = (np.asarray(im, np.float32) / 255.0 - mean) / std
    return a.transpose(2, 0, 1)[None].copy()


def image_files(folder):
    exts = ("*.jpg", "*.jpeg", "*.png", "*.webp", "*.bmp", "*.tif", "*.gif")
    files = sorted({f for e in exts for f in glob.glob(os.path.join(folder, e))})
    if not files:
        raise SystemExit(f"error: no calibration images in {folder}")
    return files


def image_calibration(manifest, folder):
    feeds = []
    for p in image_files(folder):
        try:
            feeds.append(preprocess(p, manifest["image"]))
            feeds.append(preprocess(p, manifest["image"], flip=True, shift=-16))
        except Exception as e:  # an unreadable file is skipped, not fatal
            log(f"skipping {p}: {e}")
    return [{"image": x} for x in feeds]


def captioning_tokens(bundle, manifest, image_feeds):
    """cross_kv inputs: the f32 image encoder's captioning tokens of the calibration images."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    enc = ort.InferenceSession(os.path.join(bundle, manifest["graphs"]["image_encoder"]["precisions"]["f32"]), so,
                               providers=["CPUExecutionProvider"])
    return [{"tokens": enc.run(None, feed)[1]} for feed in image_feeds]


def decoder_calibration(bundle, manifest, image_feeds, n_images=12, steps=20):
    """decoder_step inputs met while greedily captioning calibration images with the f32
    graphs (onnxruntime): the prompt step and every later one, with real caches."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    g = manifest["graphs"]
    sess = {k: ort.InferenceSession(os.path.join(bundle, g[k]["precisions"]["f32"]), so, providers=["CPUExecutionProvider"])
            for k in ("image_encoder", "cross_kv", "decoder_step")}
    dec = manifest["decoder"]
    sot, eot = int(manifest["text"]["sot"]), int(manifest["text"]["eot"])
    # (with a restricted vocabulary, text.vocab_map, the manifest's sot and eot are already the
    # decoder's own ids)
    # never past the decoder's positions (a short-context model, such as the shipped default,
    # has fewer than `steps`)
    steps = min(steps, int(dec.get("max_positions", steps)))
    feeds = []
    for feed in image_feeds[: 2 * n_images : 2]:
        tokens = sess["image_encoder"].run(None, feed)[1]
        ckv = sess["cross_kv"].run(None, {"tokens": tokens})[0]
        kv = np.zeros((dec["self_layers"], 2, 1, dec["heads"], 0, dec["head_dim"]), np.float32)
        ids = np.array([[sot]], np.int64)
        for _ in range(steps):
            f = {"ids": ids, "key_mask": np.zeros((1, kv.shape[4] + ids.shape[1]), np.float32),
                 "self_kv": kv, "cross_kv": ckv}
            feeds.append(f)
            logits, kv = sess["decoder_step"].run(None, f)
            nxt = int(logits[0].argmax())
            if nxt == eot:
                break
            ids = np.array([[nxt]], np.int64)
    return feeds


# ---------------------------------------------------------------- int8 rewrite

def weight_matmuls(model):
    """(node, K x N float weight, bias input or None) for every product with a constant weight."""
    inits = {i.name: i for i in model.graph.initializer}
    found = []
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            found.append((n, numpy_helper.to_array(inits[n.input[1]]), None))
        elif n.op_type == "Gemm" and n.input[1] in inits:
            a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
            if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                continue
            w = numpy_helper.to_array(inits[n.input[1]])
            if a.get("transB", 0):
                w = w.T
            found.append((n, np.ascontiguousarray(w), n.input[2] if len(n.input) > 2 and n.input[2] else None))
    return found


def activation_ranges(model_path, names, feeds):
    """max |x| of each named tensor over the calibration feeds (onnxruntime, all outputs);
    `model_path` is a file or a ModelProto (copied, not changed)."""
    import onnxruntime as ort
    if isinstance(model_path, onnx.ModelProto):
        m = onnx.ModelProto()
        m.CopyFrom(model_path)
    else:
        m = onnx.load(model_path)
    have = {o.name for o in m.graph.output}
    for name in names:
        if name not in have:
            m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs = [o.name for o in sess.get_outputs()]
    idx = [outs.index(n) for n in names]
    amax = np.zeros(len(names), np.float64)
    t0 = time.time()
    for i, feed in enumerate(feeds):
        res = sess.run(None, feed)
        for j, k in enumerate(idx):
            amax[j] = max(amax[j], float(np.abs(res[k]).max()))
        if time.time() - t0 > 5 and i % 10 == 0:
            log(f"  calibration {i + 1}/{len(feeds)}")
    return dict(zip(names, amax))


def save_rewritten(model, replaced, used_weights, new_inits, dst):
    """Put each replaced product's nodes in its place, drop the float weights nothing uses any
    more, add the new initializers, check and save."""
    graph_nodes = []
    for n in model.graph.node:
        graph_nodes.extend(replaced.get(id(n), [n]))
    del model.graph.node[:]
    model.graph.node.extend(graph_nodes)
    still = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name not in used_weights or i.name in still]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + new_inits)
    onnx.checker.check_model(model)
    onnx.save(model, dst)


def patch_convs_to_matmul(model):
    """Each patch embedding (a Conv whose strides equal its kernel: no padding, dilation or
    groups, constant weight, input of static height and width) as the same product written as a
    MatMul over the image's patches, so the int8 designs quantize it like every other product:

        x [B, C, H, W] -> Reshape [B, C, H/kh, kh, W/kw, kw] -> Transpose (0, 2, 4, 1, 3, 5)
          -> Reshape [B, patches, C·kh·kw] -> MatMul (W as [C·kh·kw, C_out]) [-> Add bias]
          -> Transpose (0, 2, 1) -> Reshape [B, C_out, H/kh, W/kw]

    (the ViT's conv1: 115 M of a B/32 image's 4.6 G multiply-adds, left in f32 it cost about
    40 M of the Cortex-A76's 478 M int8 instructions per image, in tract's f32 kernel and its
    im2col). The same numbers in f32: only the order of the sums changes. Returns how many."""
    inits = {i.name: i for i in model.graph.initializer}
    shapes = {}
    for vi in list(model.graph.input) + list(model.graph.value_info):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    out_nodes, n_conv = [], 0
    for n in model.graph.node:
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        w = inits.get(n.input[1]) if n.op_type == "Conv" and len(n.input) > 1 else None
        dims = shapes.get(n.input[0]) if w is not None else None
        if w is None or len(w.dims) != 4 or not dims or len(dims) != 4 or None in dims[1:]:
            out_nodes.append(n)
            continue
        co, ci, kh, kw = w.dims
        _, c, h, wd = dims
        ok = (list(a.get("strides", [1, 1])) == [kh, kw] and a.get("group", 1) == 1 and all(p == 0 for p in a.get("pads", [0] * 4))
              and all(d == 1 for d in a.get("dilations", [1, 1])) and a.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET", b"VALID", "VALID")
              and c == ci and h % kh == 0 and wd % kw == 0)
        if not ok:
            out_nodes.append(n)
            continue
        gh, gw = h // kh, wd // kw
        t = f"{n.name or n.output[0]}/patches".replace("/", "_")
        wm = numpy_helper.to_array(w).reshape(co, ci * kh * kw).T.copy()
        model.graph.initializer.extend([
            numpy_helper.from_array(np.array([0, ci, gh, kh, gw, kw], np.int64), f"{t}_shape6"),
            numpy_helper.from_array(np.array([0, gh * gw, ci * kh * kw], np.int64), f"{t}_shape3"),
            numpy_helper.from_array(np.array([0, co, gh, gw], np.int64), f"{t}_shape4"),
            numpy_helper.from_array(wm, f"{t}_w"),
        ])
        y = f"{t}_mm"
        nodes = [
            helper.make_node("Reshape", [n.input[0], f"{t}_shape6"], [f"{t}_r6"], name=f"{t}/reshape6"),
            helper.make_node("Transpose", [f"{t}_r6"], [f"{t}_t6"], perm=[0, 2, 4, 1, 3, 5], name=f"{t}/transpose6"),
            helper.make_node("Reshape", [f"{t}_t6", f"{t}_shape3"], [f"{t}_rows"], name=f"{t}/rows"),
            helper.make_node("MatMul", [f"{t}_rows", f"{t}_w"], [y], name=f"{t}/matmul"),
        ]
        if len(n.input) > 2 and n.input[2]:
            nodes.append(helper.make_node("Add", [y, n.input[2]], [f"{t}_b"], name=f"{t}/bias"))
            y = f"{t}_b"
        nodes += [
            helper.make_node("Transpose", [y], [f"{t}_t"], perm=[0, 2, 1], name=f"{t}/transpose"),
            helper.make_node("Reshape", [f"{t}_t", f"{t}_shape4"], [n.output[0]], name=f"{t}/grid"),
        ]
        out_nodes.extend(nodes)
        n_conv += 1
    if n_conv:
        still = {i for n in out_nodes for i in n.input}
        keep = [i for i in model.graph.initializer if i.name in still]
        del model.graph.node[:]
        model.graph.node.extend(out_nodes)
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return n_conv


def quantize_int8(src, dst, feeds):
    model = onnx.load(src)
    convs = patch_convs_to_matmul(model)
    if convs:
        log(f"{convs} patch embedding(s) as a product over the patches")
    found = weight_matmuls(model)
    if not found:
        raise SystemExit(f"error: {src} has no matrix product with a constant weight to quantize")
    ranges = activation_ranges(model if convs else src, sorted({n.input[0] for n, _, _ in found}), feeds)
    inits = {i.name: i for i in model.graph.initializer}
    zero8 = "q8_zero"
    new_inits = [numpy_helper.from_array(np.array(0, np.int8), zero8)]
    replaced = {}
    used_weights = set()
    quantized = {}  # activation name -> its int8 tensor
    for k, (n, w, bias) in enumerate(found):
        x = n.input[0]
        s_x = max(ranges[x], 1e-12) / 127.0
        s_w = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0
        w8 = np.clip(np.round(w / s_w), -127, 127).astype(np.int8)
        tag = f"q8_{k}"
        new_inits += [
            numpy_helper.from_array(np.array(s_x, np.float32), f"{tag}_sx"),
            numpy_helper.from_array(w8, f"{tag}_w"),
            numpy_helper.from_array((s_x * s_w).astype(np.float32), f"{tag}_scale"),
        ]
        out = n.output[0]
        mm_out = f"{tag}_f" if bias is None else f"{tag}_nobias"
        # standard ONNX; coca-edge's loader runs it as one vectorised op (src/model/ops.rs).
        # One QuantizeLinear per activation, shared by every product reading it (q, k, v)
        quant = []
        if x not in quantized:
            quantized[x] = f"{tag}_xq"
            quant = [helper.make_node("QuantizeLinear", [x, f"{tag}_sx", zero8], [f"{tag}_xq"], name=f"{n.name}/quant")]
        xq = quantized[x]
        nodes = quant + [
            helper.make_node("MatMulInteger", [xq, f"{tag}_w", zero8, zero8], [f"{tag}_i32"], name=f"{n.name}/mmi"),
            helper.make_node("Cast", [f"{tag}_i32"], [f"{tag}_c"], to=TensorProto.FLOAT, name=f"{n.name}/cast"),
            helper.make_node("Mul", [f"{tag}_c", f"{tag}_scale"], [out if bias is None else mm_out], name=f"{n.name}/scale"),
        ]
        if bias is not None:
            nodes.append(helper.make_node("Add", [mm_out, bias], [out], name=f"{n.name}/bias"))
        replaced[id(n)] = nodes
        used_weights.add(n.input[1])
    save_rewritten(model, replaced, used_weights, new_inits, dst)
    return len(found)


def quantize_w8(src, dst):
    """Weight-only int8 ("sym-w8"): every product with a constant weight becomes

        x -> MatMul(x, DequantizeLinear(W8, s_w, axis=1)) [-> Add(bias)]

    with W8 int8, symmetric, one scale per output channel; activations stay f32, so no
    calibration. For matrix-vector products (a decoder step at batch 1 reads every weight once
    per token): coca-edge's loader runs each DequantizeLinear -> MatMul pair as one op that
    reads the int8 weights directly (src/model/w8.rs, `MatMulW8`); onnxruntime runs the
    standard graph as it is."""
    model = onnx.load(src)
    found = weight_matmuls(model)
    if not found:
        raise SystemExit(f"error: {src} has no matrix product with a constant weight to quantize")
    new_inits = []
    replaced = {}
    used_weights = set()
    for k, (n, w, bias) in enumerate(found):
        s_w = (np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0).astype(np.float32)
        w8 = np.clip(np.round(w / s_w), -127, 127).astype(np.int8)
        tag = f"w8_{k}"
        new_inits += [numpy_helper.from_array(w8, f"{tag}_w"), numpy_helper.from_array(s_w, f"{tag}_scale")]
        out = n.output[0]
        nodes = [
            helper.make_node("DequantizeLinear", [f"{tag}_w", f"{tag}_scale"], [f"{tag}_wf"], axis=1, name=f"{n.name}/dequant"),
            helper.make_node("MatMul", [n.input[0], f"{tag}_wf"], [out if bias is None else f"{tag}_nobias"], name=f"{n.name}/w8"),
        ]
        if bias is not None:
            nodes.append(helper.make_node("Add", [f"{tag}_nobias", bias], [out], name=f"{n.name}/bias"))
        replaced[id(n)] = nodes
        used_weights.add(n.input[1])
    save_rewritten(model, replaced, used_weights, new_inits, dst)
    return len(found)


def quantize_dq8(src, dst):
    """Dynamic int8 ("dyn-q8"): int8 weights as in sym-w8, and the activations quantised at run
    time, per tensor, by the standard ONNX operator (onnxruntime's own dynamic-quantisation form):

        x -> DynamicQuantizeLinear -> (q u8, s_x, z_x)
          -> MatMulInteger(q, W8, z_x) -> Cast(f32) -> Mul(s_x) -> Mul(s_w) [-> Add(bias)]

    One DynamicQuantizeLinear per activation, shared by every product reading it (q, k, v). No
    calibration: the range is the tensor's own at each step, so it follows every token. The
    integer product is exact, so a runtime that computes it with 8-bit dot products (coca-edge's
    `MatMulQ8`, src/model/q8.rs: SDOT on Cortex-A76/A78) gives onnxruntime's numbers."""
    model = onnx.load(src)
    found = weight_matmuls(model)
    if not found:
        raise SystemExit(f"error: {src} has no matrix product with a constant weight to quantize")
    new_inits = []
    replaced = {}
    used_weights = set()
    quantized = {}  # activation name -> (q, scale, zero point)
    for k, (n, w, bias) in enumerate(found):
        x = n.input[0]
        s_w = (np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0).astype(np.float32)
        w8 = np.clip(np.round(w / s_w), -127, 127).astype(np.int8)
        tag = f"dq8_{k}"
        new_inits += [numpy_helper.from_array(w8, f"{tag}_w"), numpy_helper.from_array(s_w, f"{tag}_scale")]
        quant = []
        if x not in quantized:
            quantized[x] = (f"{tag}_xq", f"{tag}_xs", f"{tag}_xz")
            quant = [helper.make_node("DynamicQuantizeLinear", [x], list(quantized[x]), name=f"{n.name}/dynquant")]
        xq, xs, xz = quantized[x]
        out = n.output[0]
        nodes = quant + [
            helper.make_node("MatMulInteger", [xq, f"{tag}_w", xz], [f"{tag}_i32"], name=f"{n.name}/mmi"),
            helper.make_node("Cast", [f"{tag}_i32"], [f"{tag}_c"], to=TensorProto.FLOAT, name=f"{n.name}/cast"),
            helper.make_node("Mul", [f"{tag}_c", xs], [f"{tag}_cx"], name=f"{n.name}/xscale"),
            helper.make_node("Mul", [f"{tag}_cx", f"{tag}_scale"], [out if bias is None else f"{tag}_nobias"], name=f"{n.name}/wscale"),
        ]
        if bias is not None:
            nodes.append(helper.make_node("Add", [f"{tag}_nobias", bias], [out], name=f"{n.name}/bias"))
        replaced[id(n)] = nodes
        used_weights.add(n.input[1])
    save_rewritten(model, replaced, used_weights, new_inits, dst)
    return len(found)


# ---------------------------------------------------------------- f16

def gemm_to_matmul(model):
    """Gemm with a constant weight -> MatMul (+ Add): tract 0.23.9's Gemm expansion types its
    output f32 for f16 inputs and refuses the graph."""
    inits = {i.name: i for i in model.graph.initializer}
    nodes = []
    for n in model.graph.node:
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        if n.op_type != "Gemm" or n.input[1] not in inits or a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 \
                or a.get("beta", 1.0) != 1.0:
            nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        if a.get("transB", 0):
            w = np.ascontiguousarray(w.T)
        wname = n.input[1] + ("__kn" if a.get("transB", 0) else "")
        if wname not in inits:  # a weight shared by several Gemms is transposed once
            inits[wname] = numpy_helper.from_array(w, wname)
            model.graph.initializer.append(inits[wname])
        has_bias = len(n.input) > 2 and n.input[2]
        mm_out = n.output[0] + "__mm" if has_bias else n.output[0]
        nodes.append(helper.make_node("MatMul", [n.input[0], wname], [mm_out], name=n.name + "/matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, n.input[2]], [n.output[0]], name=n.name + "/bias"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def convert_f16(src, dst):
    """Every float initializer, constant and Cast target in f16; float graph inputs cast to f16
    on entry and float outputs back to f32 on exit, under their original names."""
    model = onnx.load(src)
    g = model.graph
    F, H = TensorProto.FLOAT, TensorProto.FLOAT16
    gemm_to_matmul(model)
    for init in g.initializer:
        if init.data_type == F:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for n in g.node:
        if n.op_type == "Constant":
            for a in list(n.attribute):
                if a.name in ("value_float", "value_floats"):
                    v = np.array(a.f if a.name == "value_float" else list(a.floats), np.float16)
                    n.attribute.remove(a)
                    n.attribute.append(helper.make_attribute("value", numpy_helper.from_array(v)))
        for a in n.attribute:
            if n.op_type in ("Constant", "ConstantOfShape") and a.type == onnx.AttributeProto.TENSOR and a.t.data_type == F:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
            if n.op_type == "Cast" and a.name == "to" and a.i == F:
                a.i = H
    def rename(old, new, outputs):
        for n in g.node:
            for names in ((n.input, n.output) if outputs else (n.input,)):
                for k, x in enumerate(names):
                    if x == old:
                        names[k] = new

    head, tail = [], []
    for i in g.input:
        if i.type.tensor_type.elem_type == F:
            inner = i.name + "__f16"
            rename(i.name, inner, outputs=False)
            head.append(helper.make_node("Cast", [i.name], [inner], to=H, name=i.name + "/to_f16"))
    for o in g.output:
        if o.type.tensor_type.elem_type == F:
            inner = o.name + "__f16"
            rename(o.name, inner, outputs=True)
            tail.append(helper.make_node("Cast", [inner], [o.name], to=F, name=o.name + "/to_f32"))
    nodes = head + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    onnx.checker.check_model(model)
    onnx.save(model, dst)


# ---------------------------------------------------------------- bundle

def cosine(a, b):
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def check_variant(f32_path, var_path, feeds, limit=12):
    """Worst first-output cosine of the variant against f32, in onnxruntime."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # onnxruntime 1.32's graph optimiser crashes (SIGSEGV) on some f16 graphs; accuracy needs none
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a = ort.InferenceSession(f32_path, so, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(var_path, so, providers=["CPUExecutionProvider"])
    sample = feeds[:: max(1, len(feeds) // (limit // 2))][: limit // 2]
    cos = [float(cosine(a.run(None, f)[0], b.run(None, f)[0]).min()) for f in sample]
    return float(np.mean(cos)), float(np.min(cos))


def int8_design(graph, design):
    """The int8 design of a graph: "mmi" (int8 activations and weights, MatMulInteger) for
    graphs whose products have many rows (the image encoder: a row per patch), "w8" (int8
    weights, f32 activations) for the decoder step, a matrix-vector product per token."""
    if design == "auto":
        return "w8" if graph == "decoder_step" else "mmi"  # cross_kv: 255 rows, like the encoder
    return design


def add_variants(bundle, precisions, graphs=None, calib_images=None, design="auto"):
    man_path = os.path.join(bundle, "coca.json")
    with open(man_path) as f:
        manifest = json.load(f)
    graphs = graphs or ["image_encoder"]
    calib_images = calib_images or os.path.join(ROOT, "tests", "fixtures", "images")
    feeds = None
    notes = manifest.setdefault("precision_notes", {})
    for prec in precisions:
        if prec == "f32":
            continue
        if prec not in ("int8", "f16"):
            raise SystemExit(f"error: unknown precision '{prec}' (expected f32, f16, int8)")
        for g in graphs:
            spec = manifest["graphs"].get(g)
            if spec is None:
                raise SystemExit(f"error: the bundle has no graph '{g}'")
            if g not in ("image_encoder", "cross_kv", "decoder_step") and prec == "int8":
                raise SystemExit(f"error: int8 calibration is implemented for image_encoder, cross_kv and decoder_step, not '{g}'")
            src = os.path.join(bundle, spec["precisions"]["f32"])
            name = f"{g}.{prec}.onnx"
            dst = os.path.join(bundle, name)
            t0 = time.time()
            if feeds is None:
                feeds = image_calibration(manifest, calib_images)
                log(f"calibration: {len(feeds)} inputs from {calib_images}")
            graph_feeds = feeds
            if g == "decoder_step":
                graph_feeds = decoder_calibration(bundle, manifest, feeds)
                log(f"decoder calibration: {len(graph_feeds)} steps of greedy captions")
            elif g == "cross_kv":
                graph_feeds = captioning_tokens(bundle, manifest, feeds)
                log(f"cross_kv calibration: captioning tokens of {len(graph_feeds)} images")
            method = {"mmi": METHOD, "w8": "sym-w8", "dq8": "dyn-q8"}[int8_design(g, design)]
            if prec == "int8" and method == "sym-w8":
                n = quantize_w8(src, dst)
                what = f"{n} matrix products with int8 weights ({method})"
            elif prec == "int8" and method == "dyn-q8":
                n = quantize_dq8(src, dst)
                what = f"{n} matrix products with int8 weights and run-time int8 activations ({method})"
            elif prec == "int8":
                n = quantize_int8(src, dst, graph_feeds)
                what = f"{n} matrix products int8 ({method})"
            else:
                convert_f16(src, dst)
                what = "f16 weights and ops, f32 inputs and outputs"
            mean, worst = check_variant(src, dst, graph_feeds)
            log(f"{g} {prec}: {what}; {os.path.getsize(dst) / 1e6:.1f} MB "
                f"({os.path.getsize(dst) / os.path.getsize(src):.0%} of f32); cosine vs f32 in onnxruntime "
                f"mean {mean:.5f}, worst {worst:.5f}; {time.time() - t0:.1f}s")
            spec["precisions"][prec] = name
            manifest["files"][name] = {"sha256": sha256_of(dst), "size": os.path.getsize(dst)}
            images = os.path.relpath(calib_images, ROOT) if calib_images.startswith(ROOT) else calib_images
            calibrated = prec == "int8" and method == METHOD
            notes.setdefault(g, {})[prec] = {
                "method": method if prec == "int8" else "f16-keep-io",
                # weight-only int8 and f16 need no calibration: the images only check the cosine
                ("calibration" if calibrated else "checked_on"): images,
                ("calibration_inputs" if calibrated else "checked_inputs"): len(graph_feeds),
                "cosine_vs_f32_mean": round(mean, 6),
                "cosine_vs_f32_worst": round(worst, 6),
            }
    with open(man_path, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", help="bundle folder written by export.py")
    ap.add_argument("--precision", required=True, help="comma list of int8, f16")
    ap.add_argument("--graphs", default="image_encoder",
                    help="comma list of graphs: image_encoder (default), cross_kv, decoder_step (int8); any (f16)")
    ap.add_argument("--calib-images", default=None, help="calibration images (default tests/fixtures/images)")
    ap.add_argument("--int8-design", default="auto", choices=["auto", "mmi", "w8", "dq8"],
                    help="mmi: int8 activations (calibrated scale) and weights (MatMulInteger); w8: int8 weights only; "
                         "dq8: int8 weights, activations quantised at run time (DynamicQuantizeLinear); "
                         "auto (default): w8 for decoder_step, mmi for the others")
    args = ap.parse_args(argv)
    add_variants(args.bundle, [p.strip() for p in args.precision.split(",") if p.strip()],
                 [g.strip() for g in args.graphs.split(",") if g.strip()], args.calib_images, args.int8_design)


if __name__ == "__main__":
    main()
