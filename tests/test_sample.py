"""Sampling at scale: chunks streamed as they finish, --temperature, --top-k, the folded mlp forward, the KV cache."""

import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from cli_runner import run_main

from handprop.checkpoint import load_checkpoint
from handprop.data import Vocab
from handprop.layers import eval_mode
from handprop.models import build_model
from handprop.sample import CHUNK, Sampling, decode_lines, draw, mlp_logits, sample_length, stream_samples
from handprop.settings import preset

PRECISIONS = [(torch.float64, 1e-12), (torch.float32, 1e-5)]   # largest difference, relative to the largest logit


@pytest.fixture(scope="module")
def checkpoint(trained_dir):
    return load_checkpoint(trained_dir / "model.safetensors")


def test_chunks_hold_every_sample_once_and_every_line_decodes(checkpoint):
    spec = checkpoint.spec
    chunks = list(stream_samples(checkpoint.model, spec, 25, torch.Generator().manual_seed(1), chunk=10))
    lines = [chunk.split("\n")[:-1] for chunk in chunks]
    assert [len(chunk) for chunk in lines] == [10, 10, 5] and all(chunk.endswith("\n") for chunk in chunks)
    samples = [line for chunk in lines for line in chunk]
    assert set("".join(samples)) <= set(spec.vocab.chars) and len(set(samples)) > 15
    assert all(len(line) <= sample_length(spec, None, "") for line in samples)
    again = "".join(stream_samples(checkpoint.model, spec, 25, torch.Generator().manual_seed(1), chunk=10))
    assert again == "".join(chunks)         # the same command twice: the same samples


def test_the_first_chunk_is_yielded_before_the_next_is_drawn(checkpoint):
    generator = torch.Generator().manual_seed(2)
    stream = stream_samples(checkpoint.model, checkpoint.spec, 30, generator, chunk=10)
    first = next(stream)
    after_first = generator.get_state()
    alone = torch.Generator().manual_seed(2)
    assert "".join(stream_samples(checkpoint.model, checkpoint.spec, 10, alone, chunk=10)) == first
    assert torch.equal(after_first, alone.get_state())      # nothing of the second chunk was drawn yet
    rest = list(stream)
    assert len(rest) == 2 and not torch.equal(generator.get_state(), after_first)


def test_the_command_writes_its_first_chunk_while_it_still_draws_the_rest(trained_dir, tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "handprop", "sample", "-n", "1000000", "-o", str(trained_dir)],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        first = [process.stdout.readline() for _ in range(CHUNK)]
        assert all(line.endswith("\n") for line in first)
        assert process.poll() is None       # a million samples are far from done: the chunk came out early
    finally:
        process.kill()
        process.wait()


def test_decoding_keeps_the_prefix_and_characters_outside_ascii():
    vocab = Vocab(("a", "é", "日"))
    sampled = torch.tensor([[1, 2, 3, 0], [3, 0, 0, 0], [0, 0, 0, 0]])     # 0 after each end
    assert decode_lines(vocab, "é", sampled) == "éaé日\né日\né\n"


def logits_with_a_clear_winner(rows, vocab_size, seed):
    """Random logits (rows, V) whose largest stands at least 1 above the rest."""
    logits = torch.randn(rows, vocab_size, generator=torch.Generator().manual_seed(seed))
    return logits.scatter_add(1, logits.argmax(1, keepdim=True), torch.ones(rows, 1))


def test_top_k_one_is_greedy_and_a_very_low_temperature_is_too():
    logits = logits_with_a_clear_winner(2000, 27, 3)
    for seed in (0, 1):
        generator = torch.Generator().manual_seed(seed)
        assert torch.equal(draw(logits, generator, Sampling(top_k=1)), logits.argmax(1))
        assert torch.equal(draw(logits, generator, Sampling(temperature=0.01)), logits.argmax(1))   # exp(-100)
    assert not torch.equal(draw(logits, torch.Generator().manual_seed(0), Sampling()), logits.argmax(1))


def test_top_k_draws_only_among_the_k_largest_and_from_all_of_them():
    logits = torch.randn(1, 27, generator=torch.Generator().manual_seed(4)).expand(20000, 27)
    drawn = draw(logits, torch.Generator().manual_seed(5), Sampling(top_k=5))
    assert set(drawn.tolist()) == set(torch.topk(logits[0], 5).indices.tolist())


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=0.5), Sampling(temperature=2.0),
                                      Sampling(temperature=0.7, top_k=6)], ids=["plain", "T 0.5", "T 2", "T 0.7 k 6"])
def test_draws_follow_the_tempered_softmax(sampling):
    logits = torch.randn(1, 27, generator=torch.Generator().manual_seed(6)).expand(200_000, 27) * 2
    drawn = draw(logits, torch.Generator().manual_seed(7), sampling)
    expected = torch.softmax(logits[0] / sampling.temperature, dim=0)
    if sampling.top_k:
        expected = torch.zeros(27).scatter(0, *reversed(torch.topk(expected, sampling.top_k)))
        expected /= expected.sum()
    frequencies = torch.bincount(drawn, minlength=27) / drawn.numel()
    assert (frequencies - expected).abs().max() < 0.005        # about 4 standard errors at p = 0.5



@pytest.mark.parametrize("flags, words", [
    (["--temperature", "0"], "--temperature"), (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"), (["--temperature", "hot"], "--temperature"),
    (["--top-k", "0"], "--top-k"), (["--top-k", "1.5"], "--top-k"), (["--top-k", "28"], "27 tokens"),
], ids=["T 0", "T -1", "T nan", "T word", "k 0", "k 1.5", "k above the vocabulary"])
def test_a_bad_sampling_flag_is_one_error_line_and_exit_2(flags, words, trained_dir, capsys):
    status, out, err = run_main(["sample", "-o", str(trained_dir), *flags], capsys)
    assert status == 2 and out == "" and err.startswith("handprop: error: ") and len(err.splitlines()) == 1, err
    assert words in err, err


def test_the_sample_command_takes_temperature_and_top_k(trained_dir, capsys):
    status, out, _ = run_main(["sample", "-o", str(trained_dir), "-n", "30", "--seed", "3", "--top-k", "1"], capsys)
    assert status == 0 and len(set(out.splitlines())) == 1     # greedy: one name, thirty times
    status, out, _ = run_main(["sample", "-o", str(trained_dir), "-n", "30", "--seed", "3", "--temperature", "2"],
                              capsys)
    assert status == 0 and len(out.splitlines()) == 30 and len(set(out.splitlines())) > 20


@pytest.mark.parametrize("name, overrides", [("mlp", {}), ("mlp-part3", {}), ("deep", {}),
                                             ("mlp", {"batchnorm": False}), ("mlp", {"block_size": 1})],
                         ids=["mlp", "no hidden bias", "deep", "no batchnorm", "block size 1"])
@pytest.mark.parametrize("dtype, tolerance", PRECISIONS, ids=["float64", "float32"])
def test_the_folded_mlp_equals_the_layers_forward(name, overrides, dtype, tolerance):
    generator = torch.Generator().manual_seed(8)
    model = build_model(preset(name, **overrides), generator, dtype=dtype)
    for layer in model.layers:              # running statistics far from 0 and 1, so a wrong fold cannot hide
        if hasattr(layer, "running_mean"):
            layer.running_mean.copy_(torch.randn(layer.running_mean.shape, generator=generator, dtype=dtype))
            layer.running_var.copy_(torch.rand(layer.running_var.shape, generator=generator, dtype=dtype) + 0.5)
    X = torch.randint(0, 27, (500, preset(name, **overrides).block_size), generator=generator)
    with eval_mode(model):
        expected = model.forward(X).reshape(500, 27)
    assert (mlp_logits(model)(X) - expected).abs().max() <= tolerance * expected.abs().max()


def test_wavenet_is_not_folded():
    assert mlp_logits(build_model(preset("wavenet"), torch.Generator().manual_seed(9))) is None


@pytest.mark.parametrize("dtype, tolerance", PRECISIONS, ids=["float64", "float32"])
def test_the_key_value_cache_gives_the_recomputed_logits_past_its_first_room(dtype, tolerance):
    config = replace(preset("transformer", n_embd=32, n_layers=2, n_head=4, dropout=0.0), block_size=40)
    generator = torch.Generator().manual_seed(10)
    model = build_model(config, generator, dtype=dtype)
    for p in model.parameters().values():   # far from GPT-2's small init, so attention is far from uniform
        p += torch.randn(p.shape, generator=generator, dtype=dtype) * 0.3
    X = torch.randint(0, 27, (8, 40), generator=torch.Generator().manual_seed(11))  # 40 positions: the cache grows
    with eval_mode(model):
        full = model.forward(X)                                             # (B, T, V)
        cache = model.new_cache()
        stepped = torch.cat([model.step(X[:, t : t + 1], cache) for t in range(40)], dim=1)   # (B, T, V)
    assert (stepped - full).abs().max() <= tolerance * full.abs().max()
