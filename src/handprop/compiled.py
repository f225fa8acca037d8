"""The compiled training step: one hand-written step traced into a graph of tensor operations, compiled by Inductor.

Eagerly, a step of the lecture's MLP is some 45 small tensor operations, and each pays PyTorch's
per-call overhead (a few microseconds) for about as much arithmetic. Here the same Python code (the
batch's gather, every layer's forward and backward, clipping, the optimiser's update) runs once
under make_fx, which records each tensor operation it performs into one graph; Inductor fuses that
graph's elementwise work into a few C++ loops around the matrix products. No autograd is involved:
the graph is the hand-written backward, operation for operation, and every later step runs it on
the run's own tensors, updating them in place.

The plain layers stay the reference: tests/test_compiled.py checks compiled steps against eager
ones in float64, for every model.
"""

import time

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from .config import AUTO_COMPILE_STEPS
from .errors import UserError
from .layers import Dropout, walk
from .optim import clip_grad_norm


def compile_obstacle(config, world_size, diagnostics):
    """Why this run cannot take the compiled step, or None if it can."""
    if config.device != "cpu":
        return f"the compiled step is built for the CPU (this run is on {config.device})"
    if world_size > 1:
        return "data-parallel ranks all-reduce between backward and update"
    if diagnostics:
        return "diagnostics record every layer's output eagerly"
    return None


def long_enough(config):
    """Whether --compile auto would compile this run, obstacles aside: compiling takes seconds, once."""
    return config.max_steps >= AUTO_COMPILE_STEPS


def compile_wanted(config, obstacle):
    """Whether to compile the step: --compile on (an obstacle is then an error), or auto on a long enough run."""
    if config.compile == "on" and obstacle:
        raise UserError(f"--compile on: {obstacle}; use --compile auto or off")
    if config.compile == "auto":
        return obstacle is None and long_enough(config)
    return config.compile == "on"


class CompiledStep:
    """A run's training step (batch, forward, backward, clipping, update) as one compiled graph.

    step(ix, lr) does what train.run_steps' eager step does for the rows ix (B,) of examples at
    learning rate lr, and returns the batch's loss (a 0-d tensor). Dropout's noise is drawn outside
    the graph, from each layer's generator in the order the eager forward draws it, and handed in:
    the same masks as the eager step's.
    """

    def __init__(self, model, optimizer, criterion, examples, batch_size, grad_clip):
        self.optimizer = optimizer
        self.dtype = next(iter(model.parameters().values())).dtype
        # every tensor the step reads or updates, passed in so that the graph updates these very tensors
        self.state = [*model.parameters().values(), *model.buffers().values(), *optimizer.tensors(),
                      examples.stream, examples.bounds]
        self.dropouts = [layer for layer in walk(model) if isinstance(layer, Dropout) and layer.p > 0]

        handed = []     # the noise the traced step hands its dropout layers, in the order they draw

        def step(ix, numbers, *noise_and_state):    # the layers and the optimiser reach the state themselves
            handed[:] = noise_and_state[: len(noise_and_state) - len(self.state)]
            X, Y = examples.batch(ix)
            loss = criterion.forward(model.forward(X), Y)
            model.backward(criterion.backward())
            if grad_clip:
                clip_grad_norm(model.grads, grad_clip)
            optimizer.update(model.grads, *numbers.unbind())
            return loss

        ix = torch.zeros(batch_size, dtype=torch.long)     # any rows: the graph depends on their shape only
        numbers = torch.ones(len(optimizer.NUMBERS), dtype=self.dtype)
        started = time.perf_counter()
        try:
            self.draws = noise_draws(self.dropouts, lambda: step(ix, numbers), self.state)
            noise = [torch.rand(shape, dtype=dtype) for _, shape, dtype in self.draws]
            for layer in self.dropouts:
                layer.uniform = lambda shape, dtype, device: handed.pop(0)
            graph = recorded(lambda: make_fx(step)(ix, numbers, *noise, *self.state), self.state)
        finally:
            for layer in self.dropouts:     # back to drawing from the generator
                vars(layer).pop("uniform", None)
        check_constants(graph, self.state)
        example = [ix, numbers, *noise, *(t.clone() for t in self.state)]
        with torch._inductor.config.patch(cpp_wrapper=True):    # the graph's calls from C++: no Python between them
            self.compiled = torch._inductor.standalone_compile(graph, example, dynamic_shapes="from_example_inputs")
        self.seconds = time.perf_counter() - started

    def __call__(self, ix, lr):
        numbers = torch.tensor(self.optimizer.next_numbers(lr), dtype=self.dtype)
        noise = [layer.uniform(shape, dtype, "cpu") for layer, shape, dtype in self.draws]    # as the eager step draws
        return self.compiled(ix, numbers, *noise, *self.state)


def noise_draws(dropouts, run_step, state):
    """(layer, shape, dtype) of each draw of noise in one step, in the order the step draws, found by running one."""
    draws = []
    for layer in dropouts:
        def record(shape, dtype, device, layer=layer):
            draws.append((layer, tuple(shape), dtype))
            return torch.rand(shape, dtype=dtype, device=device)    # not from the run's generator: it stays put
        layer.uniform = record
    recorded(run_step, state)
    return draws


def recorded(fn, state):
    """fn(), which runs a real step to see or record it; every tensor in state is put back as it was."""
    saved = [t.clone() for t in state]
    try:
        return fn()
    finally:
        for t, before in zip(state, saved, strict=True):
            t.copy_(before)


def check_constants(graph, state):
    """A tensor the step reached without it being in state is baked into the graph as a constant: fine for a
    fixed table (window offsets), wrong for a view of anything the step updates, which the graph would freeze."""
    updated = {t.untyped_storage().data_ptr() for t in state}
    for node in graph.graph.nodes:
        if node.op == "get_attr" and getattr(graph, node.target).untyped_storage().data_ptr() in updated:
            raise RuntimeError(f"the compiled step would freeze {node.target}, a view of a tensor it updates")
