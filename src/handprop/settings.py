"""A run's settings, worked out once: the presets and recipes, and a new or resumed run's configuration.

A new run starts from a named model (PRESETS) and its training recipe (RECIPES), changed by the user's
overrides; a resumed run starts from its checkpoint, and the overrides may change only RESUME_MAY_CHANGE.
The corpus decides the rest (fit_to_corpus). Every override is checked against what the chosen model and
recipe use (USES), so a flag that would do nothing is refused instead of recorded and ignored.
"""

from dataclasses import dataclass, field, fields, replace

from .config import (
    SEQUENCE_KINDS,
    WINDOW_KINDS,
    ModelConfig,
    TrainConfig,
    changed_settings,
    flagged,
    format_number,
    preset_config,
    validate_model,
    validate_train,
)
from .data import check_sequence_length
from .errors import UserError

DEFAULT_MODEL = "mlp"

PRESETS = {
    "mlp": ModelConfig(),                                                   # lecture part 4, exercise 4
    "mlp-part3": ModelConfig(hidden_bias=False),                            # lecture part 3: 12097 params
    "deep": ModelConfig(n_hidden=100, n_layers=5, hidden_bias=False),       # part 3's deeper net
    "wavenet": ModelConfig(kind="wavenet", block_size=8, n_embd=24, n_hidden=128, n_layers=3,   # part 5
                           hidden_bias=False),
    # a good names model in seconds: wider, more context, no BatchNorm to recalibrate (RECIPES below)
    "mlp-fast": ModelConfig(block_size=8, n_embd=48, n_hidden=512, batchnorm=False, lookup_tables=True),
    # makemore's models, block_size 0 = as many positions as the longest item needs
    "bigram": ModelConfig(kind="bigram", block_size=0, batchnorm=False),
    "rnn": ModelConfig(kind="rnn", block_size=0, n_embd=64, n_hidden=64, batchnorm=False),
    "gru": ModelConfig(kind="gru", block_size=0, n_embd=64, n_hidden=256, batchnorm=False),    # 256: docs/results.md
    # dropout 0.3: over the recipe's 80000 steps it ends lower than 0.2 or 0.1 (docs/results.md, Tuning)
    "transformer": ModelConfig(kind="transformer", block_size=0, n_embd=64, n_layers=4, n_head=4, dropout=0.3,
                               batchnorm=False),
}


# the training recipe each model trains with unless flags say otherwise (the lectures' SGD when not listed)
RECIPES = {
    # probed on names.txt (README, Time to quality): lr 3e-3 to 1e-2, 3000 to 6000 steps, n_embd 16 to 64
    "mlp-fast": TrainConfig(max_steps=3000, batch_size=512, optimizer="adamw", lr=4e-3, schedule="cosine",
                            warmup=100, weight_decay=0.01, save_every=1000, log_every=500),
    "bigram": TrainConfig(max_steps=5000, optimizer="adamw", lr=0.1, schedule="cosine", save_every=1000,
                          log_every=1000),
    "rnn": TrainConfig(max_steps=20_000, optimizer="adamw", lr=1e-2, schedule="cosine", warmup=200,
                       weight_decay=0.01, grad_clip=1.0, save_every=2000, log_every=2000),
    # the rnn's recipe, but weight decay 0.2: the gru overfits, and with it a hidden state of 256 pays (docs/results.md)
    "gru": TrainConfig(max_steps=20_000, optimizer="adamw", lr=1e-2, schedule="cosine", warmup=200,
                       weight_decay=0.2, grad_clip=1.0, save_every=2000, log_every=2000),
    # the best of the recipes tried on names.txt (docs/results.md, Tuning the transformer): 80000 steps of 64 names
    # fit in 20 minutes on 2 cores since the step is compiled and packed; dropout is the model's, 0.3
    "transformer": TrainConfig(max_steps=80_000, batch_size=64, optimizer="adamw", lr=3e-3, schedule="cosine",
                               warmup=200, weight_decay=0.1, grad_clip=1.0, save_every=4000, log_every=4000),
}

# settings a resumed run may change (each field says so): how often it reports and saves, where it runs, how far it goes
RESUME_MAY_CHANGE = tuple(f.name for f in fields(TrainConfig) if f.metadata["resumable"])

# a recipe's warmup that would fill a run shorter than it is cut to this fraction of the run
SHORT_RUN_WARMUP = 0.1


def _kinds(*kinds):
    return lambda model, train: model.kind in kinds


def _with_batchnorm(model, train):
    return model.kind in WINDOW_KINDS and model.batchnorm


def _optimizer(name):
    return lambda model, train: train.optimizer == name


def _schedule(name):
    return lambda model, train: train.schedule == name


# the settings some runs ignore: setting -> (whether a run uses it, from its model and training configs; who uses
# it; what to do instead). A flag for a setting the run ignores is refused unless it gives the field's default.
USES = {
    "n_embd": (_kinds("mlp", "wavenet", "rnn", "gru", "transformer"), "every model but bigram", "leave it out"),
    "n_hidden": (_kinds("mlp", "wavenet", "rnn", "gru"), "mlp, wavenet, rnn and gru only",
                 "leave it out (the transformer's MLP is 4 x --n-embd wide)"),
    "n_layers": (_kinds("mlp", "wavenet", "transformer"), "mlp, wavenet and the transformer only", "leave it out"),
    "n_head": (_kinds("transformer"), "the transformer only", "leave it out"),
    "dropout": (_kinds("transformer"), "the transformer only", "leave it out"),
    "init": (_kinds(*WINDOW_KINDS), "mlp and wavenet only", "leave it out (the other models have one init each)"),
    "lookup_tables": (_kinds("mlp"), "mlp only", "leave it out"),
    "batchnorm": (_kinds(*WINDOW_KINDS), "mlp and wavenet only", "leave it out (this model has no BatchNorm)"),
    "bessel": (_with_batchnorm, "models with BatchNorm only", "leave it out (this model has no BatchNorm)"),
    "weight_decay": (_optimizer("adamw"), "adamw only", "add --optimizer adamw, or leave -w out"),
    "warmup": (_schedule("cosine"), "the cosine schedule only", "add --schedule cosine, or leave --warmup out"),
    "min_lr": (_schedule("cosine"), "the cosine schedule only", "add --schedule cosine, or leave --min-lr out"),
    "lr_decay_at": (_schedule("step"), "the step schedule only", "add --schedule step, or leave --lr-decay-at out"),
    "dtype": (_kinds("transformer"), "the transformer only", "leave it out (the other models' matrix products are "
              "too small for bf16 to gain, or not all in Linear layers)"),
}

# the switches that set a model setting, where no flag of its own does
SWITCHES = {"batchnorm": "--no-batchnorm", "bessel": "--bn-variance"}


def flag(name):
    """The flag that sets a config field: '--n-embd' for n_embd, '-w' for weight_decay."""
    flags = flagged(ModelConfig) | flagged(TrainConfig)
    return flags[name][0] if name in flags else SWITCHES.get(name, "--" + name.replace("_", "-"))


@dataclass(frozen=True)
class Overrides:
    """What the user asked for; a setting left out keeps the preset's, the recipe's or the saved run's value."""

    model: str | None = None                        # a PRESETS name, or None: the default (new) or the saved (resume)
    model_settings: dict = field(default_factory=dict)  # ModelConfig fields
    train_settings: dict = field(default_factory=dict)  # TrainConfig fields
    diagnostics: bool = False                       # record statistics (every max_steps / 100 unless told)


@dataclass(frozen=True)
class Settings:
    """A run's configuration, resolved: what to build and how to train it, and what the log should say about it."""

    model_config: ModelConfig
    train_config: TrainConfig
    notes: tuple = ()       # lines for the log: a recipe's value changed to fit the run, and why


def preset(name, **overrides):
    """A named config with some fields replaced (None means keep the preset's value)."""
    if name not in PRESETS:
        raise UserError(f"unknown model {name!r} (choose from {', '.join(PRESETS)})")
    return validate_model(preset_config(PRESETS[name], **overrides))


def recipe(name):
    """The TrainConfig a named model trains with by default."""
    return RECIPES.get(name, TrainConfig())


def check_used(overrides, model_config, train_config, model_name):
    """Refuse a setting the user gave that this run would ignore: one line saying who uses it, and what to do."""
    given = overrides.model_settings | overrides.train_settings
    defaults = {f.name: f.default for cls in (ModelConfig, TrainConfig) for f in fields(cls)}
    for name, (used, users, instead) in USES.items():
        if name in given and given[name] != defaults[name] and not used(model_config, train_config):
            run = f"{model_name}, {train_config.optimizer}, {train_config.schedule} schedule"
            raise UserError(f"{flag(name)} is for {users}; this run ({run}) would ignore it: {instead}")


def recording(overrides, max_steps):
    """The TrainConfig fields that --diagnostics, --diagnostics-every and --tensorboard set; none given: none."""
    train = overrides.train_settings
    if not (overrides.diagnostics or train.get("tensorboard") or train.get("diagnostics_every")):
        return {}                           # a resumed run goes on recording as it did
    return {"diagnostics_every": train.get("diagnostics_every") or max(1, max_steps // 100),
            "tensorboard": bool(train.get("tensorboard"))}


def fit_warmup(config, overrides, name):
    """A recipe's warmup as long as a shorter run would leave nothing to decay over: cut it, and say so."""
    if "warmup" in overrides.train_settings or config.schedule != "cosine" or config.warmup < config.max_steps:
        return config, ()
    warmup = int(config.max_steps * SHORT_RUN_WARMUP)
    instead = f"warming up for {warmup} instead" if warmup else "not warming up"
    note = (f"{name}'s recipe warms up for {config.warmup} steps, as long as this {config.max_steps}-step run: "
            f"{instead} (choose with --warmup N)")
    return replace(config, warmup=warmup), (note,)


def check_recipe_values(config, overrides, name):
    """A recipe's value that the user's flags made wrong: say it is the recipe's, and how to change it."""
    if config.weight_decay and config.optimizer != "adamw" and "weight_decay" not in overrides.train_settings:
        raise UserError(f"{name}'s recipe decays weights by {format_number(config.weight_decay)}, which only adamw "
                        f"does; with --optimizer {config.optimizer} add -w 0")


def new_settings(overrides):
    """A new run's settings: the preset and its recipe, changed by the overrides and checked."""
    name = overrides.model or DEFAULT_MODEL
    model_config = preset(name, **overrides.model_settings)
    config = replace(recipe(name), **overrides.train_settings)
    config = replace(config, **recording(overrides, config.max_steps))
    check_used(overrides, model_config, config, name)
    check_recipe_values(config, overrides, name)
    config, notes = fit_warmup(config, overrides, name)
    return Settings(model_config, validate_train(config, model_config), notes)


def resumed_settings(overrides, checkpoint, work_dir):
    """A resumed run's settings: the saved ones; overrides may repeat them, and change only RESUME_MAY_CHANGE."""
    saved_model, saved = checkpoint.spec.model_config, checkpoint.spec.train_config
    if overrides.model:
        requested_model = preset(overrides.model, **overrides.model_settings)
    else:
        requested_model = preset_config(saved_model, **overrides.model_settings)
    if requested_model.block_size == 0:     # a sequence model's positions, set from the corpus when the run began
        requested_model = replace(requested_model, block_size=saved_model.block_size)
    config = replace(saved, **overrides.train_settings)
    config = replace(config, **recording(overrides, config.max_steps))
    differing = changed_settings(saved_model, requested_model, allowed=("vocab_size",))
    differing += changed_settings(saved, config, allowed=RESUME_MAY_CHANGE)
    if differing:
        raise UserError(f"--resume continues the saved run, but these settings differ from it: {', '.join(differing)}"
                        f" (only {', '.join(RESUME_MAY_CHANGE)} may change)")
    if config.max_steps < checkpoint.step:
        raise UserError(f"the run in {work_dir} is at step {checkpoint.step} already; --max-steps "
                        f"{config.max_steps} would end it before that")
    return Settings(saved_model, validate_train(config, saved_model))


def fit_to_corpus(model_config, corpus, vocab):
    """The settings the corpus decides: the vocabulary's size, and a sequence model's positions (0: the longest
    item + 1, its characters and the boundary), which must hold the longest item."""
    model_config = replace(model_config, vocab_size=vocab.size)
    if model_config.kind not in SEQUENCE_KINDS:
        return model_config
    longest = max(len(item) for item in corpus.items)
    if model_config.block_size == 0:
        return replace(model_config, block_size=longest + 1)
    check_sequence_length(longest, model_config.block_size)
    return model_config


def check_ranks(config, ranks, resumed):
    """The global batch must split evenly over the ranks; a resumed run cannot change -b, so it names rank counts
    that would work."""
    if not resumed or config.batch_size % ranks == 0:
        return
    divisors = [n for n in range(1, min(config.batch_size, 64) + 1) if config.batch_size % n == 0]
    raise UserError(f"the saved run's batch (-b {config.batch_size}) does not split evenly over {ranks} ranks, and "
                    f"a resumed run keeps its batch: launch it with {', '.join(map(str, divisors))} ranks "
                    "(torchrun --nproc-per-node N)")
