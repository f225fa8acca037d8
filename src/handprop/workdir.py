"""The work directory a run is saved in: which run it holds, one train at a time, writable before training."""

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from .checkpoint import LATEST, load_checkpoint, metadata
from .errors import UserError


def check_work_dir(work_dir):
    """Before anything is read: -o must name a directory (or nothing yet) that no other handprop train is using."""
    work_dir = Path(work_dir)
    if work_dir.exists() and not work_dir.is_dir():
        raise UserError(f"{work_dir} is a file, not a directory: -o names the directory a run is saved in")
    if work_dir.is_dir():
        with locked(work_dir):
            pass


def saved_run(work_dir, resume, device):
    """The checkpoint `train --resume` continues, or None for a new run; a run there without --resume, or
    --resume with no run there, is refused."""
    latest = Path(work_dir) / LATEST
    if latest.exists():
        if not resume:
            raise UserError(f"{work_dir} already holds a run; continue it with --resume, or choose another -o")
        return load_checkpoint(latest, device)
    if resume:
        raise UserError(f"--resume found no run to continue in {work_dir} (no {LATEST}); check -o, or leave out "
                        "--resume to start a new run there")
    return None


@contextmanager
def locked(work_dir):
    """While active, no other handprop train can lock work_dir (an flock on the directory, freed on any exit)."""
    fd = os.open(work_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another handprop train is using {work_dir}; wait for it to end, or choose another -o "
                            "(eval, sample and diagnose may read it meanwhile)") from None
        yield
    finally:
        os.close(fd)


@contextmanager
def claimed(work_dir, resume_from):
    """While active, this process alone trains in work_dir, whose run is still the one this command read."""
    with locked(work_dir):
        latest = Path(work_dir) / LATEST
        if resume_from is None and latest.exists():
            raise UserError(f"{work_dir} already holds a run (another handprop train saved it meanwhile); continue it "
                            "with --resume, or choose another -o")
        if resume_from is not None and metadata(load_checkpoint(latest)) != metadata(resume_from):
            raise UserError(f"the run in {work_dir} was saved by another handprop train after this one read it; "
                            "run the command again")
        yield


def check_writable(work_dir):
    """Create work_dir if needed and prove a file can be written there, before any training."""
    work_dir = Path(work_dir)
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        probe = work_dir / f".handprop-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output directory {work_dir}: {e.strerror}") from None


@contextmanager
def owned(work_dir, resume_from, world):
    """While active, rank 0 (or the only process) has work_dir, writable and claimed; other ranks write nothing."""
    if not world.is_main:
        yield
        return
    check_writable(work_dir)
    with claimed(work_dir, resume_from):
        yield


@contextmanager
def saving(work_dir, run):
    """Turns a failed write (no permission, a full disk) into one UserError that says which of run's checkpoints
    is kept (run.saved_step when the write failed)."""
    try:
        yield
    except OSError as e:
        kept = (f"the last good checkpoint (step {run.saved_step}) is kept" if run.saved_step is not None
                else "no checkpoint to resume was saved")
        raise UserError(f"cannot save in {work_dir}: {e.strerror or e}; {kept}") from None
