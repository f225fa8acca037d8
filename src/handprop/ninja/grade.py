"""Grade a learner's backprop-ninja work: find their tensors by the lecture's names, say what is wrong.

The learner's forward is checked one step at a time: each intermediate they defined is
recomputed from *their* inputs to that step, so a slip is reported once, where it happens.
The reference gradients are autograd's, step by step through the same forward evaluated at
their values (in float64). A gradient that is wrong only because a gradient it was computed
from is wrong "follows"; the row to fix is the one marked wrong. `handprop grade` runs a
script and grades every version of a gradient the script wrote (learner.py), each against
the versions it was computed from; grade(globals()) in a notebook sees the final values only.
"""

import dataclasses
import functools
import math
import sys
from collections import Counter
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..gradcheck import relative_maxdiff
from .learner import Version, run_learner
from .lecture import (
    GRADIENT_NAMES,
    PARAMETER_NAMES,
    batchnorm_backward,
    cross_entropy_backward,
    forward_steps,
    inputs_of,
)

RTOL = 1e-5     # right when maxdiff <= RTOL * the largest magnitude among the expected value and its step's inputs


@dataclass(frozen=True)
class Row:
    section: str            # 'forward' or 'gradient'
    name: str               # the learner's variable: 'bnraw', 'dC', ...
    status: str             # 'ok', 'wrong', 'follows' (right for upstream gradients that are wrong), 'missing'
    message: str            # what is wrong, in plain words
    maxdiff: float | None   # max |yours - expected|; None when there was nothing to compare
    where: str = ""         # the lines of the learner's script that wrote this version ('' when unknown)
    several: bool = False   # the script wrote more than one version of this gradient

    @property
    def label(self):
        """The name, with the lines that wrote it when the script wrote several versions: 'dlogits (lines 46-48)'."""
        return f"{self.name} ({self.where})" if self.several else self.name


@dataclass(frozen=True)
class GradeResult:
    rows: list

    @property
    def ok(self):
        """True when nothing that was defined is wrong (missing names do not fail)."""
        return all(r.status in ("ok", "missing") for r in self.rows)

    @property
    def wrong(self):
        """The labels of the rows whose own lines are wrong: the ones to fix."""
        return [r.label for r in self.rows if r.status == "wrong"]

    def __getitem__(self, label):
        """The row shown as label: 'dC', or 'dlogits (lines 46-48)' for one of several versions."""
        for r in self.rows:
            if r.label == label:
                return r
        raise KeyError(label)

    def table(self):
        """The rows as text: forward problems, one line per gradient (and version), and a summary line."""
        forward = [r for r in self.rows if r.section == "forward"]
        gradients = [r for r in self.rows if r.section == "gradient"]
        defined = [r for r in forward if r.status != "missing"]
        width = max([16] + [len(r.label) for r in self.rows])
        lines = [f"forward pass: {sum(r.status == 'ok' for r in defined)} of the {len(defined)} intermediates you "
                 "defined match a recomputation from your inputs to their step"]
        lines += [format_row(r, width) for r in defined if r.status != "ok"]
        missing = [r.name for r in forward if r.status == "missing"]
        if missing:
            lines.append(f"  not defined, recomputed from your other tensors: {', '.join(missing)}")
        lines.append("gradients: compared with autograd through your forward pass (in float64)")
        lines += [format_row(r, width) for r in gradients]
        counts = {s: sum(r.status == s for r in gradients) for s in ("ok", "wrong", "follows", "missing")}
        lines.append(
            f"forward: {sum(r.status == 'wrong' for r in forward)} wrong; gradients: "
            + ", ".join(f"{count} {status}" for status, count in counts.items() if count)
            + (" -- all right" if self.ok else " -- fix the WRONG rows first")
        )
        return "\n".join(lines)

    def __repr__(self):
        return f"GradeResult(ok={self.ok}, wrong={self.wrong})"


def format_row(r, width=16):
    maxdiff = "" if r.maxdiff is None else f"maxdiff {r.maxdiff:.1e}"
    status = "WRONG" if r.status == "wrong" else r.status
    return f"  {r.label:{width}s} {status:8s} {maxdiff:16s} {r.message}".rstrip()


def grade(namespace, file=None):
    """Grade the forward and every d<name> defined in namespace (e.g. grade(globals())); print and return the result."""
    return grade_versions(namespace, final_versions(namespace), file)


def grade_script(path, file=None):
    """Run a learner's script or notebook (learner.py) and grade every version of each gradient it wrote."""
    namespace, versions = run_learner(path)
    return grade_versions(namespace, versions, file)


def final_versions(namespace):
    """One version per gradient namespace defines: its final value, taken as computed from the others' final values."""
    defined = [name for name in GRADIENT_NAMES if namespace.get("d" + name) is not None]
    context = {name: i for i, name in enumerate(defined)}
    return [Version(name, namespace["d" + name], "", context) for name in defined]


def grade_versions(namespace, versions, file=None):
    """Grade the forward in namespace and the versions of the gradients; print and return the result."""
    tensors = learner_inputs(namespace)
    steps = forward_steps(tensors["Xb"].shape[0])
    values, forward_rows = check_forward(namespace, tensors, steps)
    gradient_rows = check_gradients(versions, values, steps, forward_rows)
    if all(r.status == "missing" for r in gradient_rows):
        raise UserError("no gradients to grade: define them by the lecture's names (dlogprobs, dprobs, ..., dC)")
    result = GradeResult(forward_rows + gradient_rows)
    print(result.table(), file=file or sys.stdout)
    return result


def as_float64(value):
    """A detached float64 CPU copy (the learner's tensor is never touched)."""
    return value.detach().to("cpu", torch.float64, copy=True).contiguous()


def learner_inputs(namespace):
    """The learner's parameters (float64 copies) and batch, checked to be tensors of sensible types."""
    missing = [name for name in PARAMETER_NAMES + ("Xb", "Yb") if name not in namespace]
    if missing:
        raise UserError(
            f"cannot grade without {', '.join(missing)} (the lecture's names for the parameters and the batch)"
        )
    for name in PARAMETER_NAMES + ("Xb", "Yb"):
        if not isinstance(namespace[name], torch.Tensor):
            raise UserError(f"{name} is a {type(namespace[name]).__name__}, not a torch tensor")
    tensors = {name: as_float64(namespace[name]) for name in PARAMETER_NAMES}
    Xb, Yb = namespace["Xb"].detach().cpu(), namespace["Yb"].detach().cpu()
    if Xb.is_floating_point() or Yb.is_floating_point() or Xb.ndim != 2 or Yb.shape != (Xb.shape[0],):
        raise UserError(
            "Xb and Yb must be integer tensors of shapes (n, block_size) and (n,), "
            f"got {tuple(Xb.shape)} {Xb.dtype} and {tuple(Yb.shape)} {Yb.dtype}"
        )
    return {**tensors, "Xb": Xb, "Yb": Yb}


def largest(t):
    """max |t| as a float (0 for an empty tensor)."""
    return t.abs().max().item() if t.numel() else 0.0


def close(yours, expected, scale):
    """yours is expected up to RTOL of scale (the largest magnitude among expected and what it is computed from)."""
    return relative_maxdiff(largest(yours - expected), scale) <= RTOL


def shape_problem(yours, expected):
    """What is wrong with yours' shape, in words; None when it matches."""
    if yours.shape == expected.shape:
        return None
    problem = f"shape {tuple(yours.shape)}, expected {tuple(expected.shape)}"
    if tuple(d for d in expected.shape if d != 1) == tuple(d for d in yours.shape if d != 1):
        fix, fixing = size_one_fix(yours.ndim, expected)
        if close(yours.reshape(expected.shape), expected, largest(expected)):
            return f"{problem}: the values are right; {fix}"
        return f"{problem}; {fixing} would fix the shape, and the values are wrong too"
    if yours.ndim == 2 and yours.shape == expected.shape[::-1]:
        return problem + ": it is transposed; check the order of the matrix product"
    return problem


def size_one_fix(ndim, expected):
    """How to reach expected's shape from one that differs in size-1 dimensions only: (advice, the same as a noun)."""
    if ndim < expected.ndim:
        return "reduce with keepdim=True", "keepdim=True"
    if ndim > expected.ndim:
        return "drop keepdim=True (or squeeze)", "dropping keepdim=True (or a squeeze)"
    return f"view them as {tuple(expected.shape)}", f"a view as {tuple(expected.shape)}"


def value_problem(yours, expected):
    """Where the largest error sits, in words."""
    if not torch.isfinite(yours).all():
        return "contains nan or inf"
    error = (yours - expected).abs()
    at = tuple(int(i) for i in torch.unravel_index(error.argmax(), error.shape))
    where = f" at {list(at)}" if at else ""
    return f"largest error{where}: yours {yours[at].item():.4g}, expected {expected[at].item():.4g}"


def unusable(section, name, value, expected):
    """A row saying why value cannot be compared with expected (missing, not a tensor, wrong shape); None if it can."""
    if value is None:
        recomputed = "; recomputed from your other tensors" if section == "forward" else ""
        return Row(section, name, "missing", "not defined" + recomputed, None)
    if not isinstance(value, torch.Tensor):
        return Row(section, name, "wrong", f"is a {type(value).__name__}, not a torch tensor", None)
    problem = shape_problem(as_float64(value), expected)
    return Row(section, name, "wrong", problem, None) if problem else None


def finite(t):
    return bool(torch.isfinite(t).all())


def with_hint(problem, hint):
    return f"{problem}; {hint}" if hint else problem


# ---- the forward pass ----

FORWARD_SLIPS = {   # known wrong versions of a step, and what to say when the learner's value matches one
    "bnraw": [(
        lambda hprebn, bnmeani, bnvar_inv: hprebn - bnmeani * bnvar_inv,
        "this is hprebn - bnmeani * bnvar_inv: operator precedence, the subtraction comes first: "
        "(hprebn - bnmeani) * bnvar_inv",
    )],
    "bnvar": [(
        lambda bndiff2: bndiff2.mean(0, keepdim=True),
        "this divides by n (the biased variance); the lecture's BatchNorm divides by n-1 (Bessel's correction)",
    )],
}


def check_forward(namespace, tensors, steps):
    """Every intermediate recomputed from the learner's own inputs to its step: the values to go on with, and rows."""
    values, rows = dict(tensors), []
    for name, step in steps.items():
        args = [values[arg] for arg in inputs_of(step)]
        try:
            expected = step(*args)
        except (RuntimeError, IndexError) as e:
            raise UserError(f"cannot recompute {name} from your tensors: {str(e).splitlines()[0]}") from None
        scale = max([largest(expected)] + [largest(a) for a in args if a.is_floating_point()])
        value = namespace.get(name)
        early = unusable("forward", name, value, expected)
        yours = None if early else as_float64(value)
        rows.append(early or grade_forward(name, yours, expected, scale, values))
        # later steps read the learner's value, so one slip is reported once, where it happens
        values[name] = yours if yours is not None and finite(yours) else expected
    return values, rows


def grade_forward(name, yours, expected, scale, values):
    """ok, or wrong with the known slip it matches."""
    maxdiff = largest(yours - expected)
    if finite(yours) and relative_maxdiff(maxdiff, scale) <= RTOL:
        return Row("forward", name, "ok", "", maxdiff)
    slips = [
        hint for wrong_step, hint in FORWARD_SLIPS.get(name, [])
        if finite(yours) and close(yours, wrong_step(*(values[arg] for arg in inputs_of(wrong_step))), scale)
    ]
    hint = slips[0] if slips else None
    return Row("forward", name, "wrong", with_hint(value_problem(yours, expected), hint), maxdiff)


# ---- the gradients ----

def vjp(step, values, dout):
    """Autograd's gradients of one forward step with respect to its float inputs, for the upstream gradient dout."""
    leaves = {arg: values[arg].detach().requires_grad_() for arg in inputs_of(step) if values[arg].is_floating_point()}
    with torch.enable_grad():
        out = step(*(leaves.get(arg, values[arg]) for arg in inputs_of(step)))
        grads = torch.autograd.grad(out, list(leaves.values()), dout)
    return dict(zip(leaves, grads, strict=True))


def backprop(values, steps, upstream):
    """Each tensor's gradient summed over the steps that read it, step `name` fed upstream(name, grads)."""
    grads = {"loss": torch.ones((), dtype=torch.float64)}
    for name, step in reversed(steps.items()):
        for arg, g in vjp(step, values, upstream(name, grads)).items():
            grads[arg] = grads[arg] + g if arg in grads else g
    return grads


FUSED = {   # exercises 2 and 3: the one-step formulas, evaluated on the learner's values
    "logits": lambda values, used: cross_entropy_backward(values["logits"], values["Yb"]),
    "hprebn": lambda values, used: batchnorm_backward(
        used["hpreact"], values["bngain"], values["bnvar_inv"], values["bnraw"]
    ),
}


@dataclass(frozen=True)
class Evidence:
    """What a version of a gradient is judged against: the forward, and the gradients it was computed from."""

    values: dict            # the forward values (the learner's, where usable)
    truth: dict             # autograd's gradients through those values
    used: dict              # the versions it was computed from where usable, else the truth
    local: dict             # each gradient as those versions one step downstream make it
    implied: dict           # ... and two steps downstream (grade(globals()) sees exercise 3's dhprebn only,
                            #     not exercise 1's that dembcat came from)
    readers: dict           # name -> the steps that read it
    context: dict           # name -> index of the version it was computed from
    rows: dict              # version index -> its row, graded downstream first
    forward_wrong: list     # intermediates the forward check found wrong


def check_gradients(versions, values, steps, forward_rows):
    """One row per version of each gradient of exercise 1 (dlogits and dhprebn also cover exercises 2 and 3)."""
    truth = backprop(values, steps, lambda name, grads: grads[name])
    readers = {name: [out for out, step in steps.items() if name in inputs_of(step)] for name in truth}
    forward_wrong = [r.name for r in forward_rows if r.status == "wrong"]
    early = {i: unusable("gradient", "d" + v.name, v.value, truth[v.name]) for i, v in enumerate(versions)}
    yours = {i: as_float64(v.value) for i, v in enumerate(versions) if early[i] is None}
    rows = {}

    @functools.cache
    def evidence(context):
        """The evidence for versions computed from the versions in context, a sorted tuple of (name, index)."""
        used = truth | {name: yours[i] for name, i in context if i in yours and finite(yours[i])}
        local = backprop(values, steps, lambda name, grads: used[name])
        implied = backprop(values, steps, lambda name, grads: local[name])
        return Evidence(values, truth, used, local, implied, readers, dict(context), rows, forward_wrong)

    written = Counter(v.name for v in versions)
    out = []
    for name in GRADIENT_NAMES:      # the lecture's order visits every tensor after the tensors that read it
        if not written[name]:
            out.append(Row("gradient", "d" + name, "missing", "not defined", None))
        for i in (i for i, v in enumerate(versions) if v.name == name):      # in the order they were written
            row = early[i] or grade_gradient(name, yours[i], evidence(tuple(sorted(versions[i].context.items()))))
            rows[i] = dataclasses.replace(row, where=versions[i].where, several=written[name] > 1)
            out.append(rows[i])
    return out


def grade_gradient(name, mine, e):
    """ok; follows (right for what it was computed from, which is wrong); or wrong, with the pitfall it matches."""
    scale = max([largest(e.truth[name])] + [largest(e.truth[out]) for out in e.readers[name]])
    maxdiff = largest(mine - e.truth[name])
    slip = near_miss(name, mine, e) if finite(mine) else None
    if slip:
        return Row("gradient", "d" + name, "wrong", slip, maxdiff)
    if finite(mine) and relative_maxdiff(maxdiff, scale) <= RTOL:
        return Row("gradient", "d" + name, "ok", "", maxdiff)
    reason = follows_from(name, mine, e, scale) if finite(mine) else None
    if reason:
        return Row("gradient", "d" + name, "follows", reason, maxdiff)
    hint = gradient_hint(name, mine, e.local[name], e.values, e.used, scale) if finite(mine) else None
    return Row("gradient", "d" + name, "wrong", with_hint(value_problem(mine, e.truth[name]), hint), maxdiff)


NEAR_MISSES = {     # slips too small for RTOL to see: (the slipped formula, in code and on the values, what to say)
    "bnvar": (
        "-0.5 * bnvar**-1.5 * dbnvar_inv (no eps)",
        lambda values, used: -0.5 * values["bnvar"] ** -1.5 * used["bnvar_inv"],
        "the eps of bnvar_inv = (bnvar + eps)**-0.5 belongs in the derivative too",
    ),
}
NEAR_MISS_RATIO = 10    # a slip is named when yours is this many times closer to it than to the right formula


def near_miss(name, mine, e):
    """What to say when mine matches a known slip much more closely than the right formula; None otherwise.

    Both formulas are evaluated on the same upstream gradient (the learner's), so rounding alone
    cannot favour the slip: for a right gradient the distance to the right formula is rounding,
    and being ten times closer to the slip means the difference between yours and the right
    value has the slip's own pattern.
    """
    if name not in NEAR_MISSES:
        return None
    formula, slipped, hint = NEAR_MISSES[name]
    to_right, to_slip = largest(mine - e.local[name]), largest(mine - slipped(e.values, e.used))
    if to_slip * NEAR_MISS_RATIO > to_right:
        return None
    times = to_right / to_slip if to_slip else math.inf
    return (f"matches {formula} {times:.0f} times more closely than the right formula (maxdiff {to_slip:.1e} "
            f"against {to_right:.1e}): {hint}")


def off(names, e):
    """The labels of the versions of these gradients that were computed from, used, and are not right."""
    rows = [e.rows.get(e.context.get(n)) for n in names if e.used[n] is not e.truth[n]]
    return list(dict.fromkeys(row.label for row in rows if row is not None and row.status != "ok"))


def follows_from(name, mine, e, scale):
    """Why a gradient that differs from autograd's is right for what it was computed from; None when it is not."""
    readers = e.readers[name]
    upstream = off(readers, e)
    if upstream and close(mine, e.local[name], max([largest(e.local[name])] + [largest(e.used[r]) for r in readers])):
        return f"right for your {' and '.join(upstream)}, which {is_are(upstream)} off: fix that first"
    further = off([far for r in readers for far in e.readers[r]], e)
    implied_scale = max([largest(e.implied[name])] + [largest(e.local[r]) for r in readers])
    if further and close(mine, e.implied[name], implied_scale):
        via = " and ".join("d" + r for r in readers)
        return (f"right for the {via} computed from your {' and '.join(further)}, which {is_are(further)} off: "
                "fix that first")
    if name in FUSED and e.forward_wrong and close(mine, FUSED[name](e.values, e.used), scale):
        return ("the right one-step formula, but it assumes a right forward pass and yours is wrong at "
                f"{', '.join(e.forward_wrong)}: fix that first")
    return None


def is_are(names):
    return "is" if len(names) == 1 else "are"


def gradient_hint(name, yours, expected, values, used, scale):
    """The known pitfall the error pattern matches, in words; None when it matches none."""
    n = values["Xb"].shape[0]
    if not yours.any():
        copy = ("; note dC[Xb[k]][j] += ... adds to a copy (indexing with the tensor Xb[k] copies rows): "
                "dC[Xb[k, j]] += ... or index_add_ adds to dC itself")
        return "yours is all zeros, as if nothing was ever added to it" + (copy if name == "C" else "")
    if name == "C":
        bad_rows = ((yours - expected).abs().amax(1) > RTOL * scale).nonzero().view(-1)
        lookups = torch.bincount(values["Xb"].view(-1), minlength=yours.shape[0])
        if len(bad_rows) and (lookups[bad_rows] > 1).all():
            return ("wrong only in rows that Xb looks up more than once: dC[ix] += ... keeps one of the repeated "
                    "contributions; accumulate with index_add_ (a scatter-add)")
    if name == "hprebn":
        biased = batchnorm_backward(
            used["hpreact"], values["bngain"], values["bnvar_inv"], values["bnraw"], bessel=False
        )
        if close(yours, biased, scale):
            return ("this is the fused formula for the biased (1/n) variance, but bnvar divides by n-1: "
                    "the last term needs the factor n/(n-1)")
    return constant_factor_hint(yours, expected, scale, n)


def constant_factor_hint(yours, expected, scale, n):
    """Names a constant factor between yours and the expected gradient, if there is one."""
    norm = (expected * expected).sum()
    if norm == 0:
        return None
    ratio = ((yours * expected).sum() / norm).item()
    if not close(yours, ratio * expected, scale):
        return None
    known = [
        (-1.0, "sign error: yours is exactly minus the right gradient"),
        (n / (n - 1), "off by the factor n/(n-1): the lecture's bnvar divides by n-1 (Bessel), not n"),
        ((n - 1) / n, "off by the factor (n-1)/n: the lecture's bnvar divides by n-1 (Bessel), not n"),
        (float(n), f"off by a factor n = {n}: check the 1/n of the mean"),
        (1 / n, f"off by a factor 1/n = 1/{n}: check the 1/n of the mean"),
        (2.0, "off by a factor 2"),
        (0.5, "off by a factor 1/2: d(x^2)/dx = 2x"),
    ]
    for factor, hint in known:
        if abs(ratio - factor) <= 1e-4 * abs(factor):
            return hint
    return f"off by a constant factor {ratio:.4g}"

