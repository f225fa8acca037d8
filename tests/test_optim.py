"""The hand-applied optimisers, schedules and clipping against their torch.optim references (float64)."""

import math

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, MultiStepLR, SequentialLR

from handprop.errors import UserError
from handprop.optim import (
    SGD,
    AdamW,
    clip_grad_norm,
    decayed_names,
    lecture_lr,
    make_optimizer,
    make_schedule,
    warmup_cosine_lr,
)

# a model's parameters as handprop names them: an embedding table, Linear weights and biases, BatchNorm gain and shift
SHAPES = {"0.weight": (27, 10), "2.weight": (30, 64), "2.bias": (64,), "3.gain": (64,), "3.bias": (64,),
          "5.weight": (64, 27), "5.bias": (27,)}
MATRICES = {"0.weight", "2.weight", "5.weight"}
DECAYED = {"matrices": MATRICES, "all": set(SHAPES)}    # make_optimizer's rule; every parameter (AdamW's own default)


def random_params(seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}


def random_grads(g):
    return {k: torch.randn(s, generator=g, dtype=torch.float64) * 0.1 for k, s in SHAPES.items()}


def relative_diff(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def torch_adamw(params, names_decayed, weight_decay):
    """torch.optim.AdamW over leaf copies of params, with a decayed and an undecayed parameter group."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    groups = [{"params": [leaves[k] for k in leaves if k in names_decayed], "weight_decay": weight_decay},
              {"params": [leaves[k] for k in leaves if k not in names_decayed], "weight_decay": 0.0}]
    return leaves, torch.optim.AdamW([g for g in groups if g["params"]], lr=0.0, betas=(0.9, 0.99), eps=1e-8)


def torch_step(leaves, reference, grads, lr):
    for k, p in leaves.items():
        p.grad = grads[k].clone()
    for group in reference.param_groups:
        group["lr"] = lr
    reference.step()


def test_weight_decay_picks_the_matrices():
    params = random_params(0)
    assert decayed_names(params) == MATRICES
    decayed = make_optimizer("adamw", params, weight_decay=0.1).decayed     # the very tensors it shrinks
    assert [id(t) for t in decayed] == [id(p) for k, p in params.items() if k in MATRICES]


def adamw(params, rule):
    """make_optimizer's AdamW (rule 'matrices'), or one decaying every parameter ('all')."""
    if rule == "matrices":
        return make_optimizer("adamw", params, weight_decay=0.1)
    return AdamW(params, weight_decay=0.1)


@pytest.mark.parametrize("rule", DECAYED)
def test_adamw_equals_torch_adamw_with_two_param_groups_across_a_state_dict_round_trip(rule):
    params = random_params(1)
    names = DECAYED[rule]
    leaves, reference = torch_adamw(params, names, weight_decay=0.1)
    optimizer = adamw(params, rule)
    g = torch.Generator().manual_seed(2)
    schedule = make_schedule("cosine", max_steps=8, lr=0.02, warmup=2, min_lr=0.002)
    worst = 0.0
    for step in range(8):
        if step == 4:                   # what a checkpoint keeps, loaded into fresh optimisers on fresh tensors
            tensors, numbers = optimizer.state_dict()
            params = {k: v.clone() for k, v in params.items()}
            optimizer = adamw(params, rule)
            optimizer.load_state_dict({k: v.clone() for k, v in tensors.items()}, dict(numbers))
            saved = reference.state_dict()
            leaves, reference = torch_adamw(params, names, weight_decay=0.1)
            reference.load_state_dict(saved)
        grads = random_grads(g)
        torch_step(leaves, reference, grads, schedule(step))
        optimizer.step(grads, schedule(step))
        for k, p in params.items():
            state = reference.state[leaves[k]]
            for mine, theirs in ((p, leaves[k].detach()), (optimizer.m[k], state["exp_avg"]),
                                 (optimizer.v[k], state["exp_avg_sq"])):
                worst = max(worst, relative_diff(mine, theirs))
    assert optimizer.t == 8 == int(reference.state[leaves["2.bias"]]["step"])
    assert worst <= 1e-12


def test_matrices_only_decay_leaves_biases_and_norm_parameters_undecayed():
    # with zero gradients Adam's own update is 0, so what moves is the decay alone
    params = random_params(3)
    before = {k: v.clone() for k, v in params.items()}
    optimizer = make_optimizer("adamw", params, weight_decay=0.5)
    optimizer.step({k: torch.zeros_like(v) for k, v in params.items()}, lr=0.1)
    for k in SHAPES:
        assert torch.equal(params[k], before[k] * 0.95 if k in MATRICES else before[k]), k


def textbook_adamw_step(params, grads, m, v, t, lr, weight_decay, betas=(0.9, 0.99), eps=1e-8):
    """torch.optim.AdamW's single-tensor update, one parameter at a time, operation by operation."""
    b1, b2 = betas
    for k, p in params.items():
        m[k].lerp_(grads[k], 1 - b1)
        v[k].mul_(b2).addcmul_(grads[k], grads[k], value=1 - b2)
        denom = (v[k].sqrt() / math.sqrt(1 - b2**t)).add_(eps)
        p.mul_(1 - lr * weight_decay)
        p.sub_(m[k] / denom * (lr / (1 - b1**t)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adamw_on_flat_buffers_is_bit_identical_to_the_per_parameter_update(dtype):
    params = {k: v.to(dtype) for k, v in random_params(4).items()}
    mine = {k: v.clone() for k, v in params.items()}
    m, v = {k: torch.zeros_like(p) for k, p in params.items()}, {k: torch.zeros_like(p) for k, p in params.items()}
    optimizer = AdamW(mine, weight_decay=0.1)
    g = torch.Generator().manual_seed(5)
    for t in range(1, 6):
        grads = {k: x.to(dtype) for k, x in random_grads(g).items()}
        textbook_adamw_step(params, grads, m, v, t, 0.01 * t, 0.1)
        optimizer.step(grads, 0.01 * t)
    for k in params:
        assert torch.equal(mine[k], params[k]), k
        assert torch.equal(optimizer.m[k], m[k]) and torch.equal(optimizer.v[k], v[k]), k


def test_state_dict_formats_that_checkpoints_hold():
    params = random_params(6)
    assert SGD(params).state_dict() == ({}, {})
    optimizer = AdamW(params)
    optimizer.step(random_grads(torch.Generator().manual_seed(7)), 0.01)
    tensors, numbers = optimizer.state_dict()
    assert set(tensors) == {f"{moment}.{k}" for moment in "mv" for k in SHAPES} and numbers == {"t": 1}
    assert tensors["m.2.bias"] is optimizer.m["2.bias"] and tensors["v.0.weight"] is optimizer.v["0.weight"]


def test_sgd_step_is_p_minus_lr_times_grad():
    params = random_params(8)
    before = {k: v.clone() for k, v in params.items()}
    grads = random_grads(torch.Generator().manual_seed(9))
    make_optimizer("sgd", params).step(grads, 0.1)
    for k in SHAPES:
        assert relative_diff(params[k], before[k] - 0.1 * grads[k]) <= 1e-15, k


@pytest.mark.parametrize("name", ["adam", "SGD"])
def test_make_optimizer_refuses_what_it_cannot_do(name):
    with pytest.raises(UserError, match=rf"unknown optimizer '{name}' \(choose sgd or adamw\)"):
        make_optimizer(name, random_params(0))


@pytest.mark.parametrize("max_steps, decay_at",
                         [(1, 0.5), (2, 0.5), (3, 0.5), (7, 0.3), (10, 0.0), (10, 1.0), (1000, 0.75)])
def test_lecture_lr_against_multistep_lr_and_the_first_step_is_never_decayed(max_steps, decay_at):
    p = torch.zeros(1, requires_grad=True)
    reference = torch.optim.SGD([p], lr=0.1)
    scheduler = MultiStepLR(reference, milestones=[max(1, int(decay_at * max_steps))], gamma=0.1)
    for step in range(max_steps):
        assert lecture_lr(step, max_steps, 0.1, decay_at) == pytest.approx(reference.param_groups[0]["lr"], rel=1e-15)
        reference.step()
        scheduler.step()
    assert lecture_lr(0, max_steps, 0.1, decay_at) == 0.1
    last = max_steps - 1
    assert make_schedule("step", max_steps, 0.1, decay_at)(last) == lecture_lr(last, max_steps, 0.1, decay_at)


def test_the_lectures_schedule_is_unchanged():
    assert [lecture_lr(s, 200_000, 0.1) for s in (0, 99_999, 100_000, 199_999)] == [0.1, 0.1, 0.01, 0.01]


@pytest.mark.parametrize("max_steps, warmup, min_lr", [(50, 10, 1e-4), (20, 0, 0.0), (7, 6, 0.01), (100, 1, 0.003)])
def test_warmup_cosine_against_torch_schedulers_at_every_step(max_steps, warmup, min_lr):
    lr = 0.05
    p = torch.zeros(1, requires_grad=True)
    reference = torch.optim.SGD([p], lr=lr)
    cosine = CosineAnnealingLR(reference, T_max=max_steps - warmup, eta_min=min_lr)
    if warmup:
        warm = LinearLR(reference, start_factor=1 / (warmup + 1), end_factor=1.0, total_iters=warmup)
        scheduler = SequentialLR(reference, [warm, cosine], milestones=[warmup])
    else:
        scheduler = cosine
    schedule = make_schedule("cosine", max_steps, lr, warmup=warmup, min_lr=min_lr)
    worst = 0.0
    for step in range(max_steps + 1):
        expected = reference.param_groups[0]["lr"]
        assert schedule(step) == warmup_cosine_lr(step, max_steps, lr, warmup, min_lr)
        worst = max(worst, abs(schedule(step) - expected) / lr)
        reference.step()
        scheduler.step()
    assert worst <= 1e-12
    assert schedule(0) > 0 and schedule(warmup) == lr and schedule(max_steps) == min_lr == schedule(max_steps + 5)


@pytest.mark.parametrize("name, kwargs, message", [
    ("linear", {}, r"unknown learning-rate schedule 'linear' \(choose step or cosine\)"),
    ("cosine", {"warmup": 10}, "10 warmup steps of 10"),
    ("cosine", {"warmup": -1}, "-1 warmup steps of 10"),
    ("cosine", {"min_lr": 0.5}, "between 0 and the learning rate 0.1, got 0.5"),
])
def test_make_schedule_refuses_bad_settings(name, kwargs, message):
    with pytest.raises(UserError, match=message):
        make_schedule(name, 10, 0.1, **kwargs)


@pytest.mark.parametrize("max_norm", [0.5, 1e3])   # well below and well above the total norm (about 2.3)
def test_clip_grad_norm_equals_torch_clip_grad_norm(max_norm):
    grads = random_grads(torch.Generator().manual_seed(10))
    leaves = {k: torch.zeros_like(v, requires_grad=True) for k, v in grads.items()}
    for k, p in leaves.items():
        p.grad = grads[k].clone()
    before = {k: v.clone() for k, v in grads.items()}
    expected = torch.nn.utils.clip_grad_norm_(leaves.values(), max_norm)
    total = clip_grad_norm(grads, max_norm)
    assert isinstance(total, torch.Tensor) and total.ndim == 0       # stays on the device: no host sync
    assert relative_diff(total, expected) <= 1e-12
    assert math.isclose(total.item(), math.sqrt(sum((g**2).sum().item() for g in before.values())), rel_tol=1e-12)
    for k in grads:
        assert relative_diff(grads[k], leaves[k].grad) <= 1e-12, k
    if max_norm > total:
        assert all(torch.equal(grads[k], before[k]) for k in grads)    # under the limit nothing changes at all
    else:
        clipped = math.sqrt(sum((g**2).sum().item() for g in grads.values()))
        assert math.isclose(clipped, max_norm, rel_tol=1e-5)           # 1e-6 in the denominator: just under max_norm
