#!/usr/bin/env python3
"""Tables from armcount reports (boards/cross/armcount.sh). Standard library only.

  table.py --model coca.json --past P REPORTS_DIR > OUT.tsv   per-run rows from report pairs
  table.py --markdown OUT.tsv                                 the same as a Markdown table
  table.py --compare BASELINE.tsv NOW.tsv --tolerance 0.02    exit 1 when a count moved
  table.py --markdown OUT.tsv --estimate                      plus a board time estimate per row

Report files are named CPU.PRECISION.GRAPH.BATCH.RUNS.txt; a row is (runs 3 - runs 1) / 2.
Model multiply-adds come from the manifest's open_clip config (the formulas are below), so
"MACs per instruction" is the model's work over the executed instructions, padding and all."""
import argparse, csv, json, os, re, sys

LANES = {"16b": 16, "8b": 8, "8h": 8, "4h": 4, "4s": 4, "2s": 2, "2d": 2}


def load(path):
    d = {"total": 0, "insn": {}, "sym": {}, "class": {}}
    for line in open(path):
        if line.startswith("#"):
            continue
        f = line.rstrip("\n").split("\t")
        if f[0] == "total":
            d["total"] = int(f[1])
        elif f[0] == "insn":
            d["insn"][f[1]] = d["insn"].get(f[1], 0) + int(f[3])
        elif f[0] == "class":
            d["class"][f[1]] = int(f[2])
        elif f[0] == "sym":
            d["sym"][f[1]] = int(f[2])
    return d


def macs_of(key):
    """multiply-adds one instruction does (0 if it is not a multiply-accumulate)."""
    m = re.match(r"([a-z0-9]+)(?:\.([0-9a-z]+))?(\[e\])?$", key)
    if not m:
        return 0
    mn, arr, _ = m.groups()
    if mn in ("fmla", "fmls") and arr in LANES:
        return LANES[arr]
    if mn in ("sdot", "udot", "usdot") and arr in ("4s", "2s"):
        return 4 * LANES[arr]
    if mn in ("smlal", "smlal2", "umlal", "umlal2", "smlsl", "smlsl2", "umlsl", "umlsl2", "mla", "mls", "smmla", "ummla") and arr in LANES:
        return LANES[arr] * (8 if mn in ("smmla", "ummla") else 1)
    if mn in ("fmadd", "fmsub", "fnmadd", "fnmsub"):
        return 1
    return 0


def model_macs(cfg, graph, batch, past):
    """Multiply-adds of one run of `graph`, from open_clip's CoCa config (model_config in
    coca.json): linear layers and attention products; LayerNorm, softmax, GELU not counted.
    Checked: coca_ViT-B-32's image encoder is 4.595 G (the armcount README's figure)."""
    v, t, m = cfg["vision_cfg"], cfg["text_cfg"], cfg["multimodal_cfg"]
    embed = cfg["embed_dim"]
    if graph == "image_encoder":
        w, p, s = v["width"], v["patch_size"], v["image_size"]
        grid = (s // p) ** 2
        tok = grid + 1
        mlp = int(w * v.get("mlp_ratio", 4.0))
        macs = grid * 3 * p * p * w  # patch embedding
        macs += v["layers"] * (tok * (4 * w * w + 2 * w * mlp) + 2 * tok * tok * w)
        q = v.get("attn_pooler_queries", 256)
        d = embed  # the attentional pooler works at the output width, keys from the ViT width
        macs += q * d * d + 2 * tok * w * d + 2 * q * tok * d + q * d * d
        macs += d * embed  # projection of the contrastive query
        return macs
    n_tok = v.get("attn_pooler_queries", 256) - 1  # captioning tokens
    w = m["width"]
    if graph == "cross_kv":
        return m["layers"] * 2 * n_tok * w * w
    if graph == "decoder_step":
        keys = past + 1
        tw = t["width"]
        tmlp = int(tw * t.get("mlp_ratio", 4.0))
        mmlp = int(w * m.get("mlp_ratio", 4.0))
        per = t["layers"] * (4 * tw * tw + 2 * tw * tmlp + 2 * keys * tw)
        per += m["layers"] * (4 * w * w + 2 * keys * w + 2 * w * w + 2 * n_tok * w + 2 * w * mmlp)
        per += w * m.get("vocab_size", t.get("vocab_size", 49408))
        return batch * per
    raise ValueError(graph)


UNIT = {"image_encoder": "image", "cross_kv": "image", "decoder_step": "token"}
FIELDS = ["cpu", "precision", "graph", "batch", "unit", "insns", "model_macs", "macs_per_insn", "main_mul", "main_mul_insns", "mac_insns", "top_functions", "classes"]


def rows(reports, cfg, past):
    pat = re.compile(r"(.+?)\.(f32|f16|int8)\.(\w+)\.(\d+)\.1\.txt$")
    out = []
    for f in sorted(os.listdir(reports)):
        mt = pat.match(f)
        if not mt:
            continue
        cpu, prec, graph, batch = mt.group(1), mt.group(2), mt.group(3), int(mt.group(4))
        lo = load(os.path.join(reports, f))
        hi = load(os.path.join(reports, f[: -len("1.txt")] + "3.txt"))
        per = lambda a, b: (b - a) / 2
        total = per(lo["total"], hi["total"])
        ins = {k: per(lo["insn"].get(k, 0), hi["insn"].get(k, 0)) for k in set(lo["insn"]) | set(hi["insn"])}
        mac_ins = {k: n for k, n in ins.items() if macs_of(k) and n > 0}
        main = max(mac_ins.items(), key=lambda kv: kv[1] * macs_of(kv[0]), default=("-", 0))
        syms = {s: per(lo["sym"].get(s, 0), hi["sym"].get(s, 0)) for s in set(lo["sym"]) | set(hi["sym"])}
        top = sorted(syms.items(), key=lambda kv: -kv[1])[:3]
        macs = model_macs(cfg, graph, batch, past)
        out.append({
            "cpu": cpu, "precision": prec, "graph": graph, "batch": batch, "unit": UNIT[graph],
            "insns": int(round(total)), "model_macs": macs, "macs_per_insn": f"{macs / total:.2f}" if total > 0 else "-",
            "main_mul": main[0], "main_mul_insns": int(round(main[1])), "mac_insns": int(round(sum(mac_ins.values()))),
            "top_functions": "; ".join(f"{short(s)} {100 * n / total:.0f}%" for s, n in top if total > 0),
            # instruction classes (the plugin's decode classes), for per-pipe estimates
            "classes": " ".join(f"{c}={int(round(per(lo['class'].get(c, 0), hi['class'].get(c, 0))))}" for c in sorted(set(lo["class"]) | set(hi["class"]))),
        })
    return out


def demangle(sym):
    """Rust's legacy mangling (_ZN 9coca_edge 7kernels ... 17h<hash> E) as a :: path; else as is."""
    if not sym.startswith("_ZN") or not sym.endswith("E"):
        return sym
    parts, i, body = [], 3, sym[:-1]
    while i < len(body):
        m = re.match(r"\d+", body[i:])
        if not m:
            return sym
        n = int(m.group())
        i += len(m.group())
        part = body[i:i + n]
        parts.append(part[1:] if part.startswith("_$") else part)
        i += n
    for a, b in (("$LT$", "<"), ("$GT$", ">"), ("$u7b$", "{"), ("$u7d$", "}"), ("$RF$", "&"), ("$u20$", " "), ("..", "::"), ("$C$", ",")):
        parts = [p.replace(a, b) for p in parts]
    return "::".join(parts)


def short(sym):
    """a function name a table can hold: crate path and generics dropped."""
    sym = demangle(sym)
    s = re.sub(r"<[^<>]*>", "", re.sub(r"<[^<>]*>", "", sym))
    s = re.sub(r"::h[0-9a-f]{16}$", "", s)
    parts = [p for p in s.split("::") if p and not p.startswith("{{")]
    return "::".join(parts[-2:]) if parts else sym[:40]


def shorten_top(top):
    """'name 76%; name 6%' with each name made short (baselines written before demangling)."""
    out = []
    for item in filter(None, (t.strip() for t in top.split(";"))):
        name, _, pct = item.rpartition(" ")
        out.append(f"`{short(name)}` {pct}")
    return "; ".join(out)


def read_tsv(path):
    with open(path) as f:
        return list(csv.DictReader((l for l in f if not l.startswith("#")), delimiter="\t"))


# Board time ESTIMATES from counts (boards/README.md, "Time estimates"): a lower bound of one
# core's cycles, max(instructions / front-end width, multiply-accumulate instructions / their
# issue rate), at the board's clock. Figures as the Cortex-A72 and A76 software optimization
# guides give them, read through LLVM's scheduling models (AArch64SchedA57.td, which LLVM uses
# for the A72; AArch64SchedNeoverseN1.td, the A76's derivative): A72 3 instructions per cycle,
# FMLA .4s 1 per cycle (F0/F1), SMLAL/SMULL 1 (F0); A76 4 per cycle, FMLA .4s/.8h 2 (V0/V1),
# SMLAL 1 (V0), SDOT 2 (V0/V1: assumed, no scheduling model lists it). Memory stalls, latency
# chains and other cores are not in it: real boards are slower.
BOARDS = {
    "cortex-a72": {"board": "Pi 4", "ghz": 1.8, "width": 3, "mac_rate": {"fmla.4s": 1, "smlal": 1, "smlal2": 1, "smull": 1}},
    "cortex-a76": {"board": "Pi 5", "ghz": 2.4, "width": 4, "mac_rate": {"fmla.4s": 2, "fmla.8h": 2, "sdot.4s": 2, "smlal": 1, "smlal2": 1}},
}


def estimate_ms(x):
    """(lower-bound milliseconds per image/token on one core, what bounds it) for a table row."""
    b = BOARDS.get(x["cpu"])
    if not b:
        return None, "-"
    insns, macs = int(x["insns"]), int(x["mac_insns"])
    main = x["main_mul"].replace("[e]", "")
    rate = b["mac_rate"].get(main, b["mac_rate"].get(main.split(".")[0], 1))
    front, mul = insns / b["width"], macs / rate
    return max(front, mul) / (b["ghz"] * 1e6), ("front end" if front >= mul else main)


def markdown(path, estimate=False):
    r = read_tsv(path)
    extra = " | estimate, ms per core at the board's clock (lower bound) |" if estimate else " |"
    print("| CPU | precision | graph | batch | instructions per " + "/".join(sorted({x["unit"] for x in r})) + " | main multiply | MACs per instruction | top functions" + extra)
    print("|---|---|---|---:|---:|---|---:|---|" + ("---:|" if estimate else ""))
    for x in r:
        cell = " |"
        if estimate:
            ms, bound = estimate_ms(x)
            b = BOARDS.get(x["cpu"], {})
            cell = f" | {ms:,.2f} ({b.get('board')} {b.get('ghz')} GHz; bound: {bound}) |" if ms is not None else " | - |"
        print(f"| {x['cpu']} | {x['precision']} | {x['graph']} | {x['batch']} | {int(x['insns']) / 1e6:,.2f} M | {int(x['main_mul_insns']) / 1e6:,.2f} M `{x['main_mul']}` | {x['macs_per_insn']} | {shorten_top(x['top_functions'])}" + cell)


def compare(base, now, tol):
    key = lambda x: (x["cpu"], x["precision"], x["graph"], x["batch"])
    b = {key(x): x for x in read_tsv(base)}
    n = {key(x): x for x in read_tsv(now)}
    bad = []
    for k in sorted(set(b) | set(n)):
        if k not in n:
            bad.append(f"{' '.join(k)}: in the baseline, not measured now")
            continue
        if k not in b:
            bad.append(f"{' '.join(k)}: measured now, not in the baseline")
            continue
        x, y = int(b[k]["insns"]), int(n[k]["insns"])
        rel = (y - x) / x if x else float("inf")
        flag = "MOVED" if abs(rel) > tol else "ok"
        print(f"  {flag:5s} {' '.join(k):40s} {x / 1e6:10,.3f} M -> {y / 1e6:10,.3f} M  ({100 * rel:+.2f}%)")
        if abs(rel) > tol:
            bad.append(f"{' '.join(k)}: {x} -> {y} instructions ({100 * rel:+.2f}%, tolerance {100 * tol:.1f}%)")
    if bad:
        print("armcount: counts moved beyond the tolerance from " + base + ":", file=sys.stderr)
        for l in bad:
            print("  " + l, file=sys.stderr)
        print("armcount: if the change is intended, regenerate the baseline (boards/cross/armcount.sh matrix) and say why in the commit", file=sys.stderr)
        return 1
    print(f"armcount: every count within {100 * tol:.1f}% of {base}")
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("reports", nargs="?")
    ap.add_argument("--model")
    ap.add_argument("--past", type=int, default=8)
    ap.add_argument("--markdown")
    ap.add_argument("--estimate", action="store_true", help="with --markdown: a board time estimate per row")
    ap.add_argument("--compare", nargs=2)
    ap.add_argument("--tolerance", type=float, default=0.02)
    a = ap.parse_args()
    if a.markdown:
        return markdown(a.markdown, a.estimate)
    if a.compare:
        return compare(*a.compare, a.tolerance)
    man = json.load(open(a.model))
    cfg = man.get("source", {}).get("model_config")
    if not cfg:
        sys.exit(f"{a.model}: no source.model_config (needed for the model's multiply-adds)")
    r = rows(a.reports, cfg, a.past)
    if not r:
        sys.exit(f"{a.reports}: no reports")
    print(f"# armcount per-run counts; model {man.get('name')}; past {a.past}; (runs 3 - runs 1) / 2")
    w = csv.DictWriter(sys.stdout, fieldnames=FIELDS, delimiter="\t", lineterminator="\n")
    w.writeheader()
    for x in r:
        w.writerow(x)


sys.exit(main())
