"""How many threads a command runs on (threads.py): the rule on fake machines, the flag, the log, switches mid-run."""

import json
import math
import os
import types
from dataclasses import replace

import pytest
import torch
from cli_runner import run_main

from handprop import compiled as compiled_module
from handprop import race as race_module
from handprop import train as train_module
from handprop.checkpoint import load_checkpoint, save_checkpoint
from handprop.cli import main
from handprop.compiled import CompiledStep
from handprop.config import TrainConfig, config_from_dict
from handprop.data import load_corpus
from handprop.errors import UserError
from handprop.race import COMPILED, EAGER
from handprop.settings import preset, recipe
from handprop.step import EagerStep
from handprop.threads import (
    AUTO,
    FREE_SHARE,
    QUIET_READINGS,
    WATCH_SECONDS,
    WORK_PER_THREAD,
    Load,
    MatrixProducts,
    OnePerCount,
    Threads,
    allowed_cores,
    choose_threads,
    environment_threads,
    free_cores,
    local_ranks,
    parse_threads,
    step_work,
)
from handprop.train import prepare

BIG = 2 * WORK_PER_THREAD + 1       # products with the work for 2 threads (the transformer's: 4.27M multiply-adds)


@pytest.fixture(autouse=True)
def threads_put_back():
    """Every Threads sets torch's count: the test process goes back to the suite's one thread."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class Clock:
    """A clock that moves only when told to."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class ScriptedLoad:
    """A Load whose readings of the other processes' cores are given in advance."""

    def __init__(self, *taken):
        self.taken = list(taken)

    def others(self):
        return self.taken.pop(0)


# --- the setting -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [("auto", AUTO), (" AUTO ", AUTO), ("1", "1"), ("02", "2"), ("1024", "1024")])
def test_the_setting_is_auto_or_a_whole_number_of_threads(text, value):
    assert parse_threads(text) == value


@pytest.mark.parametrize("text", ["0", "-1", "1.5", "two", "", "1025", "auto2"])
def test_any_other_setting_is_refused(text):
    with pytest.raises(ValueError, match="expected auto or a whole number of threads from 1 to 1,024"):
        parse_threads(text)


# --- the cores this process may use ------------------------------------------------------------------------------

@pytest.mark.parametrize("quota, cores", [("max 100000", None), ("200000 100000", 2), ("150000 100000", 2),
                                          ("50000 100000", 1), ("100000000 100000", None)])
def test_a_cgroup_quota_caps_the_cores_of_the_affinity(tmp_path, quota, cores):
    affinity = allowed_cores(tmp_path / "absent")
    (tmp_path / "cpu.max").write_text(quota + "\n")
    assert allowed_cores(tmp_path / "cpu.max") == (affinity if cores is None else min(cores, affinity))


def test_the_cores_are_the_affinity_of_the_process():
    assert allowed_cores("/nonexistent/cpu.max") == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("environ, ranks", [({}, 1), ({"LOCAL_WORLD_SIZE": "4"}, 4), ({"LOCAL_WORLD_SIZE": "0"}, 1)])
def test_local_ranks_come_from_torchrun(environ, ranks):
    assert local_ranks(environ) == ranks


def test_a_local_world_size_that_is_no_number_is_one_error():
    with pytest.raises(UserError, match="LOCAL_WORLD_SIZE must be a whole number"):
        local_ranks({"LOCAL_WORLD_SIZE": "two"})


@pytest.mark.parametrize("value, ranks, threads", [(None, 1, None), ("3", 1, 3), (" 4,2 ", 1, 4), ("1", 1, 1),
                                                   ("1", 2, None), ("2", 2, 2)])
def test_an_omp_num_threads_the_user_set_is_obeyed_but_torchruns_own_1_is_not(value, ranks, threads):
    environ = {} if value is None else {"OMP_NUM_THREADS": value}
    assert environment_threads(environ, ranks) == threads


@pytest.mark.parametrize("value", ["abc", "0", "-2"])
def test_a_bad_omp_num_threads_is_one_error(value):
    with pytest.raises(UserError, match="OMP_NUM_THREADS must be a whole number of threads"):
        environment_threads({"OMP_NUM_THREADS": value}, 1)


# --- the decision --------------------------------------------------------------------------------------------------

def test_a_fixed_setting_is_taken_as_it_is_and_never_watched():
    threads = choose_threads("3", BIG, environ={"OMP_NUM_THREADS": "1"}, cores=4, load=ScriptedLoad())
    assert (threads.count, torch.get_num_threads(), threads.load) == (3, 3, None)
    assert threads.describe() == "threads: 3 (--threads 3)"


@pytest.mark.parametrize("environ, cores, why", [({}, 2, "more than the 2 cores it may use"),
                                                 ({"LOCAL_WORLD_SIZE": "2"}, 4, "more than the 2 cores it may use"),
                                                 ({}, 1, "more than the 1 core it may use")])
def test_more_threads_than_cores_are_taken_as_asked_and_the_log_warns(environ, cores, why):
    threads = choose_threads("3", BIG, environ=environ, cores=cores, load=ScriptedLoad())
    assert threads.count == 3
    assert threads.describe() == f"threads: 3 (--threads 3; {why}: expect its barriers to wait)"


def test_auto_obeys_omp_num_threads():
    threads = choose_threads(AUTO, BIG, environ={"OMP_NUM_THREADS": "1"}, cores=2, load=ScriptedLoad())
    assert (threads.count, threads.load) == (1, None)
    assert threads.describe() == "threads: 1 (OMP_NUM_THREADS=1 in the environment)"


@pytest.mark.parametrize("name", ["mlp", "rnn", "bigram"])
def test_a_small_step_takes_one_thread_on_an_idle_machine(name):
    """Measured (benchmarks/under_load.py): these steps run as fast or faster on one thread than on two."""
    corpus = load_corpus()
    with torch.inference_mode():
        splits, run = prepare(corpus, preset(name), recipe(name), None)
        work = step_work(run.model, splits.tensors["train"], recipe(name).batch_size)
    threads = choose_threads(AUTO, work, environ={}, cores=16, load=ScriptedLoad(0.0))
    assert (threads.count, threads.load) == (1, None)
    assert "gain nothing from a second thread" in threads.describe()


@pytest.mark.parametrize("name, work", [("transformer", "4.27M"), ("mlp-fast", "6.19M"), ("gru", "2.64M"),
                                        ("wavenet", "1.01M")])
def test_a_step_of_large_products_takes_two_threads_on_two_idle_cores_and_is_watched(name, work):
    """Measured (benchmarks/under_load.py): these steps run 1.15x to 1.5x faster on two threads than on one."""
    corpus = load_corpus()
    with torch.inference_mode():
        splits, run = prepare(corpus, preset(name), recipe(name), None)
        work_done = step_work(run.model, splits.tensors["train"], recipe(name).batch_size)
    load = ScriptedLoad(0.1)
    threads = choose_threads(AUTO, work_done, environ={}, cores=2, load=load)
    assert (threads.count, threads.wanted, threads.load, torch.get_num_threads()) == (2, 2, load, 2)
    assert threads.describe().startswith(f"threads: 2 (auto: matrix products of {work} multiply-adds keep 2 busy;")


def test_a_step_that_gains_from_two_takes_one_beside_a_busy_process():
    threads = choose_threads(AUTO, BIG, environ={}, cores=2, load=ScriptedLoad(1.0))
    assert (threads.count, threads.wanted, torch.get_num_threads()) == (1, 2, 1)
    assert "threads: 1 for now (" in threads.describe() and "other processes take 1.0 of 2 cores" in threads.describe()


@pytest.mark.parametrize("environ, cores, why", [({}, 1, "but this process may use 1 core"),
                                                 ({"LOCAL_WORLD_SIZE": "2"}, 2, "but 2 ranks share this machine's 2")])
def test_a_step_that_gains_from_two_takes_one_where_it_may_use_one_core_and_says_why(environ, cores, why):
    threads = choose_threads(AUTO, BIG, environ=environ, cores=cores, load=ScriptedLoad())
    assert (threads.count, threads.load) == (1, None)
    assert "multiply-adds would keep 2 busy, " + why in threads.describe()


def test_a_step_that_gains_from_more_cannot_be_watched_where_the_load_cannot_be_read(monkeypatch):
    monkeypatch.setattr(Load, "of_this_machine", classmethod(lambda cls: None))
    threads = choose_threads(AUTO, BIG, environ={}, cores=2)
    assert (threads.count, threads.load) == (1, None)
    assert "cannot be read" in threads.describe()


@pytest.mark.parametrize("work_threads, cores, taken, count", [
    (5, 16, 0.0, 5),        # the work decides
    (5, 4, 0.0, 4),         # the cores decide
    (5, 16, 12.0, 4),       # what the others leave decides
    (5, 16, 10.8, 5),       # a core the others barely use counts as free
    (5, 16, 16.0, 1),       # at least one
])
def test_auto_takes_one_thread_per_work_per_thread_on_the_free_cores(work_threads, cores, taken, count):
    threads = choose_threads(AUTO, work_threads * WORK_PER_THREAD, environ={}, cores=cores, load=ScriptedLoad(taken))
    assert threads.count == count


def test_free_cores_count_a_core_the_others_take_at_most_a_quarter_of():
    assert free_cores(2, 0.0) == 2 and free_cores(2, FREE_SHARE) == 2 and free_cores(2, FREE_SHARE + 0.01) == 1
    assert free_cores(2, 1.0) == 1 and free_cores(2, 2.5) == 0


@pytest.mark.parametrize("cores, ranks, count", [(2, 2, 1), (8, 2, 4), (8, 3, 2), (2, 4, 1)])
def test_under_torchrun_each_rank_takes_its_share_of_the_cores(cores, ranks, count):
    environ = {"LOCAL_WORLD_SIZE": str(ranks), "OMP_NUM_THREADS": "1"}   # torchrun's own 1 for several ranks
    taken = (ranks - 1) * cores // ranks    # the other ranks at work
    threads = choose_threads(AUTO, 100 * WORK_PER_THREAD, environ=environ, cores=cores, load=ScriptedLoad(taken))
    assert threads.count == count
    assert f"{ranks} ranks share this machine's {cores} cores" in threads.describe()


# --- watching the load -------------------------------------------------------------------------------------------

def test_a_watched_run_drops_at_once_when_a_core_is_taken_and_comes_back_after_quiet_readings():
    said, clock = [], Clock()
    load = ScriptedLoad(1.0, 0.9, 0.0, 1.0, 0.0, 0.1, 0.0)
    threads = Threads(2, "auto", wanted=2, cores=2, load=load, clock=clock, say=said.append)
    assert not threads.watch(0) and load.taken[0] == 1.0    # no reading before WATCH_SECONDS
    counts = []
    for step in range(1, 8):
        clock.now += WATCH_SECONDS
        threads.watch(step)
        counts.append((threads.count, torch.get_num_threads()))
    # busy: down at once; a free reading then a busy one: stays down; free readings in a row: back up
    assert [c for c, _ in counts] == [1, 1, 1, 1, 1, 2, 2] and all(c == n for c, n in counts)
    assert QUIET_READINGS == 2
    assert said == ["threads: 1 from step 1: other processes take 1.0 of 2 cores",
                    "threads: 2 from step 6: the cores are free again"]


def test_pinning_stops_the_watching():
    threads = Threads(2, "auto", wanted=2, cores=2, load=ScriptedLoad(), clock=Clock())
    threads.pin(1, "from now on")
    assert (threads.count, threads.load, threads.watch(5)) == (1, None, False)


def fake_proc(root, cpus, procs_running, own_states):
    """A /proc tree: stat with the given per-cpu (busy, idle) ticks, and this process's threads in own_states."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    for n, (busy, idle) in enumerate(cpus):     # busy split over user and system, idle over idle and iowait
        lines.append(f"cpu{n} {busy - busy // 2} 0 {busy // 2} {idle - 1} 1 0 0 0 0 0")
    lines += ["intr 1 2 3", f"procs_running {procs_running}", "procs_blocked 0", ""]
    (root / "stat").write_text("\n".join(lines))
    for tid, state in enumerate(own_states):
        task = root / "self" / "task" / str(tid)
        task.mkdir(parents=True, exist_ok=True)
        (task / "stat").write_text(f"{tid} (python3 (x)) {state} 1 2 3")


def test_the_load_is_the_others_share_of_the_cores_time(tmp_path):
    clock, own = Clock(), types.SimpleNamespace(seconds=0.0)
    fake_proc(tmp_path, [(0, 0), (0, 0), (0, 0)], 1, ["R", "S"])
    load = Load([0, 1], proc=tmp_path, clock=clock, own_time=lambda: own.seconds)
    tick = load.tick
    clock.now, own.seconds = 2.0, 1.5       # 2 s later: this process took 1.5 s of CPU
    # cpu0 and cpu1 busy 2.0 and 1.2 s (cpu2 is not this process's: ignored); one task runs: this one
    fake_proc(tmp_path, [(2 * tick, 0), (int(1.2 * tick), int(0.8 * tick)), (2 * tick, 0)], 1, ["R", "S"])
    assert load.others() == pytest.approx((2.0 + 1.2 - 1.5) / 2.0)


def test_a_process_waiting_to_run_counts_as_a_taken_core_however_little_time_it_gets(tmp_path):
    """A nice 19 loop gets a sliver of CPU time beside a spinning run, yet stalls its barriers: it is seen waiting."""
    clock = Clock()
    fake_proc(tmp_path, [(0, 0), (0, 0)], 3, ["R", "R", "S"])   # this process's 2 threads and one other task
    load = Load([0, 1], proc=tmp_path, clock=clock, own_time=lambda: 0.0)
    clock.now = 2.0
    assert load.others() == 1.0


def test_this_machines_load_can_be_read():
    load = Load.of_this_machine()
    others = load.others()
    assert math.isfinite(others) and 0 <= others <= 1024


# --- the work of a step -------------------------------------------------------------------------------------------

def test_matrix_products_are_counted_in_multiply_adds():
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    with MatrixProducts() as counter:
        a @ b, torch.matmul(torch.randn(2, 3, 4), b), torch.addmm(torch.randn(5), a, b), torch.mm(a, b)
        torch.bmm(torch.randn(2, 3, 4), torch.randn(2, 4, 5)), a + 1
    assert counter.work == 60 + 120 + 60 + 60 + 120


def test_the_mlps_step_work_is_its_average_product_and_changes_nothing():
    with torch.inference_mode():
        splits, run = prepare(load_corpus(), preset("mlp"), recipe("mlp"), None)
        before = {k: v.clone() for k, v in (run.model.parameters() | run.model.buffers()).items()}
        generator = run.generator.get_state()
        work = step_work(run.model, splits.tensors["train"], 32)
    # forward: (32, 30) @ (30, 200) and (32, 200) @ (200, 27); the backward's products have the same sizes
    assert work == 32 * (30 * 200 + 200 * 27) // 2
    after = run.model.parameters() | run.model.buffers()
    assert all(torch.equal(before[k], after[k]) for k in before)   # BatchNorm's running statistics included
    assert torch.equal(run.generator.get_state(), generator)        # the batches to come are the same


# --- the flag on every command, the log, the config, resume -------------------------------------------------------

@pytest.mark.parametrize("command", ["train", "eval", "sample", "check", "grade"])
def test_every_command_shows_the_flag_with_its_default_and_range(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        main([command, "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--threads N|auto threads for tensor operations: N, or auto:" in shown
    assert "(docs/performance.md, Threads) (default auto; 1 to 1,024)" in shown


@pytest.mark.parametrize("command", ["train", "eval", "sample", "check", "grade"])
@pytest.mark.parametrize("value", ["0", "x", "1.5", "2000"])
def test_a_bad_threads_value_is_one_error_line_and_exit_2_on_every_command(command, value, capsys, tmp_path):
    argv = [command, "--threads", value] + (["solution.py"] if command == "grade" else [])
    status, out, err = run_main(argv, capsys)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("handprop: error: argument --threads: expected auto or a whole")
    assert f"got '{value}'" in err


class Chosen(Exception):
    """What a command asked use_threads for, before it did its work."""


@pytest.mark.parametrize("command", ["eval", "sample", "check", "grade"])
def test_every_command_sets_the_threads_it_is_given_before_its_work(command, trained_dir, monkeypatch, tmp_path):
    def use_threads(setting, work):
        raise Chosen(setting)
    monkeypatch.setattr("handprop.cli.use_threads", use_threads)
    (tmp_path / "solution.py").write_text("")
    argv = {"eval": ["eval", "-o", trained_dir], "sample": ["sample", "-o", trained_dir, "-n", "2"],
            "check": ["check"], "grade": ["grade", tmp_path / "solution.py"]}[command]
    for flags, setting in ([], None), (["--threads", "2"], "2"):    # None: auto, the default
        with pytest.raises(Chosen) as chosen:
            main([str(a) for a in argv + flags])
        assert chosen.value.args == (setting,)


def train_log(argv, capsys):
    status, out, err = run_main(["train", *argv], capsys)
    assert status == 0, err
    return out


def test_the_log_says_how_many_threads_and_why_and_the_config_records_the_setting(tmp_path, capsys, names):
    out = train_log(["-o", tmp_path / "a", "--max-steps", "20", "-i", names], capsys)
    assert "threads: 1 (OMP_NUM_THREADS=1 in the environment)\n" in out     # the suite runs with it set
    assert json.loads((tmp_path / "a" / "config.json").read_text())["train_config"]["threads"] == "auto"
    out = train_log(["-o", tmp_path / "b", "--max-steps", "20", "--threads", "2", "-i", names], capsys)
    assert "threads: 2 (--threads 2" in out    # and a warning on one core
    assert json.loads((tmp_path / "b" / "config.json").read_text())["train_config"]["threads"] == "2"


def test_resume_may_change_the_threads_and_keeps_them_when_not_given(tmp_path, capsys, names):
    work_dir = tmp_path / "run"
    train_log(["-o", work_dir, "--max-steps", "20", "--threads", "2", "-i", names], capsys)
    out = train_log(["--resume", "-o", work_dir, "--max-steps", "30"], capsys)
    assert "threads: 2 (--threads 2" in out    # and a warning on one core
    out = train_log(["--resume", "-o", work_dir, "--max-steps", "40", "--threads", "auto"], capsys)
    assert "threads: 1 (OMP_NUM_THREADS=1 in the environment)\n" in out
    assert load_checkpoint(work_dir / "model.safetensors").spec.train_config.threads == "auto"


def test_eval_with_two_threads_prints_the_same_losses(tmp_path, capsys, names):
    train_log(["-o", tmp_path / "run", "--max-steps", "50", "-i", names], capsys)
    one = run_main(["eval", "-o", tmp_path / "run", "--threads", "1"], capsys)
    two = run_main(["eval", "-o", tmp_path / "run", "--threads", "2"], capsys)
    assert one[0] == two[0] == 0 and one[1] == two[1] and "val loss" in one[1]


def test_a_checkpoint_from_before_the_setting_runs_with_auto():
    saved = {k: v for k, v in TrainConfig().__dict__.items() if k != "threads"}
    assert config_from_dict(TrainConfig, saved, "old.safetensors").threads == AUTO


def test_a_corrupt_threads_setting_in_a_checkpoint_is_one_error(tmp_path, capsys, names):
    train_log(["-o", tmp_path / "run", "--max-steps", "5", "-i", names], capsys)
    path = tmp_path / "run" / "model.safetensors"
    checkpoint = load_checkpoint(path)
    checkpoint.spec = replace(checkpoint.spec, train_config=replace(checkpoint.spec.train_config, threads="many"))
    save_checkpoint(path, checkpoint)
    status, out, err = run_main(["train", "--resume", "-o", tmp_path / "run", "--max-steps", "10"], capsys)
    assert status == 2 and err.startswith("handprop: error: ") and "threads: expected auto" in err


# --- switching mid-run --------------------------------------------------------------------------------------------

def scripted_threads(monkeypatch, *taken):
    """train() runs on Threads that read taken (cores' worth of other processes) at every step, starting at 1."""
    clock = Clock()

    def ticking():
        clock.now += WATCH_SECONDS          # a reading at every step
        return clock.now

    def choose(setting, work, say):
        return Threads(1, "scripted", wanted=2, cores=2, load=ScriptedLoad(*taken, *[1.0] * 10_000), clock=ticking,
                       say=say)
    monkeypatch.setattr(train_module, "choose_threads", choose)


SWITCHING = (1.0,) * 5 + (0.0,) * 10 + (1.0,) * 5 + (0.0,) * 10  # 1 thread, 2 from step 6, 1 from 15, 2 from 21


def final_state(work_dir):
    checkpoint = load_checkpoint(work_dir / "model.safetensors")
    return checkpoint.losses, checkpoint.model.parameters() | checkpoint.model.buffers()


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_an_eager_run_that_switches_threads_takes_exactly_the_steps_of_one_that_does_not(name, tmp_path, capsys,
                                                                                       monkeypatch, names):
    """Verified, not assumed: at these sizes the eager step's arithmetic does not depend on the thread count."""
    flags = ["--model", name, "--max-steps", "30", "--compile", "off", "--n-layers", "1", "-i", names] + \
        (["--warmup", "10"] if name == "transformer" else [])
    train_log(["-o", tmp_path / "fixed", *flags, "--threads", "1"], capsys)
    scripted_threads(monkeypatch, *SWITCHING)
    out = train_log(["-o", tmp_path / "switched", *flags], capsys)
    assert "threads: 2 from step 6: the cores are free again" in out
    assert "threads: 1 from step 15: other processes take 1.0 of 2 cores" in out
    assert "threads: 2 from step 21" in out
    (losses, fixed), (switched_losses, switched) = final_state(tmp_path / "fixed"), final_state(tmp_path / "switched")
    assert switched_losses == losses
    assert all(torch.equal(fixed[k], switched[k]) for k in fixed)


def test_a_compiled_run_compiles_a_graph_per_thread_count_and_takes_the_same_steps_within_float32(tmp_path, capsys,
                                                                                                  monkeypatch, names):
    flags = ["--max-steps", "30", "--compile", "on", "-i", names]
    train_log(["-o", tmp_path / "fixed", *flags, "--threads", "1"], capsys)
    built = []
    original = OnePerCount.compile

    def compile_counting(self, count):
        built.append(count)
        original(self, count)
    monkeypatch.setattr(OnePerCount, "compile", compile_counting)
    scripted_threads(monkeypatch, *SWITCHING)
    out = train_log(["-o", tmp_path / "switched", *flags], capsys)
    assert built == [2]                     # the 1-thread graph is the first; each count is compiled once
    assert "compiled the training step for 2 threads in" in out
    (losses, fixed), (switched_losses, switched) = final_state(tmp_path / "fixed"), final_state(tmp_path / "switched")
    assert switched_losses == pytest.approx(losses, rel=1e-5)
    for k in fixed:                         # float32 sums in another order over 2 threads: a few ulps a step
        assert torch.allclose(fixed[k], switched[k], rtol=1e-4, atol=1e-6), k


def test_compile_auto_races_again_at_each_thread_count_it_takes(tmp_path, capsys, monkeypatch, names):
    # the compiled step wins on 1 thread and loses on 2 (as mlp-fast's does): each count gets its own winner
    monkeypatch.setattr(compiled_module, "AUTO_COMPILE_STEPS", 1)
    raced, made = [], []

    def race(steps, draw, lr):
        raced.append(torch.get_num_threads())
        return {COMPILED: 2.0, EAGER: 1.0} if raced[-1] == 1 else {COMPILED: 1.0, EAGER: 2.0}
    monkeypatch.setattr(race_module, "race", race)

    class Recorded(OnePerCount):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)
    monkeypatch.setattr(train_module, "OnePerCount", Recorded)
    flags = ["--max-steps", "30", "-i", names]
    train_log(["-o", tmp_path / "fixed", *flags, "--compile", "on", "--threads", "1"], capsys)
    assert raced == []                      # --compile on is never raced
    scripted_threads(monkeypatch, *SWITCHING)
    out = train_log(["-o", tmp_path / "switched", *flags], capsys)
    assert raced == [1, 2]                  # once per count, the first time it is taken (1, 2, 1, 2 in the run)
    assert "--compile auto on 1 thread: compiled 2 steps/s, op by op 1 steps/s: training compiled\n" in out
    assert "compiled the training step for 2 threads in" in out
    assert "--compile auto on 2 threads: compiled 1 steps/s, op by op 2 steps/s: training op by op\n" in out
    steps = made[-1].steps
    assert isinstance(steps[1], CompiledStep) and isinstance(steps[2], EagerStep)
    (losses, fixed), (switched_losses, switched) = final_state(tmp_path / "fixed"), final_state(tmp_path / "switched")
    assert switched_losses == pytest.approx(losses, rel=1e-5)
    for k in fixed:                         # op by op on 2 threads rounds as the eager step does: a few ulps a step
        assert torch.allclose(fixed[k], switched[k], rtol=1e-4, atol=1e-6), k


def test_a_second_graph_that_fails_to_compile_keeps_the_run_on_the_first(capsys):
    said = []
    threads = Threads(1, "auto", wanted=2, cores=2, load=ScriptedLoad(), clock=Clock(), say=said.append)

    def fail():
        raise RuntimeError("no compiler\nmore")
    step = OnePerCount(lambda rows, lr, stop: ("one-thread graph", rows, lr, stop), fail, threads)
    threads.set(2, "from step 7: the cores are free again")
    assert step("rows", 0.1) == ("one-thread graph", "rows", 0.1, False)
    assert (threads.count, threads.load, torch.get_num_threads()) == (1, None, 1)
    assert said[-1] == "threads: 1 from now on: compiling the step for 2 failed (no compiler)"
