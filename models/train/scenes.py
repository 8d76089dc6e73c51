"""Procedural scenes with known captions: the data of the shipped default model.

Every scene is one group of 1-3 identical objects (shape, color, size) at one position
(left, right, top, bottom, center), drawn on a varied background with camera-like nuisances
(lighting, blur, sensor noise, JPEG artefacts, small rotations). Everything is a pure function
of a seed, so the training set, the held-out set and the sample clip regenerate bit for bit.

Texts come in three kinds (see `texts_for`):
- canonical:   "two small blue squares at the top"           (what greedy captioning should say)
- alternative: "there are two small blue squares at the top"  (other phrasings of the whole scene)
- partial:     "a photo of two blue shapes."                 (some attributes only: what zero-shot
                                                               labels look like through the bundle's
                                                               template "a photo of a {}.")
"""

import io
import math
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLORS = {
    "red": (214, 38, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 60, 180),
    "orange": (250, 130, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ["circle", "square", "triangle", "star", "heart", "diamond"]
SIZES = ["small", "large"]
POSITIONS = ["left", "right", "top", "bottom", "center"]
COUNTS = [1, 2, 3]
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
ALT_POSITION_PHRASES = {"left": "on the left side", "right": "on the right side", "top": "near the top",
                        "bottom": "near the bottom", "center": "in the middle"}
# (color, shape) pairs never drawn in training: the "novel" held-out split tests whether the
# model composes attributes it has only seen apart
HELD_OUT_PAIRS = {("red", "star"), ("blue", "triangle"), ("green", "heart"), ("yellow", "circle"),
                  ("purple", "square"), ("orange", "diamond"), ("white", "star"), ("black", "circle")}

# the sizes are fractions of the image side: objects' radii
RADIUS = {"small": 0.075, "large": 0.13}
CENTERS = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8),
           "center": (0.5, 0.5)}
SUPERSAMPLE = 4


def plural(shape, n):
    return shape if n == 1 else shape + "s"


def canonical_caption(s):
    return (f"{COUNT_WORDS[s['count']]} {s['size']} {s['color']} {plural(s['shape'], s['count'])} "
            f"{POSITION_PHRASES[s['position']]}")


def alternative_captions(s):
    """Other phrasings of the whole scene (canonical excluded)."""
    n, det = s["count"], COUNT_WORDS[s["count"]]
    obj = f"{s['size']} {s['color']} {plural(s['shape'], n)}"
    be = "is" if n == 1 else "are"
    return [
        f"there {be} {det} {obj} {POSITION_PHRASES[s['position']]}",
        f"{det} {obj} {ALT_POSITION_PHRASES[s['position']]}",
        f"{det} {s['color']} {s['size']} {plural(s['shape'], n)} {POSITION_PHRASES[s['position']]}",
    ]


def valid_captions(s):
    """Every phrasing the generator may use for the whole scene: a caption is correct if it is one."""
    return [canonical_caption(s)] + alternative_captions(s)


def partial_text(s, rng):
    """A photo description naming a random nonempty subset of size, color, shape and position.
    The determiner always follows the true count, so counts are named by every text."""
    keep = [a for a in ("size", "color", "shape", "position") if rng.random() < 0.5]
    if not keep:
        keep = [rng.choice(["size", "color", "shape", "position"])]
    n = s["count"]
    words = [COUNT_WORDS[n]]
    if "size" in keep:
        words.append(s["size"])
    if "color" in keep:
        words.append(s["color"])
    words.append(plural(s["shape"] if "shape" in keep else "shape", n))
    if "position" in keep:
        words.append(POSITION_PHRASES[s["position"]])
    return "a photo of " + " ".join(words) + "."


def texts_for(s, rng):
    """One training text for scene s: canonical 60%, alternative 15%, partial 25%."""
    r = rng.random()
    if r < 0.60:
        return canonical_caption(s)
    if r < 0.75:
        return rng.choice(alternative_captions(s))
    return partial_text(s, rng)


def all_words():
    """Every word any text may contain (for the restricted vocabulary)."""
    words = set()
    for color in COLORS:
        for shape in SHAPES:
            for size in SIZES:
                for pos in POSITIONS:
                    for n in COUNTS:
                        s = dict(color=color, shape=shape, size=size, position=pos, count=n)
                        for t in valid_captions(s):
                            words.update(t.split())
                        words.update(f"a photo of {COUNT_WORDS[n]} {plural('shape', n)}.".split())
    return sorted(words)


def sample_scene(rng, split="train"):
    """Attributes of one scene. split: train (held-out pairs excluded), test (same pairs as train,
    other seeds), novel (held-out pairs only)."""
    while True:
        s = dict(color=rng.choice(list(COLORS)), shape=rng.choice(SHAPES), size=rng.choice(SIZES),
                 position=rng.choice(POSITIONS), count=rng.choice(COUNTS))
        held = (s["color"], s["shape"]) in HELD_OUT_PAIRS
        if (split == "novel") == held:
            return s


# ---------------------------------------------------------------- drawing

def _shape_points(shape, cx, cy, r, rot):
    def rotate(pts):
        c, s_ = math.cos(rot), math.sin(rot)
        return [(cx + x * c - y * s_, cy + x * s_ + y * c) for x, y in pts]
    if shape == "square":
        a = r * 0.85
        return rotate([(-a, -a), (a, -a), (a, a), (-a, a)])
    if shape == "triangle":
        return rotate([(r * math.cos(t), r * math.sin(t)) for t in
                       (-math.pi / 2, -math.pi / 2 + 2 * math.pi / 3, -math.pi / 2 + 4 * math.pi / 3)])
    if shape == "diamond":
        return rotate([(0, -r), (r * 0.65, 0), (0, r), (-r * 0.65, 0)])
    if shape == "star":
        pts = []
        for i in range(10):
            t = -math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else r * 0.42
            pts.append((rr * math.cos(t), rr * math.sin(t)))
        return rotate(pts)
    if shape == "heart":
        pts = []
        for i in range(48):
            t = 2 * math.pi * i / 48
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((x * r / 17, y * r / 17 + r * 0.05))
        return rotate(pts)
    raise ValueError(shape)


def _background(rng, w, h):
    kind = rng.choice(["flat", "gradient", "noise", "texture"])
    base = np.array([rng.uniform(70, 190) for _ in range(3)])
    # muted: pull the channels towards their mean so objects' saturated colors stand out
    base = base.mean() + (base - base.mean()) * 0.35
    if kind == "flat":
        img = np.broadcast_to(base, (h, w, 3)).copy()
    elif kind == "gradient":
        other = base + np.array([rng.uniform(-50, 50) for _ in range(3)]) * 0.6
        t = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
        f = (np.cos(t) * xx + np.sin(t) * yy)
        f = (f - f.min()) / (f.max() - f.min() + 1e-9)
        img = base * (1 - f[..., None]) + other * f[..., None]
    elif kind == "noise":
        g = np.random.default_rng(rng.getrandbits(32))
        small = g.normal(0, 1, (6, 6, 3))
        up = np.array(Image.fromarray(((small - small.min()) / (np.ptp(small) + 1e-9) * 255).astype(np.uint8))
                      .resize((w, h), Image.BICUBIC), dtype=np.float64) / 255 - 0.5
        img = base + up * 45
    else:
        yy, xx = np.mgrid[0:h, 0:w]
        period = rng.uniform(6, 18)
        t = rng.uniform(0, math.pi)
        if rng.random() < 0.5:
            f = np.sin((np.cos(t) * xx + np.sin(t) * yy) * 2 * math.pi / period)
        else:
            f = np.sign(np.sin(xx * 2 * math.pi / period)) * np.sign(np.sin(yy * 2 * math.pi / period))
        img = base + f[..., None] * rng.uniform(6, 16)
    return np.clip(img, 0, 255)


def _layout(s, rng, size):
    """Object centers (pixels) and radius for the group."""
    r = RADIUS[s["size"]] * size * rng.uniform(0.9, 1.1)
    cx, cy = CENTERS[s["position"]]
    cx = (cx + rng.uniform(-0.05, 0.05)) * size
    cy = (cy + rng.uniform(-0.05, 0.05)) * size
    n = s["count"]
    gap = r * rng.uniform(2.25, 2.5)
    if n == 1:
        offs = [(0, 0)]
    elif s["position"] in ("left", "right"):  # a column
        offs = [(0, (i - (n - 1) / 2) * gap) for i in range(n)]
    elif s["position"] in ("top", "bottom"):  # a row
        offs = [((i - (n - 1) / 2) * gap, 0) for i in range(n)]
    elif n == 2:
        offs = [(-gap / 2, 0), (gap / 2, 0)]
    else:  # a small triangle around the center
        offs = [(-gap / 2, gap * 0.4), (gap / 2, gap * 0.4), (0, -gap * 0.47)]
    pts = [(cx + dx + rng.uniform(-0.08, 0.08) * r, cy + dy + rng.uniform(-0.08, 0.08) * r) for dx, dy in offs]
    # keep every object inside the frame
    lo, hi = r * 1.02, size - r * 1.02
    shift_x = max(0, lo - min(p[0] for p in pts)) - max(0, max(p[0] for p in pts) - hi)
    shift_y = max(0, lo - min(p[1] for p in pts)) - max(0, max(p[1] for p in pts) - hi)
    return [(x + shift_x, y + shift_y) for x, y in pts], r


def draw_objects(canvas, s, rng, centers, r, scale=1.0):
    """Draws the group onto a PIL image (mode RGB) at `scale` times the layout coordinates."""
    d = ImageDraw.Draw(canvas)
    base = np.array(COLORS[s["color"]], dtype=np.float64)
    for (x, y) in centers:
        col = np.clip(base * rng.uniform(0.85, 1.1) + rng.uniform(-12, 12), 0, 255).astype(int)
        rot = math.radians(rng.uniform(-15, 15))
        X, Y, R = x * scale, y * scale, r * scale
        if s["shape"] == "circle":
            d.ellipse([X - R, Y - R, X + R, Y + R], fill=tuple(col))
        else:
            d.polygon(_shape_points(s["shape"], X, Y, R, rot), fill=tuple(col))


def nuisances(img, rng):
    """Camera-like degradations of a PIL RGB image."""
    a = np.asarray(img, dtype=np.float64)
    # lighting: gain, offset, and a soft vignette / side light
    h, w = a.shape[:2]
    gain = rng.uniform(0.7, 1.25)
    yy, xx = np.mgrid[0:h, 0:w]
    t = rng.uniform(0, 2 * math.pi)
    side = 1 + rng.uniform(0, 0.25) * ((np.cos(t) * xx / w + np.sin(t) * yy / h) - 0.5)
    a = a * gain * side[..., None] + rng.uniform(-15, 15)
    a = np.clip(a, 0, 255)
    img = Image.fromarray(a.astype(np.uint8))
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    if rng.random() < 0.7:
        g = np.random.default_rng(rng.getrandbits(32))
        a = np.asarray(img, dtype=np.float64) + g.normal(0, rng.uniform(2, 9), (h, w, 3))
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=rng.randint(35, 90))
        buf.seek(0)
        img = Image.open(buf).convert("RGB")
    return img


def render(s, seed, size=96):
    """The scene s as a size x size PIL RGB image, a pure function of (s, seed)."""
    rng = random.Random(seed)
    big = size * SUPERSAMPLE
    # the background is smooth or a texture of period >= 6 px: drawn at the final size
    bg = _background(rng, size, size)
    canvas = Image.fromarray(bg.astype(np.uint8)).resize((big, big), Image.BILINEAR)
    centers, r = _layout(s, rng, size)
    draw_objects(canvas, s, rng, centers, r, scale=SUPERSAMPLE)
    img = canvas.resize((size, size), Image.LANCZOS)
    return nuisances(img, rng)


def scene(seed, split="train", size=96):
    """(attributes, image) of scene number `seed` in `split`."""
    rng = random.Random(f"{split}:{seed}")
    s = sample_scene(rng, split)
    return s, render(s, rng.getrandbits(32), size)
