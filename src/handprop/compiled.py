"""The compiled training step: one hand-written step traced into a graph of tensor operations, compiled by Inductor.

Eagerly, a step of the lecture's MLP is some 45 small tensor operations, and each pays PyTorch's
per-call overhead (a few microseconds) for about as much arithmetic. Here the same Python code (the
batch's gather, every layer's forward and backward, clipping, the optimiser's update) runs once
under make_fx, which records each tensor operation it performs into one graph; Inductor fuses that
graph's elementwise work into a few C++ loops around the matrix products. No autograd is involved:
the graph is the hand-written backward, operation for operation, and every later step runs it on
the run's own tensors, updating them in place.

The step's body is step.py's, written once: the traced function calls the same forward_backward and
clip_and_update the eager step calls, and a CompiledStep answers the eager step's call. The plain
layers stay the reference: tests/test_compiled.py checks compiled steps against eager ones in
float64, for every model.
"""

import time
from contextlib import contextmanager

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from .config import AUTO_COMPILE_STEPS
from .errors import UserError
from .packing import capacity, fixed_positions, pack
from .step import EagerStep, clip_and_update, forward_backward


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

    step(rows, lr, stop) is step.EagerStep's call, for one process: the same step on the rows (B,) of
    examples at learning rate lr; it returns (the batch's loss, stop). Dropout's noise is drawn outside
    the graph, from each layer's generator in the order the eager forward draws it, and handed in
    through the layers' noise source (Layer.take_noise_from): the same masks as the eager step's.

    A model that packs (packing.py) computes a fixed number of rows in every step: the batch's real
    positions and enough padding cells to fill them. The rare batch with more real positions than
    that takes the eager step, which does the same arithmetic.
    """

    def __init__(self, model, optimizer, criterion, examples, batch_size, grad_clip):
        self.optimizer, self.examples = optimizer, examples
        self.dtype = next(iter(model.parameters().values())).dtype
        self.rows = capacity(examples, batch_size) if model.packs else 0     # rows of a packed batch; 0: not packed
        # every tensor the step reads or updates, passed in so that the graph updates these very tensors
        self.state = [*model.parameters().values(), *model.buffers().values(), *optimizer.tensors(),
                      examples.stream, examples.bounds]

        handed = []     # the noise the traced step hands its dropout layers, in the order they draw

        def step(ix, index, numbers, *noise_and_state):     # the layers and the optimiser reach the state themselves
            handed[:] = noise_and_state[: len(noise_and_state) - len(self.state)]
            X, Y = examples.batch(ix, padded_to=examples.width)     # one shape for every step: one graph
            if self.rows:
                X, Y = pack(X, Y, index)                            # index (rows,): every step the same shape
            loss = forward_backward(model, criterion, X, Y)
            clip_and_update(model, optimizer, grad_clip, numbers.unbind())
            return loss

        ix = torch.zeros(batch_size, dtype=torch.long)     # any rows: the graph depends on their shape only
        index = torch.arange(self.rows)                     # any cells (the first always counts): the same
        numbers = torch.ones(len(optimizer.NUMBERS), dtype=self.dtype)
        started = time.perf_counter()
        self.draws = noise_draws(model, lambda: step(ix, index, numbers), self.state)
        noise = [torch.rand(shape, dtype=dtype) for _, shape, dtype in self.draws]
        with noise_from(model, lambda layer, shape, dtype, device: handed.pop(0)):
            graph = recorded(lambda: make_fx(step)(ix, index, numbers, *noise, *self.state), self.state)
        check_constants(graph, self.state)
        example = [ix, index, numbers, *noise, *(t.clone() for t in self.state)]
        with torch._inductor.config.patch(cpp_wrapper=True):    # the graph's calls from C++: no Python between them
            self.compiled = torch._inductor.standalone_compile(graph, example, dynamic_shapes="from_example_inputs")
        self.seconds = time.perf_counter() - started
        self.eager = EagerStep(model, optimizer, criterion, examples, grad_clip) if self.rows else None

    def __call__(self, rows, lr, stop=False):
        """(the batch's mean loss, stop) after one step on the rows (B,) at lr: step.EagerStep's call."""
        index = self.no_index
        if self.rows:
            index = fixed_positions(self.examples.batch(rows, padded_to=self.examples.width)[1], self.rows)
            if index is None:               # more real positions than the graph holds
                return self.eager(rows, lr, stop)
        numbers = torch.tensor(self.optimizer.next_numbers(lr), dtype=self.dtype)
        noise = [layer.uniform(shape, dtype, "cpu") for layer, shape, dtype in self.draws]    # as the eager step draws
        return self.compiled(rows, index, numbers, *noise, *self.state).item(), stop

    no_index = torch.zeros(0, dtype=torch.long)     # the index input of a graph that does not pack


@contextmanager
def noise_from(model, source):
    """While active, every layer of model that draws noise gets it from source(layer, shape, dtype, device)."""
    model.take_noise_from(source)
    try:
        yield
    finally:
        model.take_noise_from(None)         # back to each layer's own generator


def noise_draws(model, run_step, state):
    """(layer, shape, dtype) of each draw of noise in one step, in the order the step draws, found by running one."""
    draws = []

    def record(layer, shape, dtype, device):
        draws.append((layer, tuple(shape), dtype))
        return torch.rand(shape, dtype=dtype, device=device)    # not from the run's generator: it stays put

    with noise_from(model, record):
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
