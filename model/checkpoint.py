"""Checkpoints: one .npz file holding weights, optimizer state and a JSON header.

Pickle-free by design: arrays are read with `allow_pickle=False` and everything else
(config, tokenizer, iteration, RNG state) is JSON stored as a uint8 array, so loading a
checkpoint from a stranger can never run code. Writes are atomic (temp file, fsync,
rename): a crash mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

CHECKPOINT_NAME = "ckpt.npz"
FORMAT_VERSION = 1
ZIP_SIGNATURE = b"PK\x03\x04"  # the first bytes of every .npz, which is a zip archive


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupted, truncated or incompatible."""


def save_checkpoint(path: str | Path, model_state: dict[str, np.ndarray], meta: dict[str, Any],
                    optimizer_state: dict[str, Any] | None = None) -> Path:
    """Write model weights (+ optimizer buffers) and the JSON `meta` atomically to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"model/{k}": np.ascontiguousarray(v) for k, v in model_state.items()}
    header = {"format_version": FORMAT_VERSION, **meta}
    if optimizer_state is not None:
        arrays.update({f"optim/{k}": v for k, v in optimizer_state["buffers"].items()})
        header["optimizer"] = {"step": optimizer_state["step"], "lr": optimizer_state["lr"]}
    arrays["__meta__"] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any] | None]:
    """Read (model_state, meta, optimizer_state or None); CheckpointError on any problem."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    with open(path, "rb") as f:
        signature = f.read(4)
    if signature != ZIP_SIGNATURE:  # else np.load would read a .npy, or call any other file "pickled"
        raise CheckpointError(f"{path} is not a checkpoint: "
                              f"{'the file is empty' if not signature else 'not an .npz (zip) file'}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except ValueError as e:  # numpy refuses object (pickled) arrays when allow_pickle=False
        raise CheckpointError(f"{path} holds pickled data, which is never loaded: {e}") from None
    except (OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise CheckpointError(f"{path} is corrupted or truncated ({type(e).__name__}: {e})") from None
    if "__meta__" not in arrays:
        raise CheckpointError(f"{path} is not a tinygrad_lite checkpoint (no __meta__ header)")
    try:
        meta = json.loads(arrays.pop("__meta__").tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} has an unreadable header: {e}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {meta.get('format_version')}; "
                              f"this code reads version {FORMAT_VERSION}")
    model_state = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    optimizer_state = None
    if "optimizer" in meta:
        optimizer_state = {**meta["optimizer"],
                           "buffers": {k[len("optim/"):]: v for k, v in arrays.items() if k.startswith("optim/")}}
    return model_state, meta, optimizer_state
