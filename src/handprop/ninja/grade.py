"""Grade a learner's backprop-ninja work on any exercise: find their tensors by the exercise's names, say what is wrong.

The learner's forward is checked one step at a time: each intermediate they defined is
recomputed from *their* inputs to that step, so a slip is reported once, where it happens.
The reference gradients are autograd's, step by step through the same forward evaluated at
their values (in float64). A gradient that is wrong only because a gradient it was computed
from is wrong "follows"; the row to fix is the one marked wrong. `handprop grade` runs a
script and grades every version of a gradient the script wrote (learner.py), each against
the versions it was computed from; grade(globals()) in a notebook sees the final values only.
What is known to go wrong (an exercise's pitfalls and forward slips) is data in the exercise;
the detectors here (shape, transpose, constant factor, a missing branch, all zeros) know no exercise.
"""

import dataclasses
import difflib
import functools
import io
import itertools
import math
import sys
from collections import Counter
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..gradcheck import relative_maxdiff
from .exercise import parse_forward, run_code, run_setup
from .exercises import EXERCISES
from .learner import MARKER, RECORD, LearnerCrashed, Version, marked_exercise, run_learner

RTOL = 1e-5             # right when maxdiff <= RTOL * the largest magnitude of the expected value and its step's inputs
NEAR_MISS_RATIO = 10    # a pitfall is named when yours is this many times closer to its slip than to the right formula
MOST_BRANCHES = 8       # a tensor read by more steps than this is not searched for a missing branch (2^n subsets)


@dataclass(frozen=True)
class Row:
    section: str            # 'forward' or 'gradient'
    name: str               # the learner's variable: 'bnraw', 'dC', ...
    status: str             # 'ok', 'wrong', 'follows' (right for upstream gradients that are wrong), 'missing'
    message: str            # what is wrong, in plain words
    maxdiff: float | None   # max |yours - expected|; None when there was nothing to compare
    where: str = ""         # the lines of the learner's script that wrote this version ('' when unknown)
    several: bool = False   # the script wrote more than one version of this gradient
    shape: bool = False     # wrong because its shape is

    @property
    def label(self):
        """The name, with the lines that wrote it when the script wrote several versions: 'dlogits (lines 46-48)'."""
        return f"{self.name} ({self.where})" if self.several else self.name


@dataclass(frozen=True)
class GradeResult:
    rows: list
    crash: str = ""         # the learner's code raised: the error and its trimmed traceback ('' when it ran through)

    @property
    def ok(self):
        """True when the code ran through and something was graded, none of it wrong (missing does not fail)."""
        graded = any(r.status != "missing" for r in self.rows if r.section == "gradient")
        return not self.crash and graded and all(r.status in ("ok", "missing") for r in self.rows)

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
        lines = [self.crash, "graded up to there:"] if self.crash else []
        lines += [f"forward pass: {sum(r.status == 'ok' for r in defined)} of the {len(defined)} intermediates you "
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
            + " -- " + self.verdict()
        )
        return "\n".join(lines)

    def verdict(self):
        """The summary's last words: all right, what to fix first, or that nothing is written yet."""
        if self.crash:
            shaped = [r for r in self.rows if r.shape]
            if shaped:
                where = f" ({shaped[0].where})" if shaped[0].where and not shaped[0].several else ""
                return (f"your code stopped at the error above; the first wrong shape is {shaped[0].label}{where}, "
                        "which likely caused it: fix that first")
            return "your code stopped at the error above: fix it and grade again"
        if self.ok:
            return "all right"
        if any(r.status != "ok" for r in self.rows if r.status != "missing"):
            return "fix the WRONG rows first"
        return "nothing written yet: write the gradients and grade again"

    def __repr__(self):
        return f"GradeResult(ok={self.ok}, wrong={self.wrong})"


def format_row(r, width=16):
    maxdiff = "" if r.maxdiff is None else f"maxdiff {r.maxdiff:.1e}"
    status = "WRONG" if r.status == "wrong" else r.status
    return f"  {r.label:{width}s} {status:8s} {maxdiff:16s} {r.message}".rstrip()


# ---- which exercise, and the learner's tensors ----

def grade(namespace, file=None, exercise=None):
    """Grade the forward and every d<name> defined in namespace (e.g. grade(globals())); print and return the result.

    exercise: its name ('mlp', ...); by default the exercise whose tensors namespace defines. Inside a file that
    `handprop grade` runs, it grades without printing: handprop grade prints its own table of every version.
    """
    if exercise is not None and exercise not in EXERCISES:
        raise UserError(f"no exercise named {exercise!r}: handprop has {', '.join(EXERCISES)}{did_you_mean(exercise)}")
    chosen = EXERCISES[exercise] if exercise else detected(namespace)
    if chosen is None:
        raise UserError(no_exercise("these names define", "grade(globals(), exercise='NAME')"))
    quiet = file is None and RECORD in namespace
    return grade_versions(chosen, namespace, final_versions(chosen, namespace), io.StringIO() if quiet else file)


def grade_script(path, file=None, exercise=None, timeout=None):
    """Run a learner's script or notebook (learner.py) and grade every version of each gradient it wrote.

    The exercise is exercise (a name) if given, else the one the file's marker line names, else the one whose
    tensors it defines. A crash grades what ran before it.
    """
    name = exercise or marked_exercise(path)
    if name is not None and name not in EXERCISES:
        raise UserError(f"{path}'s marker line names the exercise {name!r}, which handprop does not have "
                        f"({', '.join(EXERCISES)}; see handprop exercise list){did_you_mean(name)}")
    watched = {"d" + g: g for g in EXERCISES[name].gradients} if name else None    # None: every exercise's
    crash = None
    try:
        namespace, versions = run_learner(path, watched, timeout)
    except LearnerCrashed as e:
        crash, namespace, versions = e, e.namespace, e.versions
    chosen = EXERCISES[name] if name else detected(namespace)
    if crash is not None and (chosen is None or missing_inputs(chosen, namespace)):
        raise UserError(str(crash))                     # it stopped before there was anything to grade
    if chosen is None:
        raise UserError(no_exercise(f"{path} has no marker line ({MARKER}NAME, the first line of every starter) "
                                    "and defines", "--exercise NAME"))
    check_inputs(chosen, namespace, f" in {path}", "--exercise {}")
    header = f"{crash}\n{crash.traceback}" if crash is not None else ""
    return grade_versions(chosen, namespace, versions, file, header)


def did_you_mean(name):
    """'; did you mean 'mlp'?' for the registered exercise name closest to a mistyped one; '' when none is close."""
    close = [e for e in EXERCISES if name and (e.startswith(name.lower()) or name.lower().replace("_", "-") == e)]
    close = close or difflib.get_close_matches(name.lower(), EXERCISES, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def detected(namespace):
    """The exercise whose inputs namespace defines, with the most gradients defined; else the one it defines most
    input tensors of (the first of equals: mlp, for the lecture's files); None when it defines none of any."""
    fitting = [e for e in EXERCISES.values() if not missing_inputs(e, namespace)]
    if fitting:
        return max(fitting, key=lambda e: sum(namespace.get("d" + name) is not None for name in e.gradients))
    defined = {e.name: sum(isinstance(namespace.get(name), torch.Tensor) for name in e.inputs())
               for e in EXERCISES.values()}
    return EXERCISES[max(defined, key=defined.get)] if any(defined.values()) else None


def no_exercise(what, how):
    """The error line for names that fit no exercise: whose they are ('these names define'), how to name one."""
    return f"{what} the tensors of no exercise: name the exercise with {how} (see handprop exercise list)"


def missing_inputs(exercise, namespace):
    """The exercise's parameters and data that namespace does not define."""
    return [name for name in exercise.inputs() if name not in namespace]


def check_inputs(exercise, namespace, where="", how="grade(globals(), exercise={!r})"):
    """One UserError line when namespace lacks the exercise's inputs, naming the exercise it looks like instead."""
    missing = missing_inputs(exercise, namespace)
    if not missing:
        return
    other = [e.name for e in EXERCISES.values() if e is not exercise and not missing_inputs(e, namespace)]
    looks = f"; this looks like the {other[0]} exercise: {how.format(other[0])}" if other else ""
    if not other and not where and len(missing) == len(exercise.inputs()):     # a notebook's cells not run yet
        looks = "; run the cells that define them first"
    raise UserError(f"cannot grade without {', '.join(missing)}{where} (the {exercise.name} exercise's names for its "
                    f"parameters and data){looks}")


def final_versions(exercise, namespace):
    """One version per gradient namespace defines: its final value, taken as computed from the others' final values."""
    defined = [name for name in exercise.gradients if namespace.get("d" + name) is not None]
    context = {name: i for i, name in enumerate(defined)}
    return [Version(name, namespace["d" + name], "", context) for name in defined]


def grade_versions(exercise, namespace, versions, file=None, crash=""):
    """Grade the forward in namespace and the versions of the gradients; print and return the result."""
    check_inputs(exercise, namespace)
    written = any(("d" + name) in namespace for name in exercise.gradients) or any(
        v.name in exercise.gradients for v in versions)
    if not (written or crash):
        raise UserError(f"no gradients to grade: define them by the exercise's names "
                        f"(d{exercise.gradients[0]}, d{exercise.gradients[1]}, ..., d{exercise.gradients[-1]})")
    tensors, constants = learner_inputs(exercise, namespace), learner_constants(exercise, namespace)
    steps = exercise.steps()
    values, forward_rows = check_forward(exercise, namespace, tensors, constants, steps)
    gradient_rows = check_gradients(exercise, versions, Grading(exercise, values, constants, steps, forward_rows,
                                                                bool(crash)))
    result = GradeResult(forward_rows + gradient_rows, crash)
    print(result.table(), file=file or sys.stdout)
    return result


def as_float64(value):
    """A detached float64 CPU copy (the learner's tensor is never touched)."""
    return value.detach().to("cpu", torch.float64, copy=True).contiguous()


def learner_inputs(exercise, namespace):
    """The learner's parameters and data: float64 copies of the floating ones, each checked to be a tensor."""
    tensors = {}
    for name in exercise.inputs():
        value = namespace[name]
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{name} is a {type(value).__name__}, not a torch tensor")
        tensors[name] = as_float64(value) if value.is_floating_point() else value.detach().cpu()
    return tensors


def learner_constants(exercise, namespace):
    """The exercise's plain numbers (n, ...): the learner's where they define them as numbers, else the setup's."""
    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    given = {name: namespace[name] for name in exercise.constants if number(namespace.get(name))}
    if len(given) == len(exercise.constants):
        return given
    return run_setup(exercise)[1] | given


def largest(t):
    """max |t| as a float (0 for an empty tensor)."""
    return t.abs().max().item() if t.numel() else 0.0


def close(yours, expected, scale):
    """yours is expected up to RTOL of scale (the largest magnitude among expected and what it is computed from)."""
    return relative_maxdiff(largest(yours - expected), scale) <= RTOL


def shape_problem(yours, expected, scale=None):
    """What is wrong with yours' shape, in words (its values judged up to RTOL of scale, by default expected's
    largest magnitude); None when it matches."""
    if yours.shape == expected.shape:
        return None
    scale = largest(expected) if scale is None else scale
    problem = f"shape {tuple(yours.shape)}, expected {tuple(expected.shape)}"
    if tuple(d for d in expected.shape if d != 1) == tuple(d for d in yours.shape if d != 1):
        fix, fixing = size_one_fix(yours.ndim, expected)
        if close(yours.reshape(expected.shape), expected, scale):
            return f"{problem}: the values are right; {fix}"
        return f"{problem}; {fixing} would fix the shape, and the values are wrong too"
    if yours.ndim == 2 and yours.shape == expected.shape[::-1]:
        return problem + ": it is transposed; check the order of the matrix product"
    summed = broadcast_dims(yours.shape, expected.shape)
    if summed and close(yours.sum(summed).reshape(expected.shape), expected, scale):
        dims = summed[0] if len(summed) == 1 else summed
        keepdim = ", keepdim=True" if yours.ndim == expected.ndim else ""
        return (f"{problem}: summed over dim {dims} it is right; the forward broadcast it over dim {dims}, so its "
                f"gradient sums back: .sum({dims}{keepdim})")
    return problem


def broadcast_dims(shape, target):
    """The dims of shape that a tensor of target's shape is broadcast over to reach it: (0,) for (32, 27) from (27,);
    () when target does not broadcast to shape or the two differ in size-1 dimensions only."""
    if len(target) > len(shape) or math.prod(target) == math.prod(shape):
        return ()
    padded = (1,) * (len(shape) - len(target)) + tuple(target)
    if any(t not in (1, s) for t, s in zip(padded, shape, strict=True)):
        return ()
    return tuple(i for i, (t, s) in enumerate(zip(padded, shape, strict=True)) if t == 1 and s != 1)


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


def unusable(section, name, value, expected, scale):
    """A row saying why value cannot be compared with expected (missing, not a tensor, wrong shape); None if it can."""
    if value is None:
        recomputed = "; recomputed from your other tensors" if section == "forward" else ""
        return Row(section, name, "missing", "not defined" + recomputed, None)
    if not isinstance(value, torch.Tensor):
        return Row(section, name, "wrong", f"is a {type(value).__name__}, not a torch tensor", None)
    problem = shape_problem(as_float64(value), expected, scale)
    return Row(section, name, "wrong", problem, None, shape=True) if problem else None


def finite(t):
    return bool(torch.isfinite(t).all())


def with_hint(problem, hint):
    return f"{problem}; {hint}" if hint else problem


# ---- the forward pass ----

def check_forward(exercise, namespace, tensors, constants, steps):
    """Every intermediate recomputed from the learner's own inputs to its step: the values to go on with, and rows."""
    slips = {}
    for slip in exercise.forward_slips:
        slips.setdefault(slip.name, []).append((parse_forward(f"{slip.name} = {slip.slip}", exercise.constants),
                                                slip.hint))
    values, rows = dict(tensors), []
    for name, step in steps.items():
        try:
            expected = step(values, constants)
        except (RuntimeError, IndexError, TypeError, ValueError) as e:
            raise UserError(f"cannot recompute {name} from your tensors: {str(e).splitlines()[0]}") from None
        args = [values[arg] for arg in step.inputs]
        scale = max([largest(expected)] + [largest(a) for a in args if a.is_floating_point()])
        value = namespace.get(name)
        early = unusable("forward", name, value, expected, scale)
        yours = None if early else as_float64(value)
        known = [(wrong[name], hint) for wrong, hint in slips.get(name, [])]
        if early and early.shape:       # a known slip of another shape: `.mean(0)` where the step reduces (0, 1)
            hints = [hint for wrong_step, hint in known if matches(as_float64(value), wrong_step(values, constants))]
            early = dataclasses.replace(early, message=with_hint(early.message, hints[0] if hints else None))
        rows.append(early or grade_forward(name, yours, expected, scale, values, constants, known))
        # later steps read the learner's value, so one slip is reported once, where it happens
        values[name] = yours if yours is not None and finite(yours) else expected
    return values, rows


def matches(yours, slipped):
    """yours is slipped, shape and values (within RTOL of the larger magnitude of the two)."""
    return yours.shape == slipped.shape and close(yours, slipped, max(largest(yours), largest(slipped)))


def grade_forward(name, yours, expected, scale, values, constants, slips):
    """ok, or wrong with the known slip it matches."""
    maxdiff = largest(yours - expected)
    if finite(yours) and relative_maxdiff(maxdiff, scale) <= RTOL:
        return Row("forward", name, "ok", "", maxdiff)
    hints = [hint for wrong_step, hint in slips if finite(yours) and close(yours, wrong_step(values, constants), scale)]
    return Row("forward", name, "wrong", with_hint(value_problem(yours, expected), hints[0] if hints else None),
               maxdiff)


# ---- the gradients ----

def vjp(step, values, constants, dout):
    """Autograd's gradients of one forward step with respect to its float inputs, for the upstream gradient dout."""
    leaves = {arg: values[arg].detach().requires_grad_() for arg in step.inputs if values[arg].is_floating_point()}
    with torch.enable_grad():
        out = step(values | leaves, constants)
        if not out.requires_grad:           # read only through something without a gradient (an index, a mask)
            return {arg: torch.zeros_like(leaf) for arg, leaf in leaves.items()}
        grads = torch.autograd.grad(out, list(leaves.values()), dout, allow_unused=True, materialize_grads=True)
    return dict(zip(leaves, grads, strict=True))


class Grading:
    """What every version is judged against: the forward values, autograd's gradients through them, the readers."""

    def __init__(self, exercise, values, constants, steps, forward_rows, stopped=False):
        self.exercise, self.values, self.constants, self.steps = exercise, values, constants, steps
        self.stopped = stopped      # the learner's code crashed: what it wrote last may be unfinished
        self.readers = {name: [out for out, step in steps.items() if name in step.inputs] for name in values}
        self.forward_wrong = [r.name for r in forward_rows if r.status == "wrong"]
        self.rows = {}              # version index -> its row, graded downstream first
        self.vjps = {}              # (step, id(dout)) -> (dout, its vjp): dout kept so its id stays its own
        self.truth = {"loss": torch.ones((), dtype=torch.float64)}
        for name in reversed(steps):
            for arg, g in self.vjp(name, self.truth[name]).items():
                self.truth[arg] = self.truth[arg] + g if arg in self.truth else g

    def scale(self, name):
        """What d<name>'s error is measured against: the largest magnitude of its gradient and its readers'."""
        return max([largest(self.truth[name])] + [largest(self.truth[out]) for out in self.readers[name]])

    def vjp(self, step, dout):
        """The step's vjp for dout, computed once per (step, dout)."""
        key = (step, id(dout))
        if key not in self.vjps:
            self.vjps[key] = (dout, vjp(self.steps[step], self.values, self.constants, dout))
        return self.vjps[key][1]

    def code_value(self, code, gradient, used):
        """d<gradient> as code (a slip, a one-step formula) computes it from the forward values and the gradients
        used; None when the code fails on them."""
        scope = self.values | {"d" + name: g.clone() for name, g in used.items()}
        try:
            value = run_code(code, scope, self.constants, f"<{self.exercise.name}: d{gradient}>").get("d" + gradient)
        except Exception:       # a slip written for other shapes than the learner's
            return None
        return as_float64(value) if isinstance(value, torch.Tensor) else None


class Evidence:
    """A version of a gradient is judged against the gradients it was computed from (used) and what they imply."""

    def __init__(self, grading, used, context):
        self.g = grading
        self.used = used            # the versions it was computed from where usable, else the truth
        self.context = context      # name -> index of the version it was computed from
        self.locals, self.implieds = {}, {}

    def branch(self, name, reader):
        """The gradient of name through one step that reads it, from the upstream gradient used for that step."""
        return self.g.vjp(reader, self.used[reader])[name]

    def local(self, name):
        """name's gradient as the versions one step downstream make it."""
        if name not in self.locals:
            readers = self.g.readers[name]
            self.locals[name] = sum(self.branch(name, r) for r in readers) if readers else self.g.truth[name]
        return self.locals[name]

    def implied(self, name):
        """... and as two steps downstream make it (grade(globals()) sees exercise 3's dhprebn only, not exercise 1's
        that dembcat came from)."""
        if name not in self.implieds:
            readers = self.g.readers[name]
            self.implieds[name] = sum(self.g.vjp(r, self.local(r))[name] for r in readers) if readers \
                else self.g.truth[name]
        return self.implieds[name]

    def off(self, names):
        """The labels of the versions of these gradients that were computed from, used, and are not right."""
        rows = [self.g.rows.get(self.context.get(n)) for n in names if self.used[n] is not self.g.truth[n]]
        return list(dict.fromkeys(row.label for row in rows if row is not None and row.status != "ok"))


def check_gradients(exercise, versions, g):
    """One row per version of each gradient (a fused formula's version of a gradient is one of them)."""
    early = {i: unusable("gradient", "d" + v.name, v.value, g.truth[v.name], g.scale(v.name))
             for i, v in enumerate(versions) if v.name in g.truth}
    yours = {i: as_float64(v.value) for i, v in enumerate(versions) if early.get(i, True) is None}
    for i, row in early.items():        # a wrong shape that broadcasts is what later lines computed with
        spread = broadcast(versions[i].value, g.truth[versions[i].name]) if row and row.shape else None
        if spread is not None:
            yours[i] = spread

    usable = {i for i, value in yours.items() if finite(value)}

    @functools.cache
    def evidence(context):
        """The evidence for versions computed from the versions in context, a sorted tuple of (name, index)."""
        used = g.truth | {name: yours[i] for name, i in context if i in usable and name in g.truth}
        return Evidence(g, used, dict(context))

    written = Counter(v.name for v in versions)
    out = []
    for name in exercise.gradients:      # from the loss backwards: every tensor after the tensors that read it
        if not written[name]:
            out.append(Row("gradient", "d" + name, "missing", "not defined", None))
        mine = [i for i, v in enumerate(versions) if v.name == name]        # in the order they were written
        branches = {}       # version index -> (the steps whose branches it holds, maxdiff to their sum) if partial
        for i in mine:
            row, held = early[i], None
            e = evidence(tuple(sorted(versions[i].context.items())))
            if not row:
                row, held = grade_gradient(name, yours[i], e)
            elif row.shape:
                held = held_branches(name, yours[i], e) if i in yours else None   # `dcounts = dcounts_sum`
                hint = shaped_pitfall(name, as_float64(versions[i].value), e) or (held and branches_hint(name, held, g))
                row = dataclasses.replace(row, message=with_hint(row.message, hint))
            if held:
                branches[i] = held
            g.rows[i] = dataclasses.replace(row, where=versions[i].where, several=written[name] > 1)
        for i, (held, maxdiff) in branches.items():
            some = "one" if len(held) == 1 else len(held)
            through = f"the gradient through {listed(held)}, {some} of the {len(g.readers[name])} steps {name} feeds"
            others = [j for j in branches if not set(held) & set(branches[j][0])]     # versions of other branches
            if any(j > i for j in others):
                # the first branch of an assignment that a later `=` (meant as +=) overwrote: this line is right
                g.rows[i] = dataclasses.replace(g.rows[i], status="ok", maxdiff=maxdiff, message=through)
            elif (g.stopped and i == mine[-1] and not any(j < i for j in others)
                  and g.rows[i].message.endswith(branches_hint(name, (held, maxdiff), g))):
                # the code stopped before adding the other branches (and no `=` replaced them): not this line's fault
                g.rows[i] = dataclasses.replace(g.rows[i], status="ok", maxdiff=maxdiff, message=(
                    f"{through}, so far: your code stopped before the rest"))
        out += [g.rows[i] for i in mine]
    return out


def grade_gradient(name, mine, e):
    """(row, (steps, maxdiff) when it is the gradient through only these of the steps reading name, else None).

    ok; follows (right for what it was computed from, which is wrong); or wrong, with the pitfall it matches.
    """
    g = e.g
    scale = g.scale(name)
    maxdiff = largest(mine - g.truth[name])
    if not finite(mine):
        return Row("gradient", "d" + name, "wrong", value_problem(mine, g.truth[name]), maxdiff), None
    slip = pitfall(name, mine, e, scale)
    if slip:    # a slip that is one branch (`=` for `+=`) still clears the version that holds the others
        return Row("gradient", "d" + name, "wrong", slip, maxdiff), held_branches(name, mine, e)
    if relative_maxdiff(maxdiff, scale) <= RTOL:
        return Row("gradient", "d" + name, "ok", "", maxdiff), None
    reason = follows_from(name, mine, e, scale)
    if reason:
        return Row("gradient", "d" + name, "follows", reason, maxdiff), None
    held = held_branches(name, mine, e)
    hint = branches_hint(name, held, g) if held else (
        scaled_branch_hint(name, mine, e, scale) or generic_hint(mine, e.local(name), scale, g.constants))
    return Row("gradient", "d" + name, "wrong", with_hint(value_problem(mine, g.truth[name]), hint), maxdiff), held


def pitfall(name, mine, e, scale):
    """What to say when mine matches one of the exercise's pitfalls for name much more closely than the right
    formula; None otherwise.

    Both formulas are evaluated on the same upstream gradients (the learner's), so rounding alone
    cannot favour the slip: for a right gradient the distance to the right formula is rounding,
    and being ten times closer to the slip means the difference between yours and the right
    value has the slip's own pattern.
    """
    to_right = largest(mine - e.local(name))
    for known in (p for p in e.g.exercise.pitfalls if p.gradient == name):
        slipped = e.g.code_value(known.slip, name, e.used)
        if slipped is None or slipped.shape != mine.shape or not close(mine, slipped, scale):
            continue
        to_slip = largest(mine - slipped)
        if to_slip * NEAR_MISS_RATIO > to_right:
            continue
        if relative_maxdiff(largest(mine - e.g.truth[name]), scale) > RTOL:
            return with_hint(value_problem(mine, e.g.truth[name]), known.hint)
        times = to_right / to_slip if to_slip else math.inf
        return (f"matches {slip_formula(known.slip)} {times:.0f} times more closely than the right formula "
                f"(maxdiff {to_slip:.1e} against {to_right:.1e}): {known.hint}")
    return None


def shaped_pitfall(name, mine, e):
    """The hint of the pitfall whose slip has mine's (wrong) shape and its values; None when none has."""
    scale = e.g.scale(name)
    for known in (p for p in e.g.exercise.pitfalls if p.gradient == name):
        slipped = e.g.code_value(known.slip, name, e.used)
        if slipped is not None and slipped.shape == mine.shape and close(mine, slipped, max(scale, largest(slipped))):
            return known.hint
    return None


def slip_formula(slip):
    """A one-line slip as its formula, a comment on it in parentheses: '-0.5 * bnvar**-1.5 * dbnvar_inv (no eps)'."""
    line = slip.strip().splitlines()[-1]
    code, _, comment = line.partition("#")
    formula = code.split("=", 1)[-1].strip()
    return f"{formula} ({comment.strip()})" if comment.strip() else formula


def follows_from(name, mine, e, scale):
    """Why a gradient that differs from autograd's is right for what it was computed from; None when it is not."""
    g = e.g
    readers = g.readers[name]
    upstream = e.off(readers)
    if upstream and close(mine, e.local(name), max([largest(e.local(name))] + [largest(e.used[r]) for r in readers])):
        return f"right for your {listed(upstream)}, which {is_are(upstream)} off: fix that first"
    further = e.off([far for r in readers for far in g.readers[r]])
    implied_scale = max([largest(e.implied(name))] + [largest(e.local(r)) for r in readers])
    if further and close(mine, e.implied(name), implied_scale):
        via = " and ".join("d" + r for r in readers)
        return (f"right for the {via} computed from your {listed(further)}, which {is_are(further)} off: "
                "fix that first")
    for fused in (f for f in g.exercise.fused if f.gradient == name):
        formula = g.code_value(fused.code, name, e.used) if g.forward_wrong else None
        if formula is not None and formula.shape == mine.shape and close(mine, formula, scale):
            return ("the right one-step formula, but it assumes a right forward pass and yours is wrong at "
                    f"{', '.join(g.forward_wrong)}: fix that first")
    return None


def held_branches(name, mine, e):
    """(the steps reading name whose gradients mine holds, maxdiff to their sum) when it holds some but not all of
    them; else None."""
    readers = e.g.readers[name]
    if not 2 <= len(readers) <= MOST_BRANCHES:
        return None
    parts = {r: e.branch(name, r) for r in readers}
    scale = max([largest(e.local(name))] + [largest(p) for p in parts.values()])
    for size in range(1, len(readers)):
        for subset in itertools.combinations(readers, size):
            total = sum(parts[r] for r in subset)
            if close(mine, total, scale) and not close(total, e.local(name), scale):
                return subset, largest(mine - total)
    return None


def branches_hint(name, held, g):
    readers = g.readers[name]
    return (f"{name} feeds {len(readers)} steps ({', '.join(readers)}): this holds only the gradient through "
            f"{listed(held[0])}; add the branches with +=")


def scaled_branch_hint(name, mine, e, scale):
    """'bnmeani's branch is off by a factor n = 32 ...' when mine is the sum of the branches of the steps reading name
    with one of them scaled by a constant (`dhprebn += dbnmeani` for `+= 1.0 / n * dbnmeani`); None otherwise."""
    readers = e.g.readers[name]
    if not 2 <= len(readers) <= MOST_BRANCHES:
        return None
    excess = mine - e.local(name)
    for reader in readers:
        part = e.branch(name, reader)
        if largest(part) <= RTOL * scale:      # a branch that is rounding noise (through a max) fits any factor
            continue
        ratio = 1 + ((excess * part).sum() / (part * part).sum()).item()
        if close(excess, (ratio - 1) * part, scale):
            return (f"{name} feeds {len(readers)} steps ({', '.join(readers)}): the branch through {reader} is "
                    + ("minus what it should be" if abs(ratio + 1) <= 1e-4 else factor_words(ratio, e.g.constants)))
    return None


def broadcast(value, expected):
    """value (a tensor of another shape) broadcast to expected's shape, in float64; None when it does not broadcast."""
    try:
        return torch.broadcast_to(as_float64(value), expected.shape)
    except RuntimeError:
        return None


def listed(names):
    """'a', 'a and b', 'a, b and c'."""
    names = list(names)
    return " and ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} and {names[-1]}"


def is_are(names):
    return "is" if len(names) == 1 else "are"


def generic_hint(yours, expected, scale, constants):
    """What the error pattern says without knowing the exercise: all zeros, or off by a constant factor; or None."""
    if not yours.any():
        return "yours is all zeros, as if nothing was ever added to it"
    return constant_factor_hint(yours, expected, scale, constants)


def constant_factor_hint(yours, expected, scale, constants):
    """Names a constant factor between yours and the expected gradient, if there is one."""
    norm = (expected * expected).sum()
    if norm == 0:
        return None
    ratio = ((yours * expected).sum() / norm).item()
    if not close(yours, ratio * expected, scale):
        return None
    if abs(ratio + 1) <= 1e-4:
        return "sign error: yours is exactly minus the right gradient"
    return factor_words(ratio, constants)


def factor_words(ratio, constants):
    """Yours being ratio (not -1) times the right value, in words: 'off by a factor n = 32: check the 1/n of the
    mean', ..., else the number."""
    known = []
    for name, value in constants.items():
        if isinstance(value, int) and value > 2:     # a count a mean divides by (n, T, ...)
            known += [(float(value), f"off by a factor {name} = {value}: check the 1/{name} of the mean"),
                      (1 / value, f"off by a factor 1/{name} = 1/{value}: check the 1/{name} of the mean"),
                      (float(value - 1), f"off by a factor {name} - 1 = {value - 1}: check the 1/({name} - 1)"),
                      *((factor, f"off by the factor {words}: check whether each variance divides by {name} or by "
                                 f"{name}-1 (Bessel's correction) as the forward does")
                        for factor, words in ((value / (value - 1), f"{name}/({name}-1)"),
                                              ((value - 1) / value, f"({name}-1)/{name}")))]
    known += [(2.0, "off by a factor 2"), (0.5, "off by a factor 1/2: d(x^2)/dx = 2x")]
    for factor, hint in known:
        if abs(ratio - factor) <= 1e-4 * abs(factor):
            return hint
    return f"off by a constant factor {ratio:.4g}"
