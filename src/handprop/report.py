"""The pictures of a recorded run: up to five PNG figures and a self-contained report.html.

A figure the run recorded nothing for is left out (a bigram has no hidden layer to draw).

Figures are drawn with matplotlib's object-oriented API (Figure + the Agg PNG renderer),
never pyplot, so nothing needs a display and no global state is touched.
"""

import base64
import html
import io
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps, cycler
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
    """'3.Tanh' -> 'layer 3 (Tanh)', as the lecture labels its plots; nested: 'layer 2.inner.1 (GELU)'."""
    path, kind = label.rsplit(".", 1)
    return f"layer {path} ({kind})"


def histogram_line(ax, values, label):
    """A density histogram drawn as a line, so several layers can share one panel (as in the lecture)."""
    density, edges = np.histogram(values.double().reshape(-1).numpy(), bins=BINS, density=True)
    ax.plot((edges[:-1] + edges[1:]) / 2, density, label=label)


ROWS = {"first": 0, "last": -1}     # snapshot prefix -> its row among the recorded steps
OUTPUT_NAMES = {                    # the kind of a layer with histograms -> what its output is called
    "Tanh": "tanh output", "LayerNorm": "LayerNorm output", "CausalSelfAttention": "attention output",
    "GELU": "GELU output", "Recurrent": "hidden state", "logits": "logits",
}
LEGEND_INSIDE = 8                   # a legend with more entries goes beside its panel


def watched(history):
    """The labels of the watched layers, whose outputs the activations figure shows (none: no figure)."""
    return history.columns.get("act_mean", [])


def gradient_labels(history):
    """The labels whose output gradients the gradients figure shows (none: no figure), in the model's order."""
    return [label for label in history.columns["grad_mean"] if f"first.grad.{label}" in history.snapshots]


def output_kind(history, label):
    """A shown layer's kind ('Tanh', 'GELU'...), or 'logits' for the model's output, the one shown but not watched."""
    return label.rsplit(".", 1)[1] if label in watched(history) else "logits"


def by_kind(history, labels):
    """[(kind, [label, ...])]: labels grouped by the kind of their output, kinds in the order they first come."""
    groups = {}
    for label in labels:
        groups.setdefault(output_kind(history, label), []).append(label)
    return list(groups.items())


def is_crowded(entries):
    """Whether a figure has a panel with too many lines for its legend to go inside (not in the lectures' presets)."""
    return entries > LEGEND_INSIDE


# a crowded panel's lines: 20 colours, then the same colours dashed and dotted, so no two lines look alike
CROWDED_LINES = cycler(linestyle=["-", "--", ":"]) * cycler(color=colormaps["tab20"].colors)


def add_legend(ax, crowded):
    """The legend inside the panel as in the lecture, or beside it when the figure is crowded."""
    if crowded:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    else:
        ax.legend(fontsize=8)


def panels(history, titles, which, crowded=False):
    """A figure with a row of panels per title and a column per snapshot in which ('first', 'last').

    Returns the figure and, per row, [(axes, snapshot prefix, row among the recorded steps)]. A crowded figure
    is wider, with distinct line styles and room for the legends beside its panels; one of several rows lays
    itself out so no row's labels run into the next (the lectures' figures have one row, laid out as before).
    """
    width = 11 if crowded else 7
    layout = "constrained" if crowded or len(titles) > 1 else None
    fig = Figure(figsize=(width * len(which), 4.5 * len(titles)), layout=layout)
    grid = fig.subplots(len(titles), len(which), squeeze=False)
    rows = []
    for title, axes in zip(titles, grid, strict=True):
        chosen = [(ax, prefix, ROWS[prefix]) for ax, prefix in zip(axes, which, strict=True)]
        for ax, _, row in chosen:
            ax.set_title(f"{title}, step {history.steps[row]}")
            if crowded:
                ax.set_prop_cycle(CROWDED_LINES)
        rows.append(chosen)
    return fig, rows


def activation_legend(history, label, row):
    """A watched layer's name and statistics; a tanh output's with its saturation, to the lecture's precision."""
    mean, std = (history.column(s, label)[row] for s in ("act_mean", "act_std"))
    if label in history.columns.get("act_saturation", []):
        sat = history.column("act_saturation", label)[row]
        return f"{layer_name(label)}: mean {mean:+.2f}, std {std:.2f}, saturated {sat:.1f}%"
    return f"{layer_name(label)}: mean {mean:+.3g}, std {std:.3g}"     # attention outputs start near 0.01


def plot_activations(history, which=("first", "last")):
    """Histograms of the watched layers' outputs, a row per kind, with mean, std (and saturation) in the legend."""
    kinds = by_kind(history, watched(history))
    crowded = is_crowded(max(len(labels) for _, labels in kinds))
    fig, rows = panels(history, [f"activations ({OUTPUT_NAMES[kind]}s)" for kind, _ in kinds], which, crowded)
    saturable = history.columns.get("act_saturation", [])
    for (kind, labels), axes in zip(kinds, rows, strict=True):
        for ax, prefix, row in axes:
            for label in labels:
                histogram_line(ax, history.snapshots[f"{prefix}.act.{label}"], activation_legend(history, label, row))
            if any(label in saturable for label in labels):
                ax.axvspan(-1, -SATURATION, color="0.9")
                ax.axvspan(SATURATION, 1, color="0.9")          # the saturated bands
            ax.set(xlabel=OUTPUT_NAMES[kind], ylabel="density")
            add_legend(ax, crowded)
    return fig


def plot_gradients(history, which=("first", "last")):
    """Histograms of the gradient arriving at the watched layers' outputs (and the logits), a row per kind."""
    kinds = by_kind(history, gradient_labels(history))
    crowded = is_crowded(max(len(labels) for _, labels in kinds))
    fig, rows = panels(history, [f"gradients (dL/d {OUTPUT_NAMES[kind]})" for kind, _ in kinds], which, crowded)
    for (_, labels), axes in zip(kinds, rows, strict=True):
        for ax, prefix, row in axes:
            for label in labels:
                mean, std = (history.column(s, label)[row] for s in ("grad_mean", "grad_std"))
                histogram_line(ax, history.snapshots[f"{prefix}.grad.{label}"],
                               f"{layer_name(label)}: mean {mean:+.2e}, std {std:.2e}")
            ax.set(xlabel="gradient", ylabel="density")
            add_legend(ax, crowded)
    return fig


def plot_weight_gradients(history, which=("first", "last")):
    """Histograms of every weight matrix's gradient, with its std and grad:data ratio."""
    crowded = is_crowded(len(history.columns["grad_data"]))
    fig, (axes,) = panels(history, ["weight gradients"], which, crowded)
    for ax, prefix, row in axes:
        for name in history.columns["grad_data"]:
            grad = history.snapshots[f"{prefix}.weight_grad.{name}"]
            ratio = history.column("grad_data", name)[row]
            shape = "x".join(str(n) for n in grad.shape)
            histogram_line(ax, grad, f"{name} ({shape}): std {grad.std():.2e}, grad:data {ratio:.2e}")
        ax.set(xlabel="gradient", ylabel="density")
        add_legend(ax, crowded)
    return fig


def plot_update_ratios(history):
    """log10(std(update) / std(weight)) of every weight matrix over training, against the 1e-3 guide."""
    crowded = is_crowded(len(history.columns["grad_data"]) + 1)     # and the guide line
    fig = Figure(figsize=(13 if crowded else 9, 4), layout="constrained" if crowded else None)
    ax = fig.subplots()
    if crowded:
        ax.set_prop_cycle(CROWDED_LINES)
    for name in history.columns["grad_data"]:          # the weight matrices, as in the lecture
        ax.plot(history.steps, history.column("update_ratio", name), label=name)
    ax.axhline(-3, color="k", linestyle="--", label="1e-3 guide")
    ax.set(xlabel="step", ylabel="log10 update:data", title="update:data ratio of the weight matrices")
    add_legend(ax, crowded)
    return fig


SEQUENCE_NOTE = " Only the positions the loss counts enter (padding is left out)."


def activations_caption(history):
    """What the activations figure shows, a sentence per kind of watched layer."""
    kinds = by_kind(history, watched(history))
    saturable = history.columns.get("act_saturation", [])
    notes = {
        "Tanh": "Tanh outputs; a saturated unit (|t| > 0.97, shaded) passes little gradient back.",
        "LayerNorm": "LayerNorm outputs: each position normalised over its channels, then scaled and shifted.",
        "CausalSelfAttention": "Attention outputs: what each block's attention adds (before dropout) to the "
                               "residual stream.",
        "GELU": "GELU outputs, the MLPs' hidden units (no saturation measure: GELU has no flat upper side).",
        "tanh hidden states": "Hidden states, tanh outputs: a saturated unit (|h| > 0.97, shaded) passes little "
                              "gradient back.",
        "Recurrent": "Hidden states (no saturation measure: a GRU's gradient passes back through (1 - z) however "
                     "near 1 |h| is).",
    }
    sentences = [notes["tanh hidden states" if kind == "Recurrent" and set(labels) <= set(saturable) else kind]
                 for kind, labels in kinds]
    return " ".join(sentences) + ("" if [kind for kind, _ in kinds] == ["Tanh"] else SEQUENCE_NOTE)


def gradients_caption(history):
    """What the gradients figure shows: the lecture's sentence, or the sequence models' (with their logits)."""
    kinds = [kind for kind, _ in by_kind(history, gradient_labels(history))]
    if kinds == ["Tanh"]:
        return "Gradients at the tanh outputs; similar spreads mean no layer learns much faster than another."
    recurrent = (" At the hidden states it is what each position's own logits send back, before backprop through "
                 "time adds what later positions send." if "Recurrent" in kinds else "")
    return ("Gradients at the watched layers' outputs and at the logits, where the backward starts; similar spreads "
            "across depth mean no layer learns much faster than another." + recurrent + SEQUENCE_NOTE)


@dataclass(frozen=True)
class FigureSpec:
    """How to draw one figure, what to say under it, and whether a run recorded anything for it."""

    draw: Callable          # history -> matplotlib Figure
    caption: Callable       # history -> the caption under it in the report
    shown: Callable         # history -> whether the figure has something to show (else it is left out)


def fixed(text):
    """A caption the same for every run."""
    return lambda history: text


def always(history):
    return True


def has_watched(history):
    return bool(watched(history))


def has_gradients(history):
    return bool(gradient_labels(history))


def has_weights(history):
    return bool(history.columns.get("grad_data"))


FIGURES = {                 # file name -> how to draw it
    "loss.png": FigureSpec(plot_loss, fixed("Loss: train averaged over windows of steps, val at the recorded steps."),
                           always),
    "activations.png": FigureSpec(plot_activations, activations_caption, has_watched),
    "gradients.png": FigureSpec(plot_gradients, gradients_caption, has_gradients),
    "weight_gradients.png": FigureSpec(plot_weight_gradients, fixed("Weight gradients and their grad:data ratios."),
                                       has_weights),
    "update_ratios.png": FigureSpec(plot_update_ratios,
                                    fixed("How far each step moves each weight matrix; the lecture aims near 1e-3."),
                                    has_weights),
}


def render_figures(history):
    """{file name: PNG bytes} for every figure the run has something for (all five for the lectures' models)."""
    return {name: png_bytes(spec.draw(history)) for name, spec in FIGURES.items() if spec.shown(history)}


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


def render_html(checkpoint, history, images, samples):
    """The report page: summary, final losses, the figures drawn (embedded as base64), samples, configuration."""
    spec = checkpoint.spec
    parameters = count_parameters(checkpoint.model)
    title = f"handprop: {describe(spec.model_config)}, {parameters} parameters, {checkpoint.step} steps"
    figures = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(images[name]).decode()}">'
        f"<figcaption>{html.escape(FIGURES[name].caption(history))}</figcaption></figure>"
        for name in images
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
    """Draw the figures and report.html into work_dir from its model and recorded diagnostics."""
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
    page = render_html(checkpoint, history, images, samples)
    files = {work_dir / name: png for name, png in images.items()} | {work_dir / "report.html": page.encode()}
    try:                                    # everything is drawn before the first file is written
        atomic_write_all(files)
    except OSError as e:
        raise UserError(f"cannot write the report in {work_dir}: {e.strerror or e}; "
                        "its figures and report.html are left as they were") from None
    return list(files)
