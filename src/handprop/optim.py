"""Optimisers that apply hand-computed gradients in place, learning-rate schedules, gradient clipping."""

import math
from functools import partial

import torch

from .config import OPTIMIZERS, SCHEDULES
from .errors import UserError


def lecture_lr(step, max_steps, lr, decay_at=0.5):
    """lr for the first max(1, int(decay_at * max_steps)) steps, then lr / 10 (the lectures' single step decay)."""
    # max(1, ...): even a one-step run takes its first step at the undecayed rate
    return lr if step < max(1, int(decay_at * max_steps)) else lr / 10


def warmup_cosine_lr(step, max_steps, lr, warmup, min_lr):
    """Linear warmup to lr over warmup steps, then cosine decay to min_lr at max_steps (nanoGPT's get_lr)."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)   # never 0: the first step already moves the weights
    if step >= max_steps:
        return min_lr
    progress = (step - warmup) / (max_steps - warmup)       # 0 at the end of warmup, 1 at max_steps
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def make_schedule(name, max_steps, lr, decay_at=0.5, warmup=0, min_lr=0.0):
    """The named schedule as a function step -> learning rate; a bad name or setting is a UserError."""
    if name == "step":
        return partial(lecture_lr, max_steps=max_steps, lr=lr, decay_at=decay_at)
    if name == "cosine":
        if not 0 <= warmup < max_steps:
            raise UserError(f"warmup must be at least 0 and shorter than the run: {warmup} warmup steps of {max_steps}")
        if not 0 <= min_lr <= lr:
            raise UserError(f"min_lr must lie between 0 and the learning rate {lr:g}, got {min_lr:g}")
        return partial(warmup_cosine_lr, max_steps=max_steps, lr=lr, warmup=warmup, min_lr=min_lr)
    raise UserError(f"unknown learning-rate schedule {name!r} (choose {' or '.join(SCHEDULES)})")


def clip_grad_norm(grads, max_norm):
    """Scale all gradients in place so their global L2 norm is at most max_norm; returns that norm before clipping."""
    # torch.nn.utils.clip_grad_norm_'s semantics, computed on the device: no .item(), so no host sync
    grads = list(grads.values())
    # each gradient's norm, then theirs (torch._foreach_norm's arithmetic; a compiled step calls this one from C++)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))  # 0-d tensor
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)                            # exactly 1 when not clipping
    torch._foreach_mul_(grads, scale)
    return total


class SGD:
    """p <- p - lr * dp."""

    NUMBERS = ("lr",)                           # what next_numbers returns, in order

    def __init__(self, params):
        self.params = params                    # {name: tensor}, updated in place

    def step(self, grads, lr):
        self.update(grads, *self.next_numbers(lr))

    def next_numbers(self, lr):
        """The next step's numbers, computed on the host (a compiled step takes them as tensors)."""
        return (lr,)

    def update(self, grads, lr):
        # -lr * dp, then added, rounded as the lecture's p.data += -lr * p.grad; one fused call each
        # (torch.optim's foreach path); lr may be a number or a 0-d tensor
        steps = torch._foreach_mul([grads[name] for name in self.params], -lr)
        torch._foreach_add_(list(self.params.values()), steps)

    def tensors(self):
        """The tensors update() reads and writes besides the parameters and gradients."""
        return []

    def state_dict(self):
        return {}, {}                           # (tensors, plain numbers): plain SGD has no state

    def load_state_dict(self, tensors, numbers):
        pass


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019), bias-corrected moments.

    The moments live in one flat buffer each, so a step is a handful of whole-buffer operations
    instead of a dozen per parameter; self.m and self.v name views of them, one per parameter.
    """

    NUMBERS = ("step_size", "v_correction", "decay")     # what next_numbers returns, in order

    def __init__(self, params, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, decayed=None):
        self.params, self.betas, self.eps, self.weight_decay = params, betas, eps, weight_decay
        self.names = list(params)
        # names of the parameters weight decay shrinks; None: all of them (torch.optim.AdamW with one group)
        self.decayed = [params[k] for k in self.names if decayed is None or k in decayed]
        total = sum(p.numel() for p in params.values())
        first = next(iter(params.values()))
        self.flat_m, self.flat_v, self.flat_grad, self.flat_update = (
            first.new_zeros(total) for _ in range(4))                       # (P,) each, every parameter end to end
        self.m, self.v = self.views(self.flat_m), self.views(self.flat_v)     # for saving and loading
        self.t = 0

    def views(self, flat):
        """{name: the slice of flat that belongs to that parameter, in its shape}."""
        sizes = [self.params[k].numel() for k in self.names]
        return {k: part.view(self.params[k].shape) for k, part in zip(self.names, flat.split(sizes), strict=True)}

    def step(self, grads, lr):
        self.update(grads, *self.next_numbers(lr))

    def next_numbers(self, lr):
        """Counts the step; its numbers, computed on the host (a compiled step takes them as tensors):
        lr / (1 - b1^t), the bias correction of m folded in; sqrt(1 - b2^t), v's; the weight decay's factor."""
        self.t += 1
        b1, b2 = self.betas
        return lr / (1 - b1**self.t), math.sqrt(1 - b2**self.t), 1 - lr * self.weight_decay

    def update(self, grads, step_size, v_correction, decay):
        # torch.optim.AdamW's update (its single-tensor path), on the flat buffers; the numbers may be 0-d tensors
        b1, b2 = self.betas
        g = torch.cat([grads[k].reshape(-1) for k in self.names], out=self.flat_grad)     # (P,)
        self.flat_m.lerp_(g, 1 - b1)                                    # m <- b1 m + (1 - b1) g
        self.flat_v.mul_(b2).addcmul_(g, g, value=1 - b2)               # v <- b2 v + (1 - b2) g^2
        # update = lr m_hat / (sqrt(v_hat) + eps), m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t)
        denom = torch.sqrt(self.flat_v, out=self.flat_update).div_(v_correction).add_(self.eps)
        torch.div(self.flat_m, denom, out=self.flat_update).mul_(step_size)
        if self.decayed and self.weight_decay:
            torch._foreach_mul_(self.decayed, decay)                    # decay the weights, not the gradient
        params = [self.params[k] for k in self.names]
        # p <- p - update; the views are made here, each step: one made once would be frozen into a compiled step
        torch._foreach_sub_(params, list(self.views(self.flat_update).values()))

    def tensors(self):
        """The tensors update() reads and writes besides the parameters and gradients."""
        return [self.flat_m, self.flat_v, self.flat_grad, self.flat_update]

    def state_dict(self):
        tensors = {f"m.{k}": v for k, v in self.m.items()} | {f"v.{k}": v for k, v in self.v.items()}
        return tensors, {"t": self.t}

    def load_state_dict(self, tensors, numbers):
        for name in self.names:
            self.m[name].copy_(tensors[f"m.{name}"])
            self.v[name].copy_(tensors[f"v.{name}"])
        self.t = numbers["t"]


def decayed_names(params):
    """The names of the parameters AdamW's weight decay shrinks: the matrices (weights and embeddings), not the
    biases and gains, as nanoGPT and makemore group them."""
    return {name for name, p in params.items() if p.ndim >= 2}


def make_optimizer(name, params, weight_decay=0.0):
    """The named optimiser over params; AdamW's weight decay shrinks the matrices only (decayed_names)."""
    if name == "sgd":
        return SGD(params)                      # no weight decay: the lectures' plain SGD
    if name == "adamw":
        return AdamW(params, weight_decay=weight_decay, decayed=decayed_names(params))
    raise UserError(f"unknown optimizer {name!r} (choose {' or '.join(OPTIMIZERS)})")
