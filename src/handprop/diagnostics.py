"""Looking inside training: statistics of the hand-written forward and backward passes.

At a recorded step the model keeps every layer's output and the gradient of the loss with
respect to it (Sequential.record), and Diagnostics turns them into the lecture's numbers
(part 3): each tanh layer's output mean, std and saturation; each layer's gradient mean and
std; each weight matrix's grad:data ratio; each parameter's log10 update:data ratio. The
minibatch loss of every step is kept for the loss curve. A History is what a run recorded;
it is saved as diagnostics.safetensors next to the model and drawn by report.py.
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
from .layers import Tanh

SATURATION = 0.97           # |tanh| above this passes back under 6% of the gradient (1 - 0.97^2)
FILENAME = "diagnostics.safetensors"
FORMAT = "handprop-diagnostics"
VERSION = 1


@dataclass
class History:
    """Everything a run recorded; saved as diagnostics.safetensors and drawn by report.py.

    Statistics ('series') and what their columns are:
      val_loss        ['val']           loss on the whole val split (eval mode) as the step began
      act_mean/_std   tanh layers       of the layer's output
      act_saturation  tanh layers       % of outputs with |t| > 0.97
      grad_mean/_std  every layer       of dL/d(layer output)
      grad_data       weight matrices   std(dL/dW) / std(W)
      update_ratio    every parameter   log10(std(update) / std(parameter after the update))
    """

    columns: dict                   # series name -> label of each column, e.g. 'act_std' -> ['3.Tanh']
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


def layer_labels(model):
    """'i.Kind' for every layer of a Sequential, e.g. '3.Tanh' (the index matches parameter names)."""
    return [f"{i}.{type(layer).__name__}" for i, layer in enumerate(model.layers)]


def step_statistics(model, tanh, weights):
    """This step's layer statistics from what a recording model kept: {series: [one number per column]}."""
    acts = [model.outputs[i] for i in tanh]             # each (B, C) or (B, T, C), values in (-1, 1)
    grads = model.output_grads                          # dL/d(output) of every layer, same shapes as the outputs
    params, param_grads = model.parameters(), model.grads
    values = {
        "act_mean": [t.mean() for t in acts],
        "act_std": [t.std() for t in acts],
        # float64: a share of a count, in full
        "act_saturation": [(t.abs() > SATURATION).double().mean() * 100 for t in acts],
        "grad_mean": [g.mean() for g in grads],
        "grad_std": [g.std() for g in grads],
        "grad_data": [param_grads[w].std() / params[w].std() for w in weights],
    }
    return {name: torch.stack(v).tolist() for name, v in values.items()}   # one device sync per series


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
        self.tanh = [i for i, layer in enumerate(model.layers) if isinstance(layer, Tanh)]
        params = model.parameters()
        self.weights = [name for name, p in params.items() if p.ndim == 2]
        self.labels = labels = layer_labels(model)
        tanh_labels = [labels[i] for i in self.tanh]
        columns = {
            "val_loss": ["val"],
            "act_mean": tanh_labels, "act_std": tanh_labels, "act_saturation": tanh_labels,
            "grad_mean": labels, "grad_std": labels,
            "grad_data": self.weights,
            "update_ratio": list(params),
        }
        fresh = History(columns, train_loss=[math.nan] * start_step, series={name: [] for name in columns})
        self.history = previous or fresh
        self.logged_up_to = start_step          # train losses before this step are in TensorBoard already
        self.row = None                         # the recorded step's numbers until its update is known
        self.before = None                      # the parameters as the recorded step began

    def begin(self, step):
        """Records step if it is the first, an `every`-th or the last: the model then keeps its passes."""
        self.model.record = step % self.every == 0 or step == self.max_steps - 1

    def after_backward(self):
        """At a recorded step: statistics of the passes, the val loss, and the parameters before the update."""
        model = self.model
        if not model.record:
            return
        model.record = False                    # the val forward below must not replace what was kept
        self.row = step_statistics(model, self.tanh, self.weights)
        self.keep_snapshots()
        self.before = {k: p.clone() for k, p in model.parameters().items()}
        self.row["val_loss"] = [self.val_loss()]

    def keep_snapshots(self):
        """The tensors behind the histograms, at the first recorded step and (so far) the last."""
        model, snapshots = self.model, {}
        for i in self.tanh:
            snapshots[f"act.{self.labels[i]}"] = model.outputs[i].detach().cpu().clone()
            snapshots[f"grad.{self.labels[i]}"] = model.output_grads[i].detach().cpu().clone()
        grads = model.grads
        for w in self.weights:
            snapshots[f"weight_grad.{w}"] = grads[w].detach().cpu().clone()
        if not self.history.steps:              # the first recorded step: a copy of its own (safetensors wants
                                                # no shared storage)
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
