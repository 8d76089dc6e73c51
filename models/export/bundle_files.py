"""Small helpers the exporter and the quantizer share (no torch import, so quantize.py stays light)."""

import hashlib
import sys


def logger(tool):
    """A log function printing '[tool] msg' to stderr, flushed (progress of long exports)."""
    def log(msg):
        print(f"[{tool}] {msg}", file=sys.stderr, flush=True)
    return log


def sha256_of(path):
    """Hex sha256 of a file, read in 1 MB chunks (graphs can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
