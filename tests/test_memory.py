"""A model too large for memory is one error line with the estimate, before anything is allocated (issue 18, 7)."""

import pytest
import torch
from cli_runner import run_main

from handprop import memory
from handprop.config import TrainConfig
from handprop.models import build_model, count_parameters
from handprop.settings import PRESETS, preset

VARIANTS = {                # beyond the presets: each switch that changes what a model holds
    "mlp lookup tables": ("mlp", {"lookup_tables": True}),
    "mlp three layers, no BatchNorm": ("mlp", {"n_layers": 3, "batchnorm": False}),
    "wavenet 16": ("wavenet", {"block_size": 16, "n_layers": 4}),
    "transformer 2 blocks": ("transformer", {"n_layers": 2, "n_embd": 32, "block_size": 20}),
    "gru wide": ("gru", {"n_embd": 12, "n_hidden": 40}),
}


@pytest.mark.parametrize("name, overrides", [(n, {}) for n in PRESETS] + list(VARIANTS.values()),
                         ids=list(PRESETS) + list(VARIANTS))
def test_the_parameter_count_from_the_config_is_the_built_models(name, overrides):
    config = preset(name, **({"block_size": 16} if not PRESETS[name].block_size else {}) | overrides, vocab_size=29)
    assert memory.parameter_count(config) == count_parameters(build_model(config, torch.Generator().manual_seed(0)))


def test_adamw_and_the_batch_add_to_the_estimate():
    config = preset("mlp", vocab_size=27)
    sgd, adamw = (memory.footprint(config, TrainConfig(optimizer=name)) for name in ("sgd", "adamw"))
    assert adamw.state_bytes == 3 * sgd.state_bytes == 3 * 2 * 4 * count_parameters(build_model(config))
    assert memory.footprint(config, TrainConfig(batch_size=64)).activation_bytes == 2 * sgd.activation_bytes > 0


def test_a_model_too_large_for_memory_is_one_error_line_with_the_estimate(tmp_path, capsys, monkeypatch):
    # the model: every setting in its range, 68.7 billion parameters in its first Linear
    monkeypatch.setattr(memory, "available_memory", lambda device: 16 * 10**9)   # the same on any machine
    argv = ["train", "--block-size", "1024", "--n-embd", "4096", "--n-hidden", "16384", "-o", tmp_path / "out"]
    status, out, err = run_main(argv, capsys)
    assert status == 2 and out == "" and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("handprop: error: this run needs about 550") and "68,720,078,875 parameters" in err, err
    assert "16.0 GB is available on cpu" in err and "--n-hidden" in err
    assert not (tmp_path / "out").exists()


def test_the_default_run_fits_where_it_always_did(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device: 10**9)
    status, _, err = run_main(["train", "--max-steps", "2", "-o", tmp_path / "out"], capsys)
    assert status == 0, err
    assert memory.available_memory("cpu") is None or memory.available_memory("cpu") > 0


def test_a_containers_memory_limit_counts(tmp_path, monkeypatch):
    (tmp_path / "memory.max").write_text("8000000000\n")
    (tmp_path / "memory.current").write_text("3000000000\n")
    assert memory.cgroup_room(tmp_path) == 5 * 10**9
    monkeypatch.setattr(memory, "CGROUP", tmp_path)
    assert memory.available_memory("cpu") <= 5 * 10**9
    (tmp_path / "memory.max").write_text("max\n")
    assert memory.cgroup_room(tmp_path) is None and memory.cgroup_room(tmp_path / "absent") is None
