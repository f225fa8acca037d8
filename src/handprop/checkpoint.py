"""Checkpoints: one safetensors file holding the tensors and, in its header, the JSON metadata.

One file means one atomic rename: a checkpoint is either the old one or the new one, never
half of each. Loading never unpickles; a digest over tensors and metadata catches a file
that was truncated or altered.
"""

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from .config import ModelConfig, TrainConfig, config_from_dict, validate_model, validate_train
from .data import CorpusInfo, Vocab, form_named
from .errors import UserError
from .models import build_model

LATEST, BEST = "model.safetensors", "best.safetensors"  # checkpoint file names in a work directory
CONFIG_JSON = "config.json"                             # a readable copy of the latest checkpoint's metadata
FORMAT = "handprop-checkpoint"
VERSION = 3                 # 3: the optimiser's tensors and the batch generator in fields of their own
READABLE_VERSIONS = (2, 3)  # 2: the same, kept in 'extra.optim.*' and 'extra.rng.batches'


def atomic_write(path, data):
    """Write bytes to path so a crash at any moment leaves either the old file or the new one."""
    atomic_write_all({path: data})


def atomic_write_all(files):
    """Write {path: bytes}, every file complete before the first is renamed: a failed write changes none of them."""
    staged = {}                             # temporary file -> its final path
    try:
        for path, data in files.items():
            path = Path(path)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            staged[tmp] = path
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in staged.items():
            os.replace(tmp, path)
    finally:
        for tmp in staged:                  # a failed write (no permission, a full disk) leaves no temporary file
            tmp.unlink(missing_ok=True)
    for directory in {path.parent for path in staged.values()}:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)                # make the renames themselves durable
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


@dataclass(frozen=True)
class RunSpec:
    """What defines a run: its configs and the data it trains on (the same from its first step to its last)."""

    model_config: ModelConfig
    train_config: TrainConfig
    vocab: Vocab
    corpus: CorpusInfo      # path, sha256 and item count of the corpus file
    split_signature: str    # hash of the three splits' items (Splits.signature)
    longest_item: int       # characters of the longest item (sampling stops at twice that)

    @property
    def form(self):
        """How the model reads the data and generates: data.WINDOWS or data.SEQUENCES."""
        return form_named(self.model_config.form)


@dataclass
class Checkpoint:
    """A saved run: the model with its spec, how far it got, and the state to continue exactly."""

    spec: RunSpec
    model: object           # a Sequential holding the saved parameters and buffers
    step: int               # optimisation steps done
    best_val: float         # lowest val loss at a save so far (best.safetensors)
    finished: bool          # the run reached max_steps and its final evaluation
    losses: dict | None     # {'train', 'val', 'test'} final losses of a finished run
    optimizer_state: dict   # the optimiser's plain numbers (AdamW's step count)
    optimizer_tensors: dict  # the optimiser's tensors by name (AdamW's moments 'm.<parameter>', 'v.<parameter>')
    batch_generator: torch.Tensor   # the state of the generator that draws the batches (and dropout masks)
    world_size: int = 1     # the ranks that shared each batch when it was saved (the result does not depend on it)


def save_checkpoint(path, checkpoint):
    """The model's parameters and buffers, the extra tensors and the metadata, in one file, atomically."""
    model = checkpoint.model
    tensors = {f"param.{k}": v for k, v in model.parameters().items()}
    tensors |= {f"buffer.{k}": v for k, v in model.buffers().items()}
    tensors |= {f"optimizer.{k}": v for k, v in checkpoint.optimizer_tensors.items()}
    tensors["batch_generator"] = checkpoint.batch_generator
    write_checkpoint(path, tensors, metadata(checkpoint))


def write_checkpoint(path, tensors, meta):
    """Named tensors and JSON metadata as one safetensors file with a digest over both, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta_json = json.dumps(meta, sort_keys=True)
    header = {"handprop": meta_json, "digest": tensors_digest(tensors, meta_json)}
    atomic_write(path, safetensors_bytes(tensors, metadata=header))


def metadata(checkpoint):
    """Everything but the tensors, as plain JSON-able values (also what config.json shows)."""
    spec = checkpoint.spec
    return {
        "format": FORMAT, "version": VERSION,
        "model_config": asdict(spec.model_config), "train_config": asdict(spec.train_config),
        "vocab": list(spec.vocab.chars), "corpus": asdict(spec.corpus), "split_signature": spec.split_signature,
        "longest_item": spec.longest_item, "step": checkpoint.step, "best_val": checkpoint.best_val,
        "finished": checkpoint.finished, "losses": checkpoint.losses, "optimizer_state": checkpoint.optimizer_state,
        "world_size": checkpoint.world_size,
    }


def load_checkpoint(path, device="cpu"):
    """Read and verify a checkpoint; anything wrong with it is one clear UserError."""
    path = Path(path)
    if not path.is_file():
        if path.parent.is_file():
            raise UserError(f"{path.parent} is a file, not a directory: -o names the directory a run was saved in")
        raise UserError(f"no checkpoint at {path} (train one first: handprop train -o {path.parent})")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle is not a dict)
    except Exception as e:  # safetensors reports corruption with several exception types
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if "handprop" not in header:
        raise UserError(f"{path} is a safetensors file but not a handprop checkpoint")
    if header.get("digest") != tensors_digest(tensors, header["handprop"]):
        raise UserError(f"{path} is damaged: its contents do not match the digest written with it")
    meta = json.loads(header["handprop"])
    if meta.get("format") != FORMAT or meta.get("version") not in READABLE_VERSIONS:
        raise UserError(f"{path} is a checkpoint of another format or version than this handprop reads")
    try:
        checkpoint = from_metadata(meta, path)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: its metadata is incomplete or malformed ({type(e).__name__}: {e})") from None
    checkpoint.model = build_model(checkpoint.spec.model_config, device=device)
    _copy_into(checkpoint.model.parameters(), tensors, "param.", path)
    _copy_into(checkpoint.model.buffers(), tensors, "buffer.", path)
    fields = tensor_fields(meta["version"])
    checkpoint.optimizer_tensors = named(tensors, fields["optimizer"])
    if fields["batch_generator"] not in tensors:
        raise UserError(f"{path} does not hold the state of its batch generator")
    checkpoint.batch_generator = tensors[fields["batch_generator"]]
    return checkpoint


def tensor_fields(version):
    """Where a checkpoint of version keeps the optimiser's tensors (a name prefix) and the batch generator's state."""
    if version == 2:
        return {"optimizer": "extra.optim.", "batch_generator": "extra.rng.batches"}
    return {"optimizer": "optimizer.", "batch_generator": "batch_generator"}


def named(tensors, prefix):
    """{name: tensor} for the tensors whose name starts with prefix, the prefix taken off."""
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def from_metadata(meta, path):
    """A Checkpoint (model and tensors still to fill in) from the JSON metadata, every config validated."""
    model_config = validate_model(config_from_dict(ModelConfig, meta["model_config"], path))
    train_config = validate_train(config_from_dict(TrainConfig, meta["train_config"], path), model_config)
    vocab = Vocab(tuple(meta["vocab"]))
    if model_config.vocab_size != vocab.size:
        raise UserError(f"{path}: its vocabulary and its model config disagree")
    spec = RunSpec(model_config, train_config, vocab, CorpusInfo(**meta["corpus"]), meta["split_signature"],
                   int(meta["longest_item"]))
    return Checkpoint(spec, None, int(meta["step"]), float(meta["best_val"]), bool(meta["finished"]),
                      meta["losses"], dict(meta["optimizer_state"]), {}, None, int(meta.get("world_size", 1)))


def check_same_corpus(spec, corpus):
    """The corpus must be the one the run was trained on (checked before its items are encoded)."""
    if corpus.sha256 != spec.corpus.sha256:
        raise UserError(f"{corpus.path} is not the corpus this model was trained on (its contents differ); "
                        "pass the original with -i")


def _copy_into(targets, tensors, prefix, path):
    saved = named(tensors, prefix)
    if set(saved) != set(targets):
        raise UserError(f"{path} does not hold the tensors its own config describes")
    for name, target in targets.items():
        if saved[name].shape != target.shape:
            raise UserError(f"{path}: tensor {name} has shape {tuple(saved[name].shape)}, "
                            f"expected {tuple(target.shape)}")
        target.copy_(saved[name])


def write_readable_config(path, checkpoint):
    """A JSON copy of a checkpoint's metadata for people to read; loading never uses it."""
    atomic_write(path, (json.dumps(metadata(checkpoint), indent=2, sort_keys=True) + "\n").encode())
