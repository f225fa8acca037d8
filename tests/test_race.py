"""--compile auto races the compiled step against the eager one (race.py) and trains with the faster, exactly as
--compile on or off would have trained."""

import os
import signal

import pytest
import torch
from cli_runner import run_main

from handprop import compiled as compiled_module
from handprop import race as race_module
from handprop.checkpoint import load_checkpoint
from handprop.race import COMPILED, EAGER, ROUND_SECONDS, ROUNDS, race

TINY_TRANSFORMER = ["--model", "transformer", "--n-layers", "1", "--n-embd", "16", "--n-head", "2", "--warmup", "10"]


class Clock:
    """A clock that moves only when a fake step moves it."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fake_step(name, seconds, clock, calls):
    """A step that takes seconds (a list: one figure per call, the last repeated) on clock, recording its calls."""

    def step(rows, lr, stop=False):
        calls.append((name, rows, lr))
        clock.now += seconds[min(len([c for c in calls if c[0] == name]), len(seconds)) - 1]
        return 0.0, stop
    return step


def test_the_race_takes_turns_and_counts_each_steps_best_round():
    assert (ROUNDS, ROUND_SECONDS) == (3, 0.1)     # the figures below
    clock, calls = Clock(), []
    slow = [0.04] * (1 + 3) + [0.08] * 100   # the warm step and its first round at 25 steps/s, then at 12.5
    steps = {"a": fake_step("a", [0.03], clock, calls), "b": fake_step("b", slow, clock, calls)}
    rates = race(steps, draw=lambda: "rows", lr=0.1, clock=clock)
    assert rates == {"a": pytest.approx(4 / 0.12), "b": pytest.approx(3 / 0.12)}    # the best round of each
    assert all(rows == "rows" and lr == 0.1 for _, rows, lr in calls)
    # a warm step each, then turns of at least ROUND_SECONDS each, who goes first alternating
    assert [name for name, _, _ in calls] == ["a", "b"] + ["a"] * 4 + ["b"] * 3 + ["b"] * 2 + ["a"] * 4 + \
        ["a"] * 4 + ["b"] * 2


def test_a_step_slower_than_a_round_still_takes_one_step_a_round():
    clock, calls = Clock(), []
    rates = race({"big": fake_step("big", [0.5], clock, calls)}, draw=lambda: "rows", lr=0.1, clock=clock)
    assert rates == {"big": pytest.approx(2.0)} and len(calls) == 1 + ROUNDS


@pytest.fixture
def rigged(monkeypatch):
    """A race that really runs (on the run's own tensors), then reports winner_at[thread count] the faster: set
    winner_at; the thread counts raced are listed in raced. --compile auto takes runs of any length."""
    monkeypatch.setattr(compiled_module, "AUTO_COMPILE_STEPS", 1)
    real, raced, winner_at = race_module.race, [], {}

    def race(steps, draw, lr):
        state = steps[COMPILED].state       # every tensor the steps update
        before = [t.clone() for t in state]
        rates = real(steps, draw, lr)
        assert set(rates) == {COMPILED, EAGER} and min(rates.values()) > 0
        assert any(not torch.equal(t, b) for t, b in zip(state, before, strict=True))  # it trained the run itself
        raced.append(torch.get_num_threads())
        return {name: 1000.0 if name == winner_at[raced[-1]] else 100.0 for name in rates}
    monkeypatch.setattr(race_module, "race", race)
    return winner_at, raced


@pytest.fixture
def traced_only(monkeypatch):
    """The compiled step's graph run as traced, without Inductor: the same operations and tensors as the compiled step,
    in seconds instead of half a minute of C++ compiling."""
    monkeypatch.setattr(torch._inductor, "standalone_compile", lambda graph, example, **kwargs: graph)


def train(argv, capsys):
    status, out, err = run_main(["train", *argv], capsys)
    assert status == 0, err
    return out


def final_state(work_dir):
    """The final losses, and every tensor the run saved: parameters, buffers, optimiser state, the batch generator."""
    checkpoint = load_checkpoint(work_dir / "model.safetensors")
    return checkpoint.losses, checkpoint.model.parameters() | checkpoint.model.buffers() | \
        {f"optim.{k}": v for k, v in checkpoint.optimizer_tensors.items()} | {"rng": checkpoint.batch_generator}, \
        checkpoint.optimizer_state


def assert_same_run(work_dir, twin):
    (losses, tensors, numbers), (twin_losses, twin_tensors, twin_numbers) = final_state(work_dir), final_state(twin)
    assert losses == twin_losses and numbers == twin_numbers
    assert tensors.keys() == twin_tensors.keys() and all(torch.equal(tensors[k], twin_tensors[k]) for k in tensors)


@pytest.mark.parametrize("winner,alone", [(COMPILED, "on"), (EAGER, "off")])
def test_a_transformer_with_dropout_trains_exactly_as_the_winner_alone(winner, alone, tmp_path, capsys, names, rigged,
                                                                      traced_only):
    """The race trains the run itself; then AdamW's step count and moments, dropout's generator (the batches' too) and
    the parameters are put back: the run ends as --compile on or off ends it, to the bit."""
    winner_at, raced = rigged
    winner_at[1] = winner
    flags = [*TINY_TRANSFORMER, "--max-steps", "30", "-i", names]
    out = train(["-o", tmp_path / "auto", *flags], capsys)
    assert raced == [1]
    rates = "compiled 1,000 steps/s, op by op 100" if winner == COMPILED else "compiled 100 steps/s, op by op 1,000"
    assert f"--compile auto on 1 thread: {rates} steps/s: training {winner}\n" in out
    assert "--compile auto" not in train(["-o", tmp_path / alone, *flags, "--compile", alone], capsys)
    assert raced == [1]                     # --compile on is never raced, nor overridden
    assert_same_run(tmp_path / "auto", tmp_path / alone)


@pytest.mark.parametrize("winner,alone", [(COMPILED, "on"), (EAGER, "off")])
def test_the_compiled_mlp_races_and_trains_exactly_as_the_winner_alone(winner, alone, tmp_path, capsys, names, rigged):
    """With Inductor: the default model (BatchNorm's running statistics are put back too)."""
    winner_at, raced = rigged
    winner_at[1] = winner
    flags = ["--max-steps", "30", "-i", names]
    out = train(["-o", tmp_path / "auto", *flags], capsys)
    assert "compiling the training step" in out and f"training {winner}\n" in out and raced == [1]
    train(["-o", tmp_path / alone, *flags, "--compile", alone], capsys)
    assert_same_run(tmp_path / "auto", tmp_path / alone)


def test_a_race_that_fails_leaves_the_run_to_train_op_by_op_as_it_would_have(tmp_path, capsys, names, monkeypatch,
                                                                           traced_only):
    monkeypatch.setattr(compiled_module, "AUTO_COMPILE_STEPS", 1)
    real = race_module.race

    def failing(steps, draw, lr):           # a few steps in, the compiled step breaks
        def broken(rows, lr, stop=False):
            raise RuntimeError("the graph broke\nat some kernel")
        real(steps, draw, lr)
        return real({COMPILED: broken, EAGER: steps[EAGER]}, draw, lr)
    monkeypatch.setattr(race_module, "race", failing)
    flags = [*TINY_TRANSFORMER, "--max-steps", "30", "-i", names]
    out = train(["-o", tmp_path / "auto", *flags], capsys)
    assert "done in" in out and "\nthe compiled step failed (the graph broke): training op by op\n" in out
    train(["-o", tmp_path / "off", *flags, "--compile", "off"], capsys)
    assert_same_run(tmp_path / "auto", tmp_path / "off")


def test_ctrl_c_during_the_race_stops_at_once_and_says_so(tmp_path, capsys, names, monkeypatch, traced_only):
    monkeypatch.setattr(compiled_module, "AUTO_COMPILE_STEPS", 1)

    def interrupted(steps, draw, lr):
        os.kill(os.getpid(), signal.SIGINT)
        return {COMPILED: 1.0, EAGER: 1.0}
    monkeypatch.setattr(race_module, "race", interrupted)
    status, out, err = run_main(["train", "-o", tmp_path / "auto", *TINY_TRANSFORMER, "--max-steps", "30", "-i", names],
                                capsys)
    assert status == 128 + signal.SIGINT and "stopped" not in out
    assert err == "handprop: SIGINT while racing the compiled step against op by op: nothing was saved yet\n"
