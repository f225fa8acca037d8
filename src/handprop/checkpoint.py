"""Checkpoints: one safetensors file holding the tensors and, in its header, the JSON metadata.

One file means one atomic rename: a checkpoint is either the old one or the new one, never
half of each. Loading never unpickles; a digest over tensors and metadata catches a file
that was truncated or altered.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from .data import Vocab
from .errors import UserError
from .models import build_model, config_from_dict

FORMAT = "handprop-checkpoint"
VERSION = 1


def atomic_write(path, data):
    """Write bytes to path so a crash at any moment leaves either the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)                    # make the rename itself durable
    finally:
        os.close(dir_fd)


def tensors_digest(tensors, text=""):
    """sha256 over text and every tensor's name, dtype, shape and bytes: equal contents, equal digest."""
    h = hashlib.sha256(text.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path, model, meta, extra=None):
    """Model parameters and buffers (+ extra tensors, e.g. optimiser state) with meta, atomically."""
    tensors = {f"param.{k}": v for k, v in model.parameters().items()}
    tensors |= {f"buffer.{k}": v for k, v in model.buffers().items()}
    tensors |= {f"extra.{k}": v for k, v in (extra or {}).items()}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"format": FORMAT, "version": VERSION} | meta
    meta_json = json.dumps(meta, sort_keys=True)
    header = {"handprop": meta_json, "digest": tensors_digest(tensors, meta_json)}
    atomic_write(path, safetensors_bytes(tensors, metadata=header))


@dataclass
class Checkpoint:
    model: object           # a Sequential holding the saved parameters and buffers
    vocab: Vocab
    meta: dict              # everything save_checkpoint was given, plus format and version
    extra: dict             # the extra tensors (optimiser state, random generator state)


def load_checkpoint(path, device="cpu"):
    """Read and verify a checkpoint; anything wrong with it is one clear UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path} (train one first: handprop train -o {path.parent})")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors reports corruption with several exception types
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if "handprop" not in header:
        raise UserError(f"{path} is a safetensors file but not a handprop checkpoint")
    if header.get("digest") != tensors_digest(tensors, header["handprop"]):
        raise UserError(f"{path} is damaged: its contents do not match the digest written with it")
    meta = json.loads(header["handprop"])
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise UserError(f"{path} is a checkpoint of another format or version than this handprop reads")
    config = config_from_dict(meta["model_config"])
    if config.vocab_size != len(meta["vocab"]) + 1:
        raise UserError(f"{path}: its vocabulary and its model config disagree")
    model = build_model(config, device=device)
    _copy_into(model.parameters(), tensors, "param.", path)
    _copy_into(model.buffers(), tensors, "buffer.", path)
    extra = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
    return Checkpoint(model, Vocab(tuple(meta["vocab"])), meta, extra)


def check_same_corpus(meta, corpus):
    """The corpus must be the one the checkpoint was trained on (checked before its items are encoded)."""
    if corpus.sha256 != meta["corpus"]["sha256"]:
        raise UserError(f"{corpus.path} is not the corpus this model was trained on (its contents differ); pass the original with -i")


def _copy_into(targets, tensors, prefix, path):
    saved = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    if set(saved) != set(targets):
        raise UserError(f"{path} does not hold the tensors its own config describes")
    for name, target in targets.items():
        if saved[name].shape != target.shape:
            raise UserError(f"{path}: tensor {name} has shape {tuple(saved[name].shape)}, expected {tuple(target.shape)}")
        target.copy_(saved[name])


def write_readable_config(path, meta):
    """A JSON copy of a checkpoint's metadata for people to read; loading never uses it."""
    atomic_write(path, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
