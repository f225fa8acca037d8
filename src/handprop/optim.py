"""Optimisers that apply hand-computed gradients in place, and the lecture's step schedule."""

import torch


def lecture_lr(step, max_steps, lr, decay_at=0.5):
    """lr until decay_at * max_steps, then lr / 10 (the lectures' single step decay)."""
    return lr if step < int(decay_at * max_steps) else lr / 10


class SGD:
    """p <- p - lr * dp."""

    def __init__(self, params):
        self.params = params                    # {name: tensor}, updated in place

    def step(self, grads, lr):
        # p -= lr * dp for every parameter, in one fused call (torch.optim's foreach path)
        torch._foreach_add_(list(self.params.values()), [grads[name] for name in self.params], alpha=-lr)

    def state_dict(self):
        return {}, {}                           # (tensors, plain numbers): plain SGD has no state

    def load_state_dict(self, tensors, numbers):
        pass


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019), bias-corrected moments."""

    def __init__(self, params, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01):
        self.params, self.betas, self.eps, self.weight_decay = params, betas, eps, weight_decay
        self.m = {name: torch.zeros_like(p) for name, p in params.items()}   # first moment
        self.v = {name: torch.zeros_like(p) for name, p in params.items()}   # second moment
        self.t = 0

    def step(self, grads, lr):
        self.t += 1
        b1, b2 = self.betas
        for name, p in self.params.items():
            g = grads[name]
            self.m[name].mul_(b1).add_(g, alpha=1 - b1)
            self.v[name].mul_(b2).addcmul_(g, g, value=1 - b2)
            m_hat = self.m[name] / (1 - b1**self.t)
            v_hat = self.v[name] / (1 - b2**self.t)
            p.mul_(1 - lr * self.weight_decay)  # decay the weights themselves, not the gradient
            p.sub_(lr * m_hat / (v_hat.sqrt() + self.eps))

    def state_dict(self):
        tensors = {f"m.{k}": v for k, v in self.m.items()} | {f"v.{k}": v for k, v in self.v.items()}
        return tensors, {"t": self.t}

    def load_state_dict(self, tensors, numbers):
        for name in self.params:
            self.m[name].copy_(tensors[f"m.{name}"])
            self.v[name].copy_(tensors[f"v.{name}"])
        self.t = numbers["t"]


def make_optimizer(name, params, weight_decay=0.0):
    return SGD(params) if name == "sgd" else AdamW(params, weight_decay=weight_decay)
