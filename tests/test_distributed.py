"""Data-parallel training (issue 10): N gloo ranks on loopback take the steps one process takes with the whole batch.

Ranks are real processes: torchrun (`python -m torch.distributed.run`), or `python` started with the
variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), which lets a test
stop or kill one rank. tests/rank_worker.py is what a rank runs for the library-level comparisons.
"""

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import rank_worker
import torch

from handprop.checkpoint import load_checkpoint
from handprop.cli import main
from handprop.data import bundled_corpus_path
from handprop.distributed import ALONE, Ranks, World, launched, shard_rows
from handprop.errors import UserError
from handprop.gradcheck import AUTOGRAD_TOL, autograd_gradients, twin_forward

WORKER = Path(rank_worker.__file__)
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}     # the bounds on every parameter and buffer
RUN = ["--max-steps", "200", "-b", "32", "--log-every", "100"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first 2000 bundled names: every split non-trivial, the final evaluations quick."""
    path = tmp_path_factory.mktemp("corpus") / "names.txt"
    path.write_text("\n".join(bundled_corpus_path().read_text().split()[:2000]) + "\n")
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank, size, port, **extra):
    """The environment torchrun gives a rank on one machine, one thread per process."""
    return os.environ | {"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank),
                         "LOCAL_WORLD_SIZE": str(size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                         "OMP_NUM_THREADS": "1"} | extra


def start_ranks(argv, size=2, **extra):
    """size processes running argv as the ranks of one launch; stdout and stderr captured."""
    port = free_port()
    return [subprocess.Popen(argv, env=rank_env(rank, size, port, **extra), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for rank in range(size)]


def ended(processes, timeout=120):
    """(returncode, stdout, stderr) of each process once it has exited."""
    printed = [p.communicate(timeout=timeout) for p in processes]
    return [(p.returncode, *out_err) for p, out_err in zip(processes, printed, strict=True)]


def handprop(*args):
    return [sys.executable, "-m", "handprop", *map(str, args)]


def train_here(*args):
    """`handprop train args` in this process (one rank): its exit status and what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(["train", *map(str, args)])
    return status, printed.getvalue()


def state(path):
    checkpoint = load_checkpoint(path)
    return checkpoint.model.parameters() | checkpoint.model.buffers()


def assert_close(mine, reference, tolerance):
    assert mine.keys() == reference.keys()
    for name in reference:
        assert mine[name].dtype == reference[name].dtype, name
        diff = (mine[name] - reference[name]).abs().max().item()
        assert diff <= tolerance, (name, diff)


# ---- which rows, which ranks ----

def test_shard_rows_are_disjoint_in_rank_order_and_cover_the_batch():
    for size in (1, 2, 3, 4, 8):
        for batch_size in (size, 2 * size, 32 * size):
            rows = [range(*shard_rows(rank, size, batch_size)) for rank in range(size)]
            assert [i for r in rows for i in r] == list(range(batch_size))
            assert {len(r) for r in rows} == {batch_size // size}


def test_launched_reads_torchrun_variables():
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    world = launched("cpu", torchrun)
    assert isinstance(world, Ranks) and (world.rank, world.size, world.is_main, world.backend) == (1, 2, False, "gloo")
    assert world.timeout == 30 and launched("cpu", torchrun | {"HANDPROP_TIMEOUT": "5"}).timeout == 5
    assert type(launched("cpu", {})) is World                  # not launched by torchrun: alone
    assert type(launched("cpu", torchrun | {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"})) is World
    for bad, words in [({k: v for k, v in torchrun.items() if k != "MASTER_PORT"}, "not MASTER_PORT"),
                       (torchrun | {"RANK": "2"}, "RANK 2 of WORLD_SIZE 2"),
                       (torchrun | {"RANK": "one"}, "whole numbers"),
                       (torchrun | {"HANDPROP_TIMEOUT": "0"}, "HANDPROP_TIMEOUT")]:
        with pytest.raises(UserError, match=words):
            launched("cpu", bad)
    with pytest.raises(UserError, match="does not split evenly over 2 ranks; use a multiple of 2"):
        world.check_batch(33)
    world.check_batch(32)
    ALONE.check_batch(33)


def one_error_line(err, *words):
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("handprop: error: ") and "Traceback" not in err, err
    assert all(word in lines[0] for word in words), err


def test_a_batch_the_ranks_cannot_share_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys, corpus):
    # rank 0 of 2 in this process: it must stop before it would wait for rank 1 to connect
    for name, value in rank_env(0, 2, free_port()).items():
        monkeypatch.setenv(name, value)
    assert main(["train", "-i", str(corpus), "-o", str(tmp_path / "run"), "-b", "33"]) == 2
    one_error_line(capsys.readouterr().err, "-b 33", "2 ranks")
    assert not (tmp_path / "run").exists()


def test_device_cuda_needs_a_gpu_for_each_rank(tmp_path, monkeypatch, capsys, corpus):
    for name, value in rank_env(1, 2, free_port()).items():
        monkeypatch.setenv(name, value)
    assert main(["train", "-i", str(corpus), "-o", str(tmp_path / "run"), "--device", "cuda"]) == 2
    one_error_line(capsys.readouterr().err, "--device cuda")   # this machine has no GPU at all
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # one GPU, and rank 1 is the second on it
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["train", "-i", str(corpus), "-o", str(tmp_path / "run"), "--device", "cuda"]) == 2
    one_error_line(capsys.readouterr().err, "one GPU per rank", "rank 1", "sees 1 GPU")
    assert not (tmp_path / "run").exists()


# ---- the library: 2 ranks against one process, float32 and float64, windows and sequences ----

@pytest.fixture(scope="module")
def compared(tmp_path_factory, corpus):
    """What each of 2 ranks (rank_worker.py) and one process (ALONE, here) computed: (ranks, alone)."""
    out = tmp_path_factory.mktemp("ranks")
    processes = start_ranks([sys.executable, str(WORKER), str(out), str(corpus)])
    try:                                    # the reference meanwhile, in this process
        alone = {name: rank_worker.training_run(ALONE, name, corpus, out / "alone") for name in rank_worker.RUNS}
    finally:
        results = ended(processes)
    for status, _, err in results:
        assert status == 0, err
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)], alone


def test_sync_batchnorm_is_batchnorm_over_the_global_batch(compared):
    ranks, _ = compared
    assert [r["size"] for r in ranks] == [2, 2] and [r["rank"] for r in ranks] == [0, 1]
    for name, (bessel, shape) in rank_worker.BN_CASES.items():
        layer, x, dout = rank_worker.bn_inputs(bessel, shape)
        parts = [r["batchnorm"][name] for r in ranks]
        with torch.no_grad():
            expected = {"out": twin_forward(layer, x, layer.parameters())}
        reference = autograd_gradients(layer, x, dout)      # the autograd twin, over the whole batch
        expected |= {"dx": reference["x"], "weight": reference["weight"], "bias": reference["bias"]}
        dims = tuple(range(x.ndim - 1))
        expected["running_mean"] = 0.9 * layer.running_mean + 0.1 * x.mean(dims)
        expected["running_var"] = 0.9 * layer.running_var + 0.1 * x.var(dims, correction=1)
        got = {"out": torch.cat([p["out"] for p in parts]), "dx": torch.cat([p["dx"] for p in parts]),
               "weight": parts[0]["weight"] + parts[1]["weight"], "bias": parts[0]["bias"] + parts[1]["bias"]}
        got |= {k: parts[rank][k] for rank in range(2) for k in ("running_mean", "running_var")}
        for rank in range(2):               # every rank keeps the global batch's running statistics
            for k in ("running_mean", "running_var"):
                assert torch.equal(parts[rank][k], parts[0][k])
        for k, value in expected.items():
            scale = value.abs().max().item()
            assert (got[k] - value).abs().max().item() <= AUTOGRAD_TOL * scale, (name, k)


def test_ranks_that_would_start_from_different_states_are_refused(compared):
    ranks, _ = compared
    for r in ranks:
        assert r["differing"].startswith("rank 1 would start from another state than rank 0"), r["differing"]


@pytest.mark.parametrize("name", list(rank_worker.RUNS))
def test_two_ranks_take_the_steps_one_process_takes(compared, name):
    ranks, alone = compared
    mine, other = ranks[0]["runs"][name], ranks[1]["runs"][name]
    tolerance = TOLERANCE[rank_worker.RUNS[name][3]]
    for part in ("params", "buffers", "buffers_trained"):
        if part in alone[name]:
            assert_close(mine[part], alone[name][part], tolerance)
            for k in mine[part]:            # one all-reduce result: the ranks stay identical, bit for bit
                assert torch.equal(mine[part][k], other[part][k]), (part, k)
    for split, loss in alone[name]["losses"].items():
        assert abs(mine["losses"][split] - loss) <= 100 * tolerance


@pytest.mark.parametrize("name", ["mlp-float32", "transformer-float32"])
def test_each_rank_takes_its_own_rows_of_the_same_global_batch(compared, name):
    ranks, alone = compared
    (full0, rows0), (full1, rows1) = (r["runs"][name]["first_batch"] for r in ranks)
    assert torch.equal(full0, full1) and torch.equal(full0, alone[name]["first_batch"][0])     # one seeded stream
    assert rows0.shape[0] == rows1.shape[0] == full0.shape[0] // 2 == 16
    assert torch.equal(torch.cat([rows0, rows1]), full0)     # rows [0, 16) and [16, 32): disjoint, covering


# ---- the command: torchrun, resuming across world sizes, a lost rank ----

@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, corpus):
    """The mlp trained 200 steps by torchrun with 2 ranks and by one process: (torchrun's stdout, both dirs)."""
    out = tmp_path_factory.mktemp("runs")
    torchrun = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "handprop",
         "train", "-i", corpus, "-o", out / "two", *RUN], env=os.environ | {"OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        status, _ = train_here("-i", corpus, "-o", out / "one", *RUN)
        assert status == 0
    finally:
        printed, err = torchrun.communicate(timeout=120)
    assert torchrun.returncode == 0, err
    return printed, out / "two", out / "one"


def test_torchrun_with_two_ranks_trains_what_one_process_trains(two_runs):
    printed, two, one = two_runs
    assert_close(state(two / "model.safetensors"), state(one / "model.safetensors"), 1e-5)
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
    assert json.loads((one / "config.json").read_text())["world_size"] == 1
    # rank 0 alone logs and writes
    assert printed.count("data parallel: 2 ranks share each batch of 32 (16 rows each), gloo\n") == 1
    assert printed.count("train loss ") == 1 and printed.count("step 200/200") == 1
    assert sorted(p.name for p in two.iterdir()) == ["best.safetensors", "config.json", "model.safetensors"]


def test_resume_moves_between_world_sizes(two_runs, tmp_path):
    _, two, one = two_runs
    for source, target in [(one, "one-one"), (one, "one-two"), (two, "two-one")]:
        shutil.copytree(source, tmp_path / target)
    more = ["--resume", "--max-steps", "260", "--log-every", "100"]
    ranks = start_ranks(handprop("train", "-o", tmp_path / "one-two", *more))
    try:
        assert train_here("-o", tmp_path / "one-one", *more)[0] == 0
        assert train_here("-o", tmp_path / "two-one", *more)[0] == 0
    finally:
        results = ended(ranks)
    assert [status for status, _, _ in results] == [0, 0], results[0][2] + results[1][2]
    assert "resuming at step 200" in results[0][1] and results[1][1] == ""     # rank 1 prints nothing
    reference = state(tmp_path / "one-one" / "model.safetensors")
    assert_close(state(tmp_path / "one-two" / "model.safetensors"), reference, 1e-5)
    assert_close(state(tmp_path / "two-one" / "model.safetensors"), reference, 1e-5)
    assert json.loads((tmp_path / "one-two" / "config.json").read_text())["world_size"] == 2
    assert json.loads((tmp_path / "two-one" / "config.json").read_text())["world_size"] == 1


def saved_step(work_dir):
    try:
        return json.loads((work_dir / "config.json").read_text())["step"]
    except (OSError, ValueError):
        return 0


@pytest.mark.parametrize("how", [signal.SIGSTOP, signal.SIGKILL], ids=["hung", "dead"])
def test_a_lost_rank_stops_the_other_with_one_line_and_the_run_resumes(tmp_path, corpus, how):
    work_dir = tmp_path / "run"
    steady = ["-i", corpus, "--lr-decay-at", "1"]       # no decay: a shorter resumed run takes the same steps
    ranks = start_ranks(handprop("train", "-o", work_dir, *steady, "--max-steps", "1000000", "--save-every", "50"),
                        HANDPROP_TIMEOUT="3")
    try:
        deadline = time.monotonic() + 60
        while saved_step(work_dir) < 50 and time.monotonic() < deadline and ranks[0].poll() is None:
            time.sleep(0.1)
        assert saved_step(work_dir) >= 50, ranks[0].communicate()[1]
        os.kill(ranks[1].pid, how)
        lost = time.monotonic()
        status, _, err = ended(ranks[:1], timeout=60)[0]
        assert time.monotonic() - lost < 60
    finally:
        ranks[1].kill()
        ranks[1].communicate()
    lines = err.splitlines()
    assert status == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("handprop: rank 0 of 2: another rank died or did not answer within 3 s"), err
    assert f"is kept in {work_dir}; continue with: handprop train --resume -o {work_dir}" in lines[0]
    checkpoint = load_checkpoint(work_dir / "model.safetensors")     # the last save loads...
    assert checkpoint.step >= 50 and checkpoint.step % 50 == 0 and not checkpoint.finished
    if how != signal.SIGKILL:
        return                              # (resuming once is enough: after the killed rank)
    end = checkpoint.step + 20                                      # ...and resumes in one process
    assert train_here("-o", work_dir, "--resume", "--max-steps", end)[0] == 0
    assert train_here("-o", tmp_path / "uninterrupted", *steady, "--max-steps", end)[0] == 0
    assert_close(state(work_dir / "model.safetensors"), state(tmp_path / "uninterrupted" / "model.safetensors"), 1e-5)


def test_a_stop_asked_of_one_rank_stops_every_rank_after_the_same_step(tmp_path, corpus):
    work_dir = tmp_path / "run"
    ranks = start_ranks(handprop("train", "-i", corpus, "-o", work_dir, "--max-steps", "1000000", "--save-every", "50"))
    try:
        deadline = time.monotonic() + 60
        while saved_step(work_dir) < 50 and time.monotonic() < deadline and ranks[0].poll() is None:
            time.sleep(0.1)
        os.kill(ranks[1].pid, signal.SIGTERM)       # rank 1 alone is asked; the request rides in the next all-reduce
        results = ended(ranks, timeout=60)
    finally:
        for rank in ranks:
            rank.kill()
    steps = {int(err.split(" at step ")[1].split(":")[0]) for _, _, err in results}
    assert [status for status, _, _ in results] == [143, 143] and len(steps) == 1, results
    assert all(err.startswith("handprop: SIGTERM at step ") and len(err.splitlines()) == 1 for _, _, err in results)
    assert load_checkpoint(work_dir / "model.safetensors").step == steps.pop()     # rank 0 saved that step
