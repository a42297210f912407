"""Checkpoints that never lose work: atomic writes, a checksum on load, and fallback to the previous one.

Layout in the output folder: ``checkpoint-<step>.pt`` files (the newest ``keep`` are kept) and
``checkpoint.json``, the manifest listing them with their size and SHA-256. Every file is written to a
temporary name and renamed, so a crash leaves either the old state or the new one. Loading walks the
manifest from the newest entry and skips (with a warning) any file that is missing, truncated or corrupted.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings

import torch

MANIFEST = "checkpoint.json"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(out_dir: str) -> list[dict]:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["checkpoints"]


def save(out_dir: str, state: dict, step: int, keep: int = 2) -> str:
    """Write ``state`` as the checkpoint of ``step``; returns its path."""
    name = f"checkpoint-{step}.pt"
    path = os.path.join(out_dir, name)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    entries = [e for e in read_manifest(out_dir) if e["file"] != name]
    entries.append({"file": name, "step": step, "bytes": os.path.getsize(path), "sha256": _sha256(path)})
    entries.sort(key=lambda e: e["step"])
    for old in entries[:-keep]:
        try:
            os.remove(os.path.join(out_dir, old["file"]))
        except FileNotFoundError:
            pass
    _atomic_write_json(os.path.join(out_dir, MANIFEST), {"checkpoints": entries[-keep:]})
    return path


def load_latest(out_dir: str, map_location=None) -> dict | None:
    """The newest checkpoint that passes its size and checksum test, or None if there is none."""
    for entry in reversed(read_manifest(out_dir)):
        path = os.path.join(out_dir, entry["file"])
        problem = None
        if not os.path.exists(path):
            problem = "is missing"
        elif os.path.getsize(path) != entry["bytes"]:
            problem = f"has {os.path.getsize(path)} bytes, expected {entry['bytes']} (truncated?)"
        elif _sha256(path) != entry["sha256"]:
            problem = "fails its SHA-256 check (corrupted)"
        if problem:
            warnings.warn(f"checkpoint {path} {problem}; trying the previous one", RuntimeWarning, stacklevel=2)
            continue
        return torch.load(path, map_location=map_location, weights_only=False)
    if read_manifest(out_dir):
        raise RuntimeError(f"no usable checkpoint in {out_dir}: every entry of {MANIFEST} is missing or corrupted")
    return None
