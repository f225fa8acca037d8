"""Data-parallel training on torch.distributed: the ranks torchrun launched, and the all-reduces handprop calls.

Every rank draws the same global batch from the same seeded generator and takes its own rows
of it; each computes its gradients by hand; one all-reduce per step sums them (flattened into
one bucket, with the loss and any stop request). Each rank's loss is weighted by its share of
the batch's scored positions, so the sum is the gradient of the global batch's mean loss: N
ranks take the step one process takes with the whole batch. Through Layer.share_batch, BatchNorm
sums its per-feature statistics over the ranks (sync BatchNorm) and Dropout draws the whole
batch's mask and keeps its rows. No DistributedDataParallel: it needs autograd.

World (one process, every collective the identity) and Ranks (a torchrun launch) keep one
contract, so the training loop has no branches for the distributed case.
"""

import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .data import IGNORED
from .errors import UserError

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")   # what torchrun sets for every rank
TIMEOUT_VARIABLE = "HANDPROP_TIMEOUT"   # seconds a rank waits for the others in one collective
DEFAULT_TIMEOUT = 30.0                  # a dead or hung rank stops the others well within a minute
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


class RankLost(Exception):
    """A collective failed: another rank died, or did not answer within the timeout."""


class World:
    """One process training alone: it takes the whole batch, and every sum over ranks is the value itself."""

    rank = 0
    size = 1
    is_main = True              # the rank that writes checkpoints, config.json, logs and figures

    def check_batch(self, batch_size):
        """The global batch must split evenly over the ranks (always true alone)."""

    @contextmanager
    def joined(self):
        """While active, the ranks are connected (nothing to connect alone)."""
        yield self

    def attach(self, model, batch_size):
        """Give the model's BatchNorm and Dropout layers what they need to act on the global batch (nothing alone)."""

    def check_same(self, digest):
        """Every rank starts from the same state: digest() hashes it (alone, nothing to compare or compute)."""

    def shard(self, X, Y):
        """This rank's rows of the global batch, and its weight in the batch's mean loss."""
        return X, Y, 1.0

    def all_reduce(self, grads, loss, stop):
        """Sum the gradients in place, the weighted loss and the stop requests over the ranks: (loss, any stop)."""
        return loss.item(), stop

    def stopping(self, requests, agreed):
        """Whether to stop after this step: alone, any request so far (one that came after the all-reduce too)."""
        return bool(requests)

    def describe(self, batch_size):
        """The log line saying how the ranks share each batch (alone, none is written)."""
        return ""


ALONE = World()


def shard_rows(rank, size, batch_size):
    """The rows [start, stop) of a global batch that rank takes: disjoint, in rank order, covering the batch."""
    per_rank = batch_size // size
    return rank * per_rank, (rank + 1) * per_rank


class Ranks(World):
    """One rank of a torchrun launch: a torch.distributed process group, gloo on CPUs or NCCL on one GPU per rank."""

    def __init__(self, rank, size, local_rank, device, timeout):
        self.rank, self.size = rank, size
        self.local_rank = local_rank        # this rank's number on its machine: its GPU with --device cuda
        self.device = device                # 'cpu' (gloo) or 'cuda' (nccl)
        self.timeout = timeout              # seconds one collective waits for the other ranks

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def backend(self):
        return BACKENDS[self.device]

    def check_batch(self, batch_size):
        if batch_size % self.size:
            raise UserError(f"the global batch (-b {batch_size}) does not split evenly over {self.size} ranks; "
                            f"use a multiple of {self.size}")

    @contextmanager
    def joined(self):
        """While active, this rank is in the process group (torchrun's MASTER_ADDR/PORT), with the timeout set."""
        if self.device == "cuda":
            torch.cuda.set_device(self.local_rank)     # "cuda" now means this rank's GPU
        with self.collective("while the ranks connected"):
            dist.init_process_group(self.backend, rank=self.rank, world_size=self.size,
                                    timeout=timedelta(seconds=self.timeout))
        try:
            with self.collective("while the ranks connected"):
                dist.barrier()                          # NCCL connects lazily: make every rank arrive here
            yield self
        finally:
            dist.destroy_process_group()

    @contextmanager
    def collective(self, what):
        """Turns a failed collective (a peer gone, or silent past the timeout) into one RankLost line."""
        try:
            yield
        except RuntimeError as e:           # DistBackendError, DistNetworkError, DistStoreError (timeouts)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RankLost(f"rank {self.rank} of {self.size}: another rank died or did not answer within "
                           f"{self.timeout:g} s {what} ({self.backend}: {reason[:200]})") from None

    def sum_over_ranks(self, t):
        """t summed over every rank, in place (sync BatchNorm's reducer)."""
        with self.collective("in a BatchNorm all-reduce"):
            dist.all_reduce(t)
        return t

    def attach(self, model, batch_size):
        start, stop = shard_rows(self.rank, self.size, batch_size)
        model.share_batch(slice(start, stop), batch_size, self.sum_over_ranks)     # Layer's declared seam

    def check_same(self, digest):
        mine = torch.tensor(list(bytes.fromhex(digest())), dtype=torch.uint8, device=self.device)  # (32,) sha256
        every = [torch.empty_like(mine) for _ in range(self.size)]
        with self.collective("while checking that the ranks start alike"):
            dist.all_gather(every, mine)
        differing = [r for r, d in enumerate(every) if not torch.equal(d, every[0])]
        if differing:
            raise UserError(f"rank{'s' * (len(differing) > 1)} {', '.join(map(str, differing))} would start from "
                            "another state than rank 0 (another corpus, checkpoint, setting or initial weights): "
                            "every rank needs the same corpus and work dir (a shared file system on several "
                            "machines) and the same versions of handprop and PyTorch")

    def shard(self, X, Y):
        start, stop = shard_rows(self.rank, self.size, X.shape[0])
        scored = (Y != IGNORED).reshape(self.size, -1).sum(1).tolist()    # scored positions of each rank's rows
        return X[start:stop], Y[start:stop], scored[self.rank] / sum(scored)

    def all_reduce(self, grads, loss, stop):
        grads = list(grads.values())
        extra = torch.stack([loss.reshape(()), loss.new_tensor(float(stop))])     # (2,) rides in the same bucket
        bucket = _flatten_dense_tensors(grads + [extra])                           # one flat copy of everything
        with self.collective("in the gradient all-reduce"):
            dist.all_reduce(bucket)
        for g, summed in zip(grads, _unflatten_dense_tensors(bucket[:-2], grads), strict=True):
            g.copy_(summed)
        loss, stops = bucket[-2:].tolist()
        return loss, stops > 0

    def stopping(self, requests, agreed):
        """What the step's all-reduce agreed: every rank stops after the same step (a later request waits a step)."""
        return agreed

    def describe(self, batch_size):
        return (f"data parallel: {self.size} ranks share each batch of {batch_size} ({batch_size // self.size} "
                f"rows each), {self.backend}")


def read_timeout(environ):
    """HANDPROP_TIMEOUT in seconds (DEFAULT_TIMEOUT when unset); anything else is a UserError."""
    text = environ.get(TIMEOUT_VARIABLE)
    if text is None:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 1 <= seconds <= 86400:
        raise UserError(f"{TIMEOUT_VARIABLE} must be a number of seconds from 1 to 86400, got {text!r}")
    return seconds


def launched(device, environ=None):
    """The World of this process: alone, or a rank of a torchrun launch (read from its variables, not yet joined)."""
    environ = os.environ if environ is None else environ
    present = [name for name in LAUNCH_VARIABLES if name in environ]
    if not present:
        return World()
    if len(present) < len(LAUNCH_VARIABLES):
        missing = [name for name in LAUNCH_VARIABLES if name not in environ]
        raise UserError(f"{', '.join(present)} set but not {', '.join(missing)}: launch data-parallel training with "
                        "torchrun, which sets them all")
    try:
        rank, size = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local_rank = int(environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers (torchrun sets them)") from None
    if not (size >= 1 and 0 <= rank < size and local_rank >= 0):
        raise UserError(f"RANK {rank} of WORLD_SIZE {size} is not a rank (torchrun sets them)")
    timeout = read_timeout(environ)
    if size == 1:
        return World()
    if device == "cuda" and local_rank >= torch.cuda.device_count():
        raise UserError(f"--device cuda needs one GPU per rank: rank {rank} is number {local_rank} on its machine, "
                        f"but PyTorch sees {torch.cuda.device_count()} GPU(s) there (start at most that many ranks "
                        "per machine: torchrun --nproc-per-node)")
    return Ranks(rank, size, local_rank, device, timeout)
