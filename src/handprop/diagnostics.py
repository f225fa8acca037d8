"""Looking inside training: statistics of the hand-written forward and backward passes.

At a recorded step every Sequential in the model, nested ones included, keeps its layers'
outputs and the gradient of the loss with respect to each (Sequential.record), and
Diagnostics turns them into the lecture's numbers (part 3): the output mean and std of the
watched layers (tanh layers; the transformer's LayerNorm, attention and GELU outputs; the
recurrent models' hidden states) and the saturation of those that are tanh outputs; every
layer's gradient mean and std; each weight matrix's grad:data ratio; each parameter's log10
update:data ratio. In the sequence models only the positions the loss counts enter a
statistic (padding is left out). The minibatch loss of every step is kept for the loss curve.
A History is what a run recorded; it is saved as diagnostics.safetensors next to the model
and drawn by report.py.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from .checkpoint import atomic_write, tensors_digest
from .errors import UserError
from .layers import GELU, CausalSelfAttention, LayerNorm, Recurrent, RNNCell, Sequential, Tanh, walk

SATURATION = 0.97           # |tanh| above this passes back under 6% of the gradient (1 - 0.97^2)
FILENAME = "diagnostics.safetensors"
FORMAT = "handprop-diagnostics"
VERSION = 1
# the layers whose outputs are watched (the activations figure): tanh layers (the lectures), the transformer's
# LayerNorm, attention and GELU outputs, a recurrent model's hidden states
WATCHED = (Tanh, LayerNorm, CausalSelfAttention, GELU, Recurrent)


@dataclass
class History:
    """Everything a run recorded; saved as diagnostics.safetensors and drawn by report.py.

    Statistics ('series') and what their columns are (a series no layer of the model has is left out):
      val_loss        ['val']           loss on the whole val split (eval mode) as the step began
      act_mean/_std   watched layers    of the layer's output
      act_saturation  tanh outputs      % of outputs with |t| > 0.97 (Tanh layers, an RNN's hidden states)
      grad_mean/_std  every layer       of dL/d(layer output); nested layers by path, e.g. '2.inner.1.GELU'
      grad_data       weight matrices   std(dL/dW) / std(W), W as the optimiser gets it (after clipping)
      update_ratio    every parameter   log10(std(update) / std(parameter after the update))
    Snapshots: 'act.<label>' of the watched layers, 'grad.<label>' of the watched layers (and, in the sequence
    models, of the logits), 'weight_grad.<name>' of the weight matrices; at the first and the last recorded step.
    In the sequence models statistics and snapshots cover only the positions the loss counts: (N, C) tensors.
    """

    columns: dict                   # series name -> label of each column, e.g. 'act_std' -> ['2.Tanh', '5.Tanh']
    train_loss: list                # the minibatch loss of every step (nan: before a resume that found no history)
    steps: list = field(default_factory=list)       # the recorded steps, in order
    series: dict = field(default_factory=dict)      # series name -> one list of numbers per recorded step
    snapshots: dict = field(default_factory=dict)   # 'first.act.3.Tanh', 'last.weight_grad.1.weight', ... -> tensor
    digest: str = ""                # of the parameters when saved: ties this history to its model.safetensors

    def column(self, name, label):
        """The values of one column of a series, one per recorded step."""
        k = self.columns[name].index(label)
        return [row[k] for row in self.series[name]]

    def save(self, path):
        """Write the history to path atomically (safetensors: tensors and a JSON header, no pickle)."""
        tensors = {"train_loss": torch.tensor(self.train_loss, dtype=torch.float32),
                   "steps": torch.tensor(self.steps, dtype=torch.int64)}
        for name, labels in self.columns.items():
            rows = self.series.get(name, [])
            tensors[f"series.{name}"] = torch.tensor(rows, dtype=torch.float64).reshape(len(rows), len(labels))
        tensors |= {f"snapshot.{k}": v.detach().cpu().contiguous() for k, v in self.snapshots.items()}
        header = {"format": FORMAT, "version": VERSION, "columns": self.columns, "digest": self.digest}
        atomic_write(path, safetensors_bytes(tensors, metadata={FORMAT: json.dumps(header)}))


def load_history(path):
    """Read a diagnostics.safetensors; anything wrong with it is one clear UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no recorded diagnostics at {path} (train with --diagnostics to record them)")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {})[FORMAT])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle is no dict)
        if header["format"] != FORMAT or header["version"] != VERSION:
            raise ValueError("another format or version")
        columns = header["columns"]
        return History(
            columns=columns,
            train_loss=tensors["train_loss"].tolist(),
            steps=tensors["steps"].tolist(),
            series={name: tensors[f"series.{name}"].tolist() for name in columns},
            snapshots={k.removeprefix("snapshot."): v for k, v in tensors.items() if k.startswith("snapshot.")},
            digest=header["digest"],
        )
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:  # a damaged or foreign file, not a bug
        raise UserError(f"{path} is not a readable handprop diagnostics file ({type(e).__name__}: {e})") from None


def parameters_digest(model):
    """sha256 over the parameters' names and values: the same model gives the same digest."""
    return tensors_digest(model.parameters())


def named_children(layer):
    """(name, child) for each layer inside layer, named as the child's parameters are: '2' in a Sequential, 'inner'."""
    if isinstance(layer, Sequential):
        return [(str(i), child) for i, child in enumerate(layer.layers)]
    attribute = {id(value): name for name, value in vars(layer).items()}   # Residual.inner -> 'inner'
    return [(attribute[id(child)], child) for child in layer.children()]


def recorded_layers(layer, path=""):
    """(label, sequential, index) for every layer a Sequential runs, nested ones included, depth first.

    A label is the layer's path (as its parameters are named) and kind: '3.Tanh', '2.inner.1.CausalSelfAttention'.
    """
    for name, child in named_children(layer):
        if isinstance(layer, Sequential):
            yield f"{path}{name}.{type(child).__name__}", layer, int(name)
        yield from recorded_layers(child, f"{path}{name}.")


def is_tanh_output(layer):
    """Whether layer's output is a tanh's, whose saturation (|t| > 0.97) blocks the gradient: Tanh, an RNN's state.

    A GRU's hidden state mixes the previous one with a tanh candidate; its gradient passes back through (1 - z)
    however close to 1 it is, so its saturation would say nothing.
    """
    return isinstance(layer, Tanh) or (isinstance(layer, Recurrent) and isinstance(layer.cell, RNNCell))


def scored_positions(dlogits):
    """(B, T) True where the loss counts a position of sequence logits (B, T, V); None for window logits (B, V).

    The padded positions' logits get exactly zero gradient; a counted position's row, softmax minus one-hot, never
    is all zeros (that needs every other probability to underflow to 0).
    """
    return dlogits.ne(0).any(-1) if dlogits.ndim == 3 else None


def at_scored(t, scored):
    """t (B, T, ...) at the positions the loss counts, (N, ...); t itself for a window model (scored None)."""
    return t if scored is None else t[scored]


def step_statistics(acts, saturable, grads, weights, params, param_grads):
    """This step's statistics from the recorded tensors: {series: [one number per column]}, empty series left out."""
    values = {
        "act_mean": [t.mean() for t in acts],          # each (B, C), (B, T, C) or (N, C)
        "act_std": [t.std() for t in acts],
        # float64: a share of a count, in full
        "act_saturation": [(t.abs() > SATURATION).double().mean() * 100 for t in saturable],
        "grad_mean": [g.mean() for g in grads],        # dL/d(output), same shapes as the outputs
        "grad_std": [g.std() for g in grads],
        "grad_data": [param_grads[w].std() / params[w].std() for w in weights],
    }
    return {name: torch.stack(v).tolist() for name, v in values.items() if v}   # one device sync per series


def update_ratios(before, after):
    """log10(std(after - before) / std(after)) for each parameter: how far one step moved it."""
    return torch.stack([((after[k] - before[k]).std() / after[k].std()).log10() for k in after]).tolist()


def open_summary_writer(work_dir):
    """A TensorBoard SummaryWriter logging into work_dir, or a UserError saying how to get one."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install 'handprop[tensorboard]'") from None
    return SummaryWriter(log_dir=str(work_dir))


class Diagnostics:
    """Records a History while a run trains: the loss every step, the statistics every `every` steps.

    The training loop calls, per step:
        diagnostics.begin(step)                  before the forward pass
        diagnostics.after_backward()             after backward, before the optimiser
        diagnostics.after_update(step, loss)     after the optimiser
    and diagnostics.save(work_dir) beside every checkpoint, diagnostics.finish(work_dir) at the end.
    NoDiagnostics has the same methods and does nothing, so the loop needs no conditionals.
    """

    def __init__(self, model, every, max_steps, val_loss, writer=None, start_step=0, previous=None):
        self.model, self.every, self.max_steps = model, every, max_steps
        self.val_loss = val_loss                # () -> loss on the val split, in eval mode
        self.writer = writer                    # a TensorBoard SummaryWriter, or None
        self.sequentials = [layer for layer in walk(model) if isinstance(layer, Sequential)]   # each records its own
        self.recorded = list(recorded_layers(model))     # (label, sequential, index) of every layer, nested included
        layers = {label: sequential.layers[i] for label, sequential, i in self.recorded}
        self.watched = [label for label, layer in layers.items() if isinstance(layer, WATCHED)]
        self.saturable = [label for label in self.watched if is_tanh_output(layers[label])]
        # the gradients figure: the watched layers'; the sequence models' also the logits', where their backward starts
        logits = f"{len(model.layers) - 1}.{type(model.layers[-1]).__name__}"
        new_kinds = any(not isinstance(layers[label], Tanh) for label in self.watched)
        self.gradients_shown = self.watched + [logits] * new_kinds
        params = model.parameters()
        self.weights = [name for name, p in params.items() if p.ndim == 2]
        columns = {
            "val_loss": ["val"],
            "act_mean": self.watched, "act_std": self.watched, "act_saturation": self.saturable,
            "grad_mean": list(layers), "grad_std": list(layers),
            "grad_data": self.weights,
            "update_ratio": list(params),
        }
        columns = {name: labels for name, labels in columns.items() if labels}
        fresh = History(columns, train_loss=[math.nan] * start_step, series={name: [] for name in columns})
        self.history = previous or fresh
        self.logged_up_to = start_step          # train losses before this step are in TensorBoard already
        self.row = None                         # the recorded step's numbers until its update is known
        self.before = None                      # the parameters as the recorded step began

    def record(self, on):
        """Every Sequential in the model keeps (on) or stops keeping its layers' passes."""
        for sequential in self.sequentials:
            sequential.record = on

    def begin(self, step):
        """Records step if it is the first, an `every`-th or the last: the model then keeps its passes."""
        self.record(step % self.every == 0 or step == self.max_steps - 1)

    def after_backward(self):
        """At a recorded step: statistics of the passes, the val loss, and the parameters before the update."""
        model = self.model
        if not model.record:
            return
        self.record(False)                      # the val forward below must not replace what was kept
        outputs = {label: sequential.outputs[i] for label, sequential, i in self.recorded}
        grads = {label: sequential.output_grads[i] for label, sequential, i in self.recorded}
        scored = scored_positions(model.output_grads[-1])
        outputs = {label: at_scored(t, scored) for label, t in outputs.items()}
        grads = {label: at_scored(g, scored) for label, g in grads.items()}
        self.row = step_statistics([outputs[k] for k in self.watched], [outputs[k] for k in self.saturable],
                                   list(grads.values()), self.weights, model.parameters(), model.grads)
        self.keep_snapshots(outputs, grads)
        self.before = {k: p.clone() for k, p in model.parameters().items()}
        self.row["val_loss"] = [self.val_loss()]

    def keep_snapshots(self, outputs, grads):
        """The tensors behind the histograms, at the first recorded step and (so far) the last."""
        snapshots = {f"act.{label}": outputs[label].detach().cpu().clone() for label in self.watched}
        snapshots |= {f"grad.{label}": grads[label].detach().cpu().clone() for label in self.gradients_shown}
        param_grads = self.model.grads
        for w in self.weights:
            snapshots[f"weight_grad.{w}"] = param_grads[w].detach().cpu().clone()
        if not self.history.steps:      # the first recorded step: a copy of its own: safetensors refuses shared storage
            self.history.snapshots |= {f"first.{k}": v.clone() for k, v in snapshots.items()}
        self.history.snapshots |= {f"last.{k}": v for k, v in snapshots.items()}

    def after_update(self, step, loss):
        """Keep this step's loss (a float); at a recorded step, add the update:data ratios and store the row."""
        self.history.train_loss.append(loss)
        if self.row is None:
            return
        self.row["update_ratio"] = update_ratios(self.before, self.model.parameters())
        self.history.steps.append(step)
        for name, values in self.row.items():
            self.history.series[name].append(values)
        if self.writer is not None:
            self.log_to_tensorboard(step)
        self.row = self.before = None

    def log_to_tensorboard(self, step):
        """The recorded row as scalars, the train loss averaged since the last row, and the histograms."""
        window = self.history.train_loss[self.logged_up_to : step + 1]
        self.writer.add_scalar("loss/train", sum(window) / len(window), step)
        self.logged_up_to = step + 1
        for name, values in self.row.items():
            for label, value in zip(self.history.columns[name], values, strict=True):
                self.writer.add_scalar(f"{name}/{label}", value, step)
        for k, v in self.history.snapshots.items():
            if k.startswith("last."):
                self.writer.add_histogram(k.removeprefix("last."), v, step)

    def save(self, work_dir):
        """Write the history so far into work_dir, tied to the parameters as they are (saved beside them)."""
        self.history.digest = parameters_digest(self.model)
        self.history.save(Path(work_dir) / FILENAME)
        if self.writer is not None:
            self.writer.flush()

    def finish(self, work_dir):
        """The last save, and TensorBoard closed."""
        self.save(work_dir)
        if self.writer is not None:
            self.writer.close()


class NoDiagnostics:
    """The recorder of a run that records nothing: every call does nothing."""

    def begin(self, step):
        pass

    def after_backward(self):
        pass

    def after_update(self, step, loss):
        pass

    def save(self, work_dir):
        pass

    def finish(self, work_dir):
        pass


def start_diagnostics(model, config, work_dir, step, val_loss):
    """The recorder config asks for (NoDiagnostics when diagnostics_every is 0), continuing work_dir's history."""
    if not config.diagnostics_every:
        return NoDiagnostics()
    writer = open_summary_writer(work_dir) if config.tensorboard else None
    previous = None
    if step > 0 and (Path(work_dir) / FILENAME).exists():
        history = load_history(Path(work_dir) / FILENAME)
        if history.digest == parameters_digest(model) and len(history.train_loss) == step:
            previous = history                  # saved with the checkpoint this run resumes from
    return Diagnostics(model, config.diagnostics_every, config.max_steps, val_loss, writer, step, previous)
