"""Checkpoints: a folder of safetensors files and a JSON header, committed by one rename.

What `train.py` writes into its out dir:

    out/checkpoint.json               the commit point: names the current checkpoint folder
    out/ckpt-0000250-3f9a1c/          one checkpoint (iteration 250), never changed once written
        model.safetensors             the weights, under the model's parameter names
        optimizer.safetensors         the optimizer's buffers (AdamW's m and v), if any
        reference.safetensors         DPO only: the frozen reference model
        state.json                    the header: format version, config, tokenizer, iteration,
                                      random-number states, optimizer scalars, and the
                                      sha256 of each file above

safetensors is the format other libraries read (pickle-free: loading a stranger's file
runs no code). Writing is crash-safe and readers never see a mix of two checkpoints:
1. the files go into a new folder under a temporary name, each flushed to disk (fsync),
   then the folder is renamed to its final name;
2. `checkpoint.json` is written to a temporary file and renamed over the old one. That
   rename is atomic: it is the one moment the new checkpoint becomes the current one.
   A reader (sample.py, serve.py, a resume) reads `checkpoint.json` once and then only
   that folder, which no writer touches again;
3. older folders are deleted, except the previous one (a reader may still be in it).
A write that fails at any point (a full disk, no permission) removes what it wrote and
leaves the previous checkpoint as it was. The header's sha256s catch a file damaged on
disk later. An old single-file `ckpt.npz` (format 1) is still read.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "checkpoint.json"  # the commit point
FORMAT_VERSION = 2  # 1 was a single ckpt.npz
LEGACY_NAME = "ckpt.npz"
WEIGHTS, OPTIMIZER, HEADER = "model.safetensors", "optimizer.safetensors", "state.json"
ZIP_SIGNATURE = b"PK\x03\x04"  # the first bytes of every .npz, which is a zip archive


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupted, truncated or incompatible."""


# --- writing --------------------------------------------------------------------------------


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a directory's entries are flushed separately)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory; renames there are durable anyway
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks (checkpoints and downloaded weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save
    _fsync_write(path, save({k: np.ascontiguousarray(v) for k, v in arrays.items()}))


def save_checkpoint(out_dir: str | Path, model_state: dict[str, np.ndarray], meta: dict[str, Any],
                    optimizer_state: dict[str, Any] | None = None,
                    extra: dict[str, dict[str, np.ndarray]] | None = None) -> Path:
    """Write a new checkpoint into out_dir and make it the current one; returns its folder.

    model_state: parameter name -> host array; meta: the JSON-able header (config,
    tokenizer, iteration, ...); optimizer_state: Optimizer.state_dict(); extra: more
    named sets of arrays, each its own <name>.safetensors (DPO's frozen reference model).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{int(meta.get('iter_num', 0)):07d}-{secrets.token_hex(3)}"
    tmp, final = out_dir / f"{name}.tmp", out_dir / name
    manifest_tmp = out_dir / f"{MANIFEST}.{name}.tmp"
    try:
        tmp.mkdir()
        _save_arrays(tmp / WEIGHTS, model_state)
        header = {**meta, "format_version": FORMAT_VERSION}
        header.pop("optimizer", None)  # (a header read back from a checkpoint has one: it is remade here)
        if optimizer_state is not None:
            _save_arrays(tmp / OPTIMIZER, optimizer_state["buffers"])
            header["optimizer"] = {"step": optimizer_state["step"], "lr": optimizer_state["lr"]}
        for extra_name, arrays in (extra or {}).items():
            _save_arrays(tmp / f"{extra_name}.safetensors", arrays)
        header["sha256"] = {f.name: file_sha256(f) for f in sorted(tmp.iterdir())}
        _fsync_write(tmp / HEADER, json.dumps(header).encode("utf-8"))
        _fsync_dir(tmp)
        os.rename(tmp, final)  # 1. the folder is complete
        manifest = {"format_version": FORMAT_VERSION, "checkpoint": name, "state_sha256": file_sha256(final / HEADER)}
        _fsync_write(manifest_tmp, json.dumps(manifest).encode("utf-8"))
        previous = current_folder(out_dir)
        os.replace(manifest_tmp, out_dir / MANIFEST)  # 2. the commit point
    except BaseException:  # a full disk, no permission, Ctrl-C: leave nothing half-written behind
        for path in (tmp, final, manifest_tmp):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise
    _fsync_dir(out_dir)
    _remove_old_folders(out_dir, keep={name, previous})  # 3.
    return final


def current_folder(out_dir: Path) -> str | None:
    """The folder name checkpoint.json points at, or None."""
    try:
        return json.loads((Path(out_dir) / MANIFEST).read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remove_old_folders(out_dir: Path, keep: set) -> None:
    for path in out_dir.glob("ckpt-*"):
        if path.name not in keep and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


# --- reading --------------------------------------------------------------------------------


def has_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / MANIFEST).is_file() or (path / LEGACY_NAME).is_file() or path.name == LEGACY_NAME and path.is_file()


def load_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any] | None]:
    """(model_state, meta, optimizer_state or None) of the current checkpoint of an out dir
    (or of an old ckpt.npz); CheckpointError on any problem."""
    path = Path(path)
    if path.suffix == ".npz" or (path.is_dir() and not (path / MANIFEST).exists() and (path / LEGACY_NAME).exists()):
        return _load_npz(path / LEGACY_NAME if path.is_dir() else path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"no checkpoint at {path} (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        folder = path / manifest["checkpoint"]
        expected_state = manifest["state_sha256"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path} is unreadable ({type(e).__name__}: {e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{manifest_path} has format version {manifest.get('format_version')}; "
                              f"this code reads version {FORMAT_VERSION}")
    return load_checkpoint_folder(folder, expected_state)


def load_extra(out_dir: str | Path, name: str) -> dict[str, np.ndarray]:
    """The arrays save_checkpoint(..., extra={name: ...}) stored in out_dir's current checkpoint."""
    out_dir = Path(out_dir)
    folder = current_folder(out_dir)
    if folder is None:
        raise CheckpointError(f"no checkpoint at {out_dir} (no {MANIFEST})")
    path = out_dir / folder / f"{name}.safetensors"
    meta = json.loads((out_dir / folder / HEADER).read_text(encoding="utf-8"))
    _verify(path, meta.get("sha256", {}).get(path.name))
    return _load_arrays(path)


def _verify(path: Path, expected: str | None) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    if expected is not None and file_sha256(path) != expected:
        raise CheckpointError(f"{path} is corrupted: its sha256 does not match the one recorded "
                              "when it was written")


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError and friends: a damaged file
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None


def load_checkpoint_folder(folder: Path, state_sha256: str | None = None):
    """(model_state, meta, optimizer_state or None) from one checkpoint folder."""
    _verify(folder / HEADER, state_sha256)
    try:
        meta = json.loads((folder / HEADER).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{folder / HEADER} has an unreadable header: {e}") from None
    hashes = meta.get("sha256", {})
    _verify(folder / WEIGHTS, hashes.get(WEIGHTS))
    model_state = _load_arrays(folder / WEIGHTS)
    optimizer_state = None
    if "optimizer" in meta:
        _verify(folder / OPTIMIZER, hashes.get(OPTIMIZER))
        optimizer_state = {**meta["optimizer"], "buffers": _load_arrays(folder / OPTIMIZER)}
    return model_state, meta, optimizer_state


def _load_npz(path: Path):
    """Format 1: one .npz holding model/..., optim/... arrays and a JSON __meta__ array."""
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
    if meta.get("format_version") != 1:
        raise CheckpointError(f"{path} has format version {meta.get('format_version')}; this code reads 1 and 2")
    model_state = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    optimizer_state = None
    if "optimizer" in meta:
        optimizer_state = {**meta["optimizer"],
                           "buffers": {k[len("optim/"):]: v for k, v in arrays.items() if k.startswith("optim/")}}
    return model_state, meta, optimizer_state
