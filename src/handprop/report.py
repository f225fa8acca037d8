"""The pictures of a recorded run: five PNG figures and a self-contained report.html.

Figures are drawn with matplotlib's object-oriented API (Figure + the Agg PNG renderer),
never pyplot, so nothing needs a display and no global state is touched.
"""

import base64
import html
import io
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from .checkpoint import LATEST, atomic_write_all, load_checkpoint
from .data import SPLIT_NAMES
from .diagnostics import FILENAME, SATURATION, load_history, parameters_digest
from .errors import UserError
from .models import count_parameters, describe
from .sample import sample_items

LOSS_POINTS = 200           # the loss curve averages the steps in windows to about this many points
BINS = 50                   # histogram bins
SAMPLES = 20                # samples shown in the report
DPI = 100


def png_bytes(fig):
    """The figure as PNG bytes (rendered by Agg)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def window_average(values, window):
    """Means of consecutive windows of `window` values; a last partial window is left out."""
    usable = len(values) - len(values) % window
    return values[:usable].reshape(-1, window).mean(1)


def plot_loss(history):
    """log10 loss over training: train averaged over windows of steps, val at the recorded steps."""
    fig = Figure(figsize=(9, 4))
    ax = fig.subplots()
    log_loss = torch.tensor(history.train_loss, dtype=torch.float64).log10()    # (steps,)
    window = max(1, len(log_loss) // LOSS_POINTS)
    averaged = window_average(log_loss, window)                      # (steps // window,)
    centres = (torch.arange(len(averaged)) + 0.5) * window
    ax.plot(centres, averaged, label=f"train (mean of log10 loss over {window} steps)")
    ax.plot(history.steps, np.log10(history.column("val_loss", "val")), "o-", markersize=3,
            label="val (whole split, eval mode)")
    ax.set(xlabel="step", ylabel="log10 loss", title="loss")
    ax.legend()
    return fig


def layer_name(label):
    """'3.Tanh' -> 'layer 3 (Tanh)', as the lecture labels its plots."""
    index, kind = label.split(".")
    return f"layer {index} ({kind})"


def histogram_line(ax, values, label):
    """A density histogram drawn as a line, so several layers can share one panel (as in the lecture)."""
    density, edges = np.histogram(values.double().reshape(-1).numpy(), bins=BINS, density=True)
    ax.plot((edges[:-1] + edges[1:]) / 2, density, label=label)


ROWS = {"first": 0, "last": -1}     # snapshot prefix -> its row among the recorded steps


def panels(history, title, which):
    """A figure with one panel per snapshot in which ('first', 'last'): [(axes, snapshot prefix, row)]."""
    fig = Figure(figsize=(7 * len(which), 4.5))
    axes = fig.subplots(1, len(which), squeeze=False)[0]
    chosen = [(ax, prefix, ROWS[prefix]) for ax, prefix in zip(axes, which, strict=True)]
    for ax, _, row in chosen:
        ax.set_title(f"{title}, step {history.steps[row]}")
    return fig, chosen


def plot_activations(history, which=("first", "last")):
    """Histograms of every tanh layer's output, with mean, std and saturation in the legend."""
    fig, axes = panels(history, "activations (tanh outputs)", which)
    for ax, prefix, row in axes:
        for label in history.columns["act_mean"]:
            mean, std, sat = (history.column(s, label)[row] for s in ("act_mean", "act_std", "act_saturation"))
            histogram_line(ax, history.snapshots[f"{prefix}.act.{label}"],
                           f"{layer_name(label)}: mean {mean:+.2f}, std {std:.2f}, saturated {sat:.1f}%")
        ax.axvspan(-1, -SATURATION, color="0.9")
        ax.axvspan(SATURATION, 1, color="0.9")          # the saturated bands
        ax.set(xlabel="tanh output", ylabel="density")
        ax.legend(fontsize=8)
    return fig


def plot_gradients(history, which=("first", "last")):
    """Histograms of the gradient arriving at every tanh layer's output, with mean and std."""
    fig, axes = panels(history, "gradients (dL/d tanh output)", which)
    for ax, prefix, row in axes:
        for label in history.columns["act_mean"]:
            mean, std = (history.column(s, label)[row] for s in ("grad_mean", "grad_std"))
            histogram_line(ax, history.snapshots[f"{prefix}.grad.{label}"],
                           f"{layer_name(label)}: mean {mean:+.2e}, std {std:.2e}")
        ax.set(xlabel="gradient", ylabel="density")
        ax.legend(fontsize=8)
    return fig


def plot_weight_gradients(history, which=("first", "last")):
    """Histograms of every weight matrix's gradient, with its std and grad:data ratio."""
    fig, axes = panels(history, "weight gradients", which)
    for ax, prefix, row in axes:
        for name in history.columns["grad_data"]:
            grad = history.snapshots[f"{prefix}.weight_grad.{name}"]
            ratio = history.column("grad_data", name)[row]
            shape = "x".join(str(n) for n in grad.shape)
            histogram_line(ax, grad, f"{name} ({shape}): std {grad.std():.2e}, grad:data {ratio:.2e}")
        ax.set(xlabel="gradient", ylabel="density")
        ax.legend(fontsize=8)
    return fig


def plot_update_ratios(history):
    """log10(std(update) / std(weight)) of every weight matrix over training, against the 1e-3 guide."""
    fig = Figure(figsize=(9, 4))
    ax = fig.subplots()
    for name in history.columns["grad_data"]:          # the weight matrices, as in the lecture
        ax.plot(history.steps, history.column("update_ratio", name), label=name)
    ax.axhline(-3, color="k", linestyle="--", label="1e-3 guide")
    ax.set(xlabel="step", ylabel="log10 update:data", title="update:data ratio of the weight matrices")
    ax.legend(fontsize=8)
    return fig


FIGURES = {                 # file name -> (drawing function, caption in the report)
    "loss.png": (plot_loss, "Loss: train averaged over windows of steps, val at the recorded steps."),
    "activations.png": (plot_activations,
                        "Tanh outputs; a saturated unit (|t| > 0.97, shaded) passes little gradient back."),
    "gradients.png": (plot_gradients,
                      "Gradients at the tanh outputs; similar spreads mean no layer learns much faster than another."),
    "weight_gradients.png": (plot_weight_gradients, "Weight gradients and their grad:data ratios."),
    "update_ratios.png": (plot_update_ratios,
                          "How far each step moves each weight matrix; the lecture aims near 1e-3."),
}


def render_figures(history):
    """{file name: PNG bytes} for the five figures."""
    return {name: png_bytes(draw(history)) for name, (draw, _) in FIGURES.items()}


def table(rows):
    """An HTML table of (key, value) rows, escaped."""
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def losses_table(checkpoint):
    """The final losses of a finished run; a run that was stopped has none yet."""
    if not checkpoint.finished:
        return (f"<p>Stopped at step {checkpoint.step} of {checkpoint.spec.train_config.max_steps}: no final losses "
                "yet (continue with handprop train --resume).</p>")
    return table((f"{name} loss", f"{checkpoint.losses[name]:.4f}") for name in SPLIT_NAMES)


STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
img { max-width: 100%; border: 1px solid #ddd; }
table { border-collapse: collapse; margin-bottom: 1em; }
th, td { text-align: left; padding: 2px 10px; border-bottom: 1px solid #eee; font-weight: normal; }
th { color: #666; }
ol { columns: 4; font-family: monospace; }
"""


def render_html(checkpoint, images, samples):
    """The report page: summary, final losses, the figures embedded as base64, samples, configuration."""
    spec = checkpoint.spec
    parameters = count_parameters(checkpoint.model)
    title = f"handprop: {describe(spec.model_config)}, {parameters} parameters, {checkpoint.step} steps"
    figures = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(images[name]).decode()}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for name, (_, caption) in FIGURES.items()
    )
    items = "".join(f"<li>{html.escape(s)}</li>" for s in samples)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<h2>Final losses</h2>
{losses_table(checkpoint)}
<h2>Figures</h2>
{figures}
<h2>{len(samples)} samples</h2>
<ol>{items}</ol>
<h2>Configuration</h2>
<h3>model</h3>
{table(sorted(asdict(spec.model_config).items()))}
<h3>training</h3>
{table(sorted(asdict(spec.train_config).items()))}
<h3>corpus</h3>
{table(sorted(asdict(spec.corpus).items()))}
</body></html>
"""


def write_report(work_dir, device="cpu"):
    """Draw the five figures and report.html into work_dir from its model and recorded diagnostics."""
    work_dir = Path(work_dir)
    checkpoint = load_checkpoint(work_dir / LATEST, device)
    history = load_history(work_dir / FILENAME)
    if history.digest != parameters_digest(checkpoint.model):
        raise UserError(f"{work_dir / FILENAME} was recorded for another model than {work_dir / LATEST} "
                        "(train again with --diagnostics)")
    if not history.steps:
        raise UserError(f"{work_dir / FILENAME} holds no recorded step")
    images = render_figures(history)
    spec = checkpoint.spec
    generator = torch.Generator(device=device).manual_seed(spec.train_config.seed)
    samples = sample_items(checkpoint.model, spec, SAMPLES, generator)
    page = render_html(checkpoint, images, samples)
    files = {work_dir / name: png for name, png in images.items()} | {work_dir / "report.html": page.encode()}
    try:                                    # everything is drawn before the first file is written
        atomic_write_all(files)
    except OSError as e:
        raise UserError(f"cannot write the report in {work_dir}: {e.strerror or e}; "
                        "its figures and report.html are left as they were") from None
    return list(files)
