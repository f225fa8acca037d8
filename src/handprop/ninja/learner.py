"""Run a learner's backprop-ninja script or notebook, keeping every version of each gradient it writes.

A solution may write a gradient more than once: exercise 1's dlogits, then exercise 2's fused
one under the same name. Its final values alone would judge dh (computed from the first) against
the second. So the code runs with a recorder call after each statement at module level (an AST
rewrite; statements inside if/for/while/with/try blocks count, a function's are seen through the
statement that calls it), and the recorder clones each d<name> that changed. A new version starts
where d<name> becomes another object in a statement that does not read d<name>
(`dlogits = F.softmax(logits, 1)`); changing it in place or from itself (`+=`, `dC[i] += ...`,
`dh = dh + ...`) continues the version. Each version remembers which version of every other
gradient was current when it was last written: what it was computed from.

A crash in the learner's code keeps what ran before it (the grader grades it); a notebook runs in its
own folder, as Jupyter runs it; a run longer than its time limit is stopped.
"""

import ast
import contextlib
import json
import os
import re
import signal
import sys
import threading
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from .exercises import EXERCISES

RECORD = "__handprop_record__"      # the recorder's name in the learner's namespace while the code runs
MARKER = "# handprop exercise: "    # the line a starter or solution file begins with, naming its exercise
MARKED = re.compile(r"^#\s*handprop exercise:\s*(\S+)", re.MULTILINE)


@dataclass(frozen=True)
class Version:
    name: str           # the tensor it is the gradient of: 'logits' for dlogits
    value: object       # what d<name> held when this version was last written (a clone of a tensor)
    where: str          # the lines that wrote it: 'line 49', 'lines 46-48', 'cell 6, lines 10-11'; '' when unknown
    context: dict       # name -> index (in the list of versions) of the version of d<name> current at its last write


@dataclass(frozen=True)
class Chunk:
    """Code compiled as one unit: the whole script, or one notebook cell."""

    source: str
    cell: int | None    # the cell's number in the notebook, counting every cell from 1; None for a script


@dataclass(frozen=True)
class Statement:
    chunk: Chunk
    first: int          # its first and last line in the chunk
    last: int
    reads: frozenset    # the watched names it reads (an augmented assignment reads its target)


@dataclass
class Run:
    """A version while the code still runs: its latest value and where it started and was last written."""

    name: str
    start: Statement
    end: Statement = None
    value: object = None
    latest: object = None   # the learner's object itself, to notice rebinding
    version: int = 0        # latest's in-place version counter when it was last recorded (tensors count writes)
    context: dict = field(default_factory=dict)

    def changed(self, value):
        """Whether value is not what this version last held: another object, or a tensor written in place since."""
        return value is not self.latest or (isinstance(value, torch.Tensor) and value._version != self.version)

    def where(self):
        """Its lines, as a reader finds them: 'line 4', 'lines 2-4', 'cell 3, lines 2-4'."""
        start, end = self.start, self.end
        if start.chunk is not end.chunk:
            return f"cell {start.chunk.cell}, line {start.first} to cell {end.chunk.cell}, line {end.last}"
        cell = "" if start.chunk.cell is None else f"cell {start.chunk.cell}, "
        return f"{cell}line {start.first}" if start.first == end.last else f"{cell}lines {start.first}-{end.last}"


class Recorder:
    """Called after each module-level statement runs: starts, continues or leaves alone each watched name's version."""

    def __init__(self, namespace, watched):
        self.namespace = namespace
        self.watched = watched  # d<name> -> name for every gradient to record
        self.statements = []    # what each recorder call follows, by the index the call passes
        self.runs = []          # every version so far, in the order they started
        self.current = {}       # watched name -> index in runs of its version now

    def __call__(self, index):
        statement = self.statements[index]
        for variable, name in self.watched.items():
            if variable not in self.namespace:
                continue
            value = self.namespace[variable]
            i = self.current.get(variable)
            if i is not None and not self.runs[i].changed(value):
                continue
            if i is None or (value is not self.runs[i].latest and variable not in statement.reads):
                self.runs.append(Run(name, statement))
                i = self.current[variable] = len(self.runs) - 1
            run = self.runs[i]
            run.end, run.latest = statement, value
            run.version = value._version if isinstance(value, torch.Tensor) else 0
            run.value = value.detach().clone() if isinstance(value, torch.Tensor) else value
            run.context = {self.watched[v]: j for v, j in self.current.items()}

    def versions(self):
        return [Version(run.name, run.value, run.where(), run.context) for run in self.runs]


def watched_reads(statement, watched, lines):
    """The watched names a statement reads; `dC += x` reads dC, `dC = x` does not. lines: the chunk's source."""
    words = set(re.findall(r"[A-Za-z_]\w*", "\n".join(lines[statement.lineno - 1: statement.end_lineno])))
    if not words & watched.keys():      # most lines name no gradient: no need to walk their tree
        return frozenset()
    read = {n.id for n in ast.walk(statement) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Store)}
    if isinstance(statement, ast.AugAssign) and isinstance(statement.target, ast.Name):
        read.add(statement.target.id)
    return frozenset(read & watched.keys())


# statements holding blocks of statements; try/except* (ast.TryStar) is Python 3.11's
BLOCKS = (ast.If, ast.For, ast.While, ast.With, ast.Try, ast.Match, *([ast.TryStar] if hasattr(ast, "TryStar") else []))
LAST_IN_BLOCK = (ast.Break, ast.Continue, ast.Return, ast.Raise)    # nothing after them runs


def instrumented(body, chunk, recorder, lines):
    """body with a recorder call after each statement, into the blocks of if/for/while/with/try/match."""
    out = []
    for statement in body:
        if isinstance(statement, BLOCKS):
            for part in [statement, *getattr(statement, "handlers", []), *getattr(statement, "cases", [])]:
                for name in ("body", "orelse", "finalbody"):
                    if getattr(part, name, None):
                        setattr(part, name, instrumented(getattr(part, name), chunk, recorder, lines))
            out.append(statement)
            continue
        out.append(statement)
        if isinstance(statement, LAST_IN_BLOCK):
            continue
        reads = watched_reads(statement, recorder.watched, lines)
        recorder.statements.append(Statement(chunk, statement.lineno, statement.end_lineno, reads))
        where = {"lineno": statement.lineno, "col_offset": 0}        # the call's own nodes, at the statement's line
        call = ast.Call(ast.Name(RECORD, ast.Load(), **where), [ast.Constant(len(recorder.statements) - 1, **where)],
                        [], **where)
        out.append(ast.Expr(call, **where))
    return out


def filename(path, chunk):
    return str(path) if chunk.cell is None else f"{path} cell {chunk.cell}"


def compiled(path, chunk, recorder):
    """The chunk's code with the recorder calls in; a syntax error is one UserError line."""
    try:
        tree = ast.parse(chunk.source, filename(path, chunk))
    except SyntaxError as e:
        raise UserError(f"{filename(path, chunk)} line {e.lineno} is not valid Python: {e.msg}") from None
    tree.body = instrumented(tree.body, chunk, recorder, chunk.source.splitlines())
    return compile(tree, filename(path, chunk), "exec")


def notebook_chunks(path):
    """A Jupyter notebook's code cells, in order; IPython magic (%) and shell (!) lines become `pass`."""
    try:
        notebook = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not a Jupyter notebook: it is not JSON ({e})") from None
    cells = notebook.get("cells") if isinstance(notebook, dict) else None
    if not isinstance(cells, list) or not all(isinstance(c, dict) for c in cells):
        raise UserError(f"{path} is not a Jupyter notebook: it has no list of cells (nbformat 4)")
    chunks = []
    for number, cell in enumerate(cells, 1):
        source = cell.get("source", "")
        source = "".join(source) if isinstance(source, list) else source
        # a cell magic (%%bash, %%time, ...) hands the whole cell to IPython: it is not plain Python
        if cell.get("cell_type") != "code" or not isinstance(source, str) or source.lstrip().startswith("%%"):
            continue
        lines = [
            line[: len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("%", "!")) else line
            for line in source.splitlines()
        ]
        chunks.append(Chunk("\n".join(lines), number))
    return chunks


@contextlib.contextmanager
def as_main(path):
    """A fresh __main__ module's namespace, its folder first on sys.path and sys.argv [path] (as `python path` has
    them) while the code runs; a notebook also runs in its own folder, as Jupyter runs it. All restored after."""
    module = types.ModuleType("__main__")
    module.__file__ = str(path)
    saved_main, saved_path, saved_argv, saved_cwd = sys.modules.get("__main__"), list(sys.path), sys.argv, os.getcwd()
    sys.modules["__main__"] = module
    sys.path.insert(0, str(path.resolve().parent))
    sys.argv = [str(path)]
    if path.suffix == ".ipynb":
        os.chdir(path.resolve().parent)
    try:
        yield module.__dict__
    finally:
        os.chdir(saved_cwd)
        sys.modules["__main__"] = saved_main
        sys.path[:] = saved_path
        sys.argv = saved_argv


class TimedOut(BaseException):
    """Raised into the learner's code when its time is up (a BaseException, so `except Exception` cannot eat it)."""


@contextlib.contextmanager
def time_limit(seconds):
    """Raise TimedOut into whatever runs when seconds have passed (a timer signal: main thread only)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise TimedOut

    saved = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, saved)


class LearnerCrashed(UserError):
    """The learner's code raised: the message says where and what in one line; what ran before it is kept."""

    def __init__(self, message, traceback, namespace, versions):
        super().__init__(message)
        self.traceback = traceback      # the frames in the learner's file (or cells), each with its line, the error
        self.namespace = namespace      # the names the code left when it stopped
        self.versions = versions        # every version of each watched gradient written before it stopped


def read_chunks(path):
    """The code of a script (one chunk) or of a notebook's code cells; an unreadable file is one UserError line."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a script")
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    try:
        return notebook_chunks(path) if path.suffix == ".ipynb" else [Chunk(path.read_text(encoding="utf-8"), None)]
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text, so not a Python script") from None


def marked_exercise(path):
    """The exercise a file's marker line names (`# handprop exercise: mlp`), or None when it has none."""
    for chunk in read_chunks(path):
        found = MARKED.search(chunk.source)
        if found:
            return found.group(1)
    return None


def all_gradients():
    """d<name> -> name for the gradients of every exercise."""
    return {"d" + name: name for exercise in EXERCISES.values() for name in exercise.gradients}


def run_learner(path, watched=None, timeout=None):
    """Run a learner's script (or notebook's code cells) as __main__: the names it leaves, and every version of each
    gradient in watched (d<name> -> name; default every exercise's) it wrote. A crash raises LearnerCrashed, which
    keeps what ran before it; any other failure is one UserError line."""
    path = Path(path)
    chunks = read_chunks(path)
    with as_main(path) as namespace:
        recorder = namespace[RECORD] = Recorder(namespace, watched or all_gradients())
        codes = [compiled(path, chunk, recorder) for chunk in chunks]
        try:
            with time_limit(timeout):
                for code in codes:
                    exec(code, namespace)
        except SystemExit as e:
            raise UserError(f"{path} called exit({e.code}) before it finished, so there is nothing to grade") from None
        except TimedOut as e:
            raise UserError(f"{path} did not finish within {timeout:g} s{where(path, chunks, e)} (--timeout sets "
                            "the limit)") from None
        except Exception as e:
            namespace.pop(RECORD, None)
            raise LearnerCrashed(failure(path, chunks, e), learner_traceback(path, chunks, e), dict(namespace),
                                 recorder.versions()) from None
        del namespace[RECORD]
        return dict(namespace), recorder.versions()


def learner_frames(path, chunks, error):
    """The frames of error's traceback in the learner's own code, with the chunk each is in."""
    names = {filename(path, chunk): chunk for chunk in chunks}
    return [(f, names[f.filename]) for f in traceback.extract_tb(error.__traceback__) if f.filename in names]


def where(path, chunks, error):
    """' at line 2' or ' at cell 3 line 2': the learner's last line the error passed through ('' if none)."""
    frames = learner_frames(path, chunks, error)
    if not frames:
        return ""
    frame, chunk = frames[-1]
    return (f" at cell {chunk.cell}" if chunk.cell is not None else " at") + f" line {frame.lineno}"


def failure(path, chunks, error):
    """'<path> line 2 raised ZeroDivisionError: division by zero', the line being the learner's last one it passed."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{path}{where(path, chunks, error).removeprefix(' at')} raised {type(error).__name__}: {message}".rstrip(
        ": ")


def learner_traceback(path, chunks, error):
    """The traceback trimmed to the learner's frames, each with its source line, then the error itself."""
    lines = []
    for frame, chunk in learner_frames(path, chunks, error):
        cell = "" if chunk.cell is None else f", cell {chunk.cell}"
        lines.append(f'  File "{path}"{cell}, line {frame.lineno}, in {frame.name}')
        source = chunk.source.splitlines()
        if 0 < frame.lineno <= len(source):
            lines.append("    " + source[frame.lineno - 1].strip())
    return "\n".join(lines + traceback.format_exception_only(type(error), error)[-1:]).rstrip()
