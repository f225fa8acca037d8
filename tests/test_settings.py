"""A run's settings, worked out in one place (settings.py), and what a new user tripped on there (issue 18)."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, replace

import pytest
import torch
from cli_runner import run_main

from handprop import cli
from handprop.checkpoint import load_checkpoint
from handprop.config import ModelConfig, TrainConfig, setting, validate_model
from handprop.errors import UserError
from handprop.models import build_model
from handprop.optim import SGD
from handprop.settings import PRESETS, RECIPES, USES, Overrides, new_settings, preset, recipe

FAST = ["--save-every", "10", "--log-every", "10"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """300 random lowercase words: quick to split and to evaluate."""
    rng, letters = random.Random(0), "abcdefghijklmnopqrstuvwxyz"
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text("".join("".join(rng.choices(letters, k=rng.randint(3, 12))) + "\n" for _ in range(300)))
    return path


def one_error_line(err, *words):
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("handprop: error: ") and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, err)


# --- 5: a setting the chosen model does not use is refused, as -w with SGD always was -----------------------------

IGNORED = [
    ("gru --init naive", ["--model", "gru", "--init", "naive"], "--init is for mlp and wavenet only"),
    ("rnn --init naive", ["--model", "rnn", "--init", "naive"], "--init"),
    ("transformer --init naive", ["--model", "transformer", "--init", "naive"], "--init"),
    ("mlp --dropout", ["--dropout", "0.2"], "--dropout is for the transformer only"),
    ("mlp --n-head", ["--n-head", "2"], "--n-head is for the transformer only"),
    ("bigram --n-embd", ["--model", "bigram", "--n-embd", "20"], "--n-embd is for every model but bigram"),
    ("bigram --n-hidden", ["--model", "bigram", "--n-hidden", "20"], "--n-hidden"),
    ("rnn --n-layers", ["--model", "rnn", "--n-layers", "2"], "--n-layers"),
    ("transformer --n-hidden", ["--model", "transformer", "--n-hidden", "100"], "4 x --n-embd"),
    ("bigram --no-batchnorm", ["--model", "bigram", "--no-batchnorm"], "has no BatchNorm"),
    ("mlp-fast --bn-variance", ["--model", "mlp-fast", "--bn-variance", "biased"], "has no BatchNorm"),
    ("step schedule --warmup", ["--warmup", "10"], "add --schedule cosine"),
    ("step schedule --min-lr", ["--min-lr", "0.01"], "add --schedule cosine"),
    ("cosine schedule --lr-decay-at", ["--model", "mlp-fast", "--lr-decay-at", "0.3"], "add --schedule step"),
    ("the recipe's weight decay with sgd", ["--model", "rnn", "--optimizer", "sgd"], "rnn's recipe", "add -w 0"),
]


@pytest.mark.parametrize("flags, words", [(c[1], c[2:]) for c in IGNORED], ids=[c[0] for c in IGNORED])
def test_a_setting_the_run_would_ignore_is_one_error_line_and_nothing_is_written(flags, words, tmp_path, capsys):
    status, out, err = run_main(["train", *flags, "-o", tmp_path / "out"], capsys)
    assert status == 2 and out == ""
    one_error_line(err, *words)
    assert not (tmp_path / "out").exists()


def test_a_settings_default_value_is_accepted_where_it_changes_nothing():
    # -w 0 is what the recipe's refusal asks for; giving a field its default changes nothing, so it is no error
    settings = new_settings(Overrides("rnn", {"init": "lecture"}, {"optimizer": "sgd", "weight_decay": 0.0}))
    assert settings.train_config.weight_decay == 0 and settings.train_config.optimizer == "sgd"
    assert new_settings(Overrides("mlp", {"dropout": 0.0}, {"warmup": 0})).model_config == PRESETS["mlp"]


CHANGED = {"n_embd": 16, "n_hidden": 24, "n_layers": 2, "n_head": 1, "dropout": 0.3, "init": "naive",
           "batchnorm": False, "bessel": False}


def built(config):
    """What a model of config is: its parameters and its training-mode output on a fixed batch."""
    model = build_model(config, torch.Generator().manual_seed(1), dtype=torch.float64)
    x = torch.randint(0, config.vocab_size, (6, config.block_size), generator=torch.Generator().manual_seed(2))
    return model.parameters(), model.forward(x)


def same(a, b):
    (params_a, out_a), (params_b, out_b) = a, b
    return (params_a.keys() == params_b.keys() and all(params_a[k].shape == params_b[k].shape
                                                       and torch.equal(params_a[k], params_b[k]) for k in params_a)
            and torch.equal(out_a, out_b))


@pytest.mark.parametrize("name", list(PRESETS))
def test_the_table_of_uses_says_which_settings_change_each_model(name):
    # every model setting in USES: the table says the model uses it exactly when changing it changes the model
    # (lookup_tables is left out: it computes the same function, only faster)
    base = preset(name, vocab_size=27, block_size=PRESETS[name].block_size or 8, n_embd=8, n_hidden=12)
    model_settings = [k for k in USES if k in CHANGED]
    for field_name in model_settings:
        value = CHANGED[field_name] if getattr(base, field_name) != CHANGED[field_name] else not CHANGED[field_name]
        used = USES[field_name][0](base, recipe(name))
        try:
            changed = validate_model(replace(base, **{field_name: value}))
        except UserError:                   # a value this model cannot take (a wavenet's depth): it is used
            assert used, (name, field_name)
            continue
        assert used != same(built(base), built(changed)), (name, field_name, used)
    assert set(model_settings) | {"lookup_tables"} == {k for k in USES if k in ModelConfig.__dataclass_fields__}


# --- 6: short runs of the recipe models work, and say that the recipe's warmup was cut -----------------------------

SHORT = {
    "rnn": ["--n-embd", "8", "--n-hidden", "8"],
    "gru": ["--n-embd", "8", "--n-hidden", "8"],
    "transformer": ["--n-embd", "8", "--n-layers", "1", "--n-head", "2"],
    "mlp-fast": ["--n-embd", "8", "--n-hidden", "16"],
}


@pytest.mark.parametrize("name", list(SHORT))
def test_a_short_run_of_a_recipe_model_shortens_the_warmup_and_says_so(name, corpus, tmp_path, capsys):
    warmup = RECIPES[name].warmup
    status, out, err = run_main(["train", "--model", name, *SHORT[name], "-i", corpus, "--max-steps", warmup,
                                 *FAST, "-o", tmp_path / "run"], capsys)
    assert status == 0, err
    short = warmup // 10
    assert f"{name}'s recipe warms up for {warmup} steps" in out.splitlines()[0]
    assert f"warming up for {short} instead (choose with --warmup N)" in out.splitlines()[0]
    assert load_checkpoint(tmp_path / "run" / "model.safetensors").spec.train_config.warmup == short
    # the user's own warmup is the user's: as long as the run, it is refused and named as theirs
    status, _, err = run_main(["train", "--model", name, "--max-steps", 20, "--warmup", 20, "-o", tmp_path / "b"],
                              capsys)
    assert status == 2
    one_error_line(err, "--warmup 20")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank, size, port):
    """The environment torchrun gives a rank on one machine, one thread per process."""
    return os.environ | {"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank),
                         "LOCAL_WORLD_SIZE": str(size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                         "OMP_NUM_THREADS": "1"}


def test_a_short_recipe_run_works_under_torchrun_too(corpus, tmp_path):
    argv = [sys.executable, "-m", "handprop", "train", "--model", "rnn", *SHORT["rnn"], "-i", str(corpus),
            "--max-steps", "20", "-o", str(tmp_path / "run")]
    port = free_port()
    ranks = [subprocess.Popen(argv, env=rank_env(rank, 2, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in range(2)]
    printed = [p.communicate(timeout=120) for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], printed
    assert "warming up for 2 instead" in printed[0][0] and printed[1][0] == ""     # rank 0 alone logs


# --- 9: --resume with nothing to resume -----------------------------------------------------------------------------

@pytest.mark.parametrize("existing", [True, False], ids=["empty directory", "no directory"])
def test_resume_with_no_checkpoint_is_an_error_not_a_new_run(existing, tmp_path, capsys):
    work_dir = tmp_path / "run"
    if existing:
        work_dir.mkdir()
    status, out, err = run_main(["train", "--resume", "-o", work_dir], capsys)
    assert status == 2 and out == ""
    one_error_line(err, "--resume found no run to continue", str(work_dir), "leave out --resume")
    assert (list(work_dir.iterdir()) == []) if existing else not work_dir.exists()


# --- 14: under torchrun, a resume whose batch the ranks cannot share names rank counts that can ---------------------

def test_a_resume_over_ranks_that_cannot_share_its_batch_names_the_rank_counts_that_can(corpus, tmp_path, capsys,
                                                                                        monkeypatch):
    work_dir = tmp_path / "run"
    assert run_main(["train", "-i", corpus, "--max-steps", "4", "-b", "32", *FAST, "-o", work_dir], capsys)[0] == 0
    checkpoint = load_checkpoint(work_dir / "model.safetensors")
    checkpoint_bytes = (work_dir / "model.safetensors").read_bytes()
    for name, value in rank_env(0, 3, free_port()).items():    # rank 0 of 3, in this process
        monkeypatch.setenv(name, value)
    status, out, err = run_main(["train", "--resume", "--max-steps", "8", "-o", work_dir], capsys)
    assert status == 2 and out == ""
    one_error_line(err, "-b 32", "3 ranks", "keeps its batch", "1, 2, 4, 8, 16, 32 ranks")
    assert (work_dir / "model.safetensors").read_bytes() == checkpoint_bytes and checkpoint.step == 4
    status, _, err = run_main(["train", "-i", corpus, "-b", "32", "-o", tmp_path / "new"], capsys)
    assert status == 2                      # a new run can change -b, and is told so
    one_error_line(err, "use a multiple of 3")


# --- 11: bare handprop, and --version -------------------------------------------------------------------------------

def test_bare_handprop_lists_every_command_with_a_line_each(capsys):
    status, out, err = run_main([], capsys)
    assert status == 0 and err == ""
    for command in ("train", "sample", "eval", "check", "grade", "diagnose"):
        assert any(line.split()[:1] == [command] and len(line.split()) > 2 for line in out.splitlines()), command


def test_version(capsys):
    from handprop import __version__
    status, out, _ = run_main(["--version"], capsys)
    assert status == 0 and out == f"handprop {__version__}\n"


# --- 12: eval of a run in progress says which step, and that the run has not finished ----------------------------

def test_eval_of_an_unfinished_run_says_which_step_and_that_it_has_not_finished(corpus, tmp_path, capsys,
                                                                                 monkeypatch):
    real_update = SGD.update

    def update_then_interrupt(self, grads, lr):
        real_update(self, grads, lr)
        self.steps = getattr(self, "steps", 0) + 1
        if self.steps == 10:
            os.kill(os.getpid(), signal.SIGINT)     # as Ctrl-C: the loop saves after this step and stops

    monkeypatch.setattr(SGD, "update", update_then_interrupt)
    work_dir = tmp_path / "run"
    argv = ["train", "-i", corpus, "--max-steps", "30", "--n-hidden", "16", *FAST, "-o", work_dir]
    assert run_main(argv, capsys)[0] == 128 + signal.SIGINT
    monkeypatch.setattr(SGD, "update", real_update)
    status, out, _ = run_main(["eval", "-o", work_dir], capsys)
    lines = out.splitlines()
    assert status == 0 and len(lines) == 2 and lines[1].startswith("train loss ")
    assert "model.safetensors" in lines[0] and "at step 10 of 30" in lines[0] and "had not finished" in lines[0]
    assert run_main(["train", "--resume", "-o", work_dir], capsys)[0] == 0
    status, out, _ = run_main(["eval", "-o", work_dir], capsys)
    assert status == 0 and len(out.splitlines()) == 1 and out.startswith("train loss ")   # finished: the losses
    assert json.loads((work_dir / "config.json").read_text())["finished"]


# --- a new setting is one field: its flags, the commands that take them, whether a resume may change it ------------

def test_a_new_setting_is_one_field_and_every_command_it_names_takes_its_flag(monkeypatch):
    @dataclass(frozen=True)
    class WithThreads(TrainConfig):      # a setting like --threads, under another name
        workers: str = setting("auto", "workers of the tensor library", choices=("auto", "1", "2"),
                               flags=("--workers",), commands=("train", "eval", "sample", "check", "grade"),
                               resumable=True)

    monkeypatch.setattr(cli, "TrainConfig", WithThreads)       # as if TrainConfig had the field
    monkeypatch.setattr(cli, "recipe", lambda name: WithThreads(**asdict(recipe(name))))
    parser = cli.build_parser()
    for argv in (["train"], ["eval"], ["sample"], ["check"], ["grade", "mine.py"]):
        assert parser.parse_args([*argv, "--workers", "2"]).workers == "2"
        assert parser.parse_args(argv).workers is None         # not given: the field's default applies
    with pytest.raises(SystemExit):
        parser.parse_args(["diagnose", "--workers", "2"])
    assert cli.overrides(parser.parse_args(["train", "--workers", "1"]), "cpu").train_settings["workers"] == "1"
    assert "workers" not in cli.overrides(parser.parse_args(["train"]), "cpu").train_settings
