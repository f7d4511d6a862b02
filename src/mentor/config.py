"""Run configuration: YAML in, validated typed objects out, with ``key=value`` command-line overrides.

A wrong key, type or value fails in :func:`load_config` before any work starts, with a message that names the key,
the value and what was expected. The resolved configuration is saved in the run directory (``config.yaml``), so a
run can be repeated with ``mentor train RUN_DIR/config.yaml``.

Example::

    name: mnist1d_kd
    seed: 0
    data: {name: mnist1d, train: labelled, num_labelled: 4000}
    student: {model: mlp}
    teacher: {run: runs/teacher}          # or {checkpoint: t.safetensors, model: cnn}
    recipe: {name: hinton_kd, args: {temperature: 4.0, alpha: 0.9}}
    optim: {name: adamw, lr: 0.001, schedule: cosine}
    train: {epochs: 20, batch_size: 128}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = ["ConfigError", "RunConfig", "DataConfig", "ModelConfig", "TeacherConfig", "RecipeConfig",
           "ExtraRecipeConfig", "CacheConfig", "build_method", "OptimConfig", "TrainConfig", "load_config",
           "parse_overrides", "config_from_dict"]


class ConfigError(ValueError):
    """A configuration problem, with the key, the value and what was expected."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, validate_assignment=True)


class DataConfig(_Strict):
    """Which data the student trains and is evaluated on.

    ``name: mnist1d`` is built in. ``train`` picks the training set: ``labelled`` (the first ``num_labelled`` of the
    4000 standard training items), ``transfer`` (``transfer_size`` generated unlabelled items with ``transfer_seed``)
    or ``both`` (labelled items plus the unlabelled transfer set). Evaluation uses the 1000-item test split.

    ``semi`` is semi-supervised training (FixMatch style, see :mod:`mentor.semi`): a labelled subset of
    ``num_labelled`` items *stratified by class* (``num_labelled / 10`` per class, drawn with ``split_seed``) and an
    unlabelled pool drawn separately, ``mu`` pool items per labelled item in every batch (``mu`` defaults to 7).
    ``unlabelled`` picks the pool: ``rest`` (the other training items, labels removed) or ``transfer``
    (``transfer_size`` generated items with ``transfer_seed``).

    Language models (:mod:`mentor.lm.loop`; the ``lm`` extra): ``lm_arithmetic`` (``"12+7="`` -> ``"19"``) and
    ``lm_reversal`` (``"reverse abc:"`` -> ``"cba"``) are built-in prompt/answer tasks of ``num_train`` training and
    ``num_test`` held-out prompts drawn with ``task_seed`` (``max_operand``, ``ops``: the arithmetic's operands and
    operators); ``lm_stdlib`` is the standard library's docstrings packed into blocks of ``block_size`` tokens
    (``num_train`` / ``num_test`` blocks at most, all by default). All use the built-in byte-level BPE tokenizer of
    ``vocab_size`` tokens; ``max_new_tokens`` is the longest answer generated in evaluation (exact match).
    """

    name: Literal["mnist1d", "lm_arithmetic", "lm_reversal", "lm_stdlib"] = "mnist1d"
    train: Literal["labelled", "transfer", "both", "semi"] = "labelled"
    num_labelled: int = Field(4000, ge=1, le=4000)
    transfer_size: int = Field(50000, ge=1)
    transfer_seed: int = Field(0, ge=0)
    unlabelled: Literal["rest", "transfer"] = "rest"
    mu: int | None = Field(None, ge=1)
    split_seed: int = Field(0, ge=0)
    num_train: int | None = Field(None, ge=1)
    num_test: int | None = Field(None, ge=1)
    task_seed: int | None = Field(None, ge=0)
    max_operand: int | None = Field(None, ge=0)
    ops: str | None = None
    vocab_size: int | None = Field(None, ge=260)
    block_size: int | None = Field(None, ge=2)
    max_new_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _semi(self) -> DataConfig:
        lm_keys = ("num_train", "num_test", "task_seed", "max_operand", "ops", "vocab_size", "block_size",
                   "max_new_tokens")
        if self.name == "mnist1d":
            given = [k for k in lm_keys if getattr(self, k) is not None]
            if given:
                raise ValueError(f"data.{given[0]} = {getattr(self, given[0])!r} applies to the language-model data "
                                 "(data.name lm_arithmetic, lm_reversal or lm_stdlib), not to data.name = 'mnist1d'")
        else:
            if self.train != "labelled":
                raise ValueError(f"data.train = {self.train!r} applies to mnist1d; language-model data "
                                 f"(data.name = {self.name!r}) trains on its own training split: leave data.train out")
            if self.ops is not None and (not self.ops or set(self.ops) - set("+-*")):
                raise ValueError(f"data.ops = {self.ops!r}: expected a non-empty subset of '+-*'")
            if self.name != "lm_arithmetic":
                for key in ("max_operand", "ops"):
                    if getattr(self, key) is not None:
                        raise ValueError(f"data.{key} applies to data.name = 'lm_arithmetic', not {self.name!r}")
            if self.name != "lm_stdlib" and self.block_size is not None:
                raise ValueError(f"data.block_size applies to data.name = 'lm_stdlib', not {self.name!r}")
            if self.name == "lm_stdlib" and (self.task_seed is not None or self.max_new_tokens is not None):
                raise ValueError("data.task_seed and data.max_new_tokens apply to the prompt tasks "
                                 "(lm_arithmetic, lm_reversal), not to data.name = 'lm_stdlib'")
        if self.train != "semi":
            if self.mu is not None:
                raise ValueError(f"data.mu = {self.mu} applies to data.train = 'semi' (labelled items plus an "
                                 f"unlabelled pool), not to data.train = {self.train!r}")
            return self
        if self.num_labelled % 10:
            raise ValueError(f"data.num_labelled = {self.num_labelled}: with data.train = 'semi' the labelled subset "
                             "is stratified by class, so expected a multiple of the 10 MNIST-1D classes (e.g. 400)")
        if self.num_labelled > 3940:
            raise ValueError(f"data.num_labelled = {self.num_labelled} needs {self.num_labelled // 10} items of every "
                             "class, but the smallest MNIST-1D class has 394 training items: expected at most 3940")
        if self.mu is None:
            self.mu = 7
        return self


class ModelConfig(_Strict):
    """A model by built-in short name (``mlp``, ``cnn``, ``gru``) or dotted import path, with keyword arguments.

    ``quantize_bits`` (students only): train with ``k``-bit fake-quantized weights (see :mod:`mentor.quant`).
    """

    model: str
    args: dict[str, Any] = Field(default_factory=dict)
    quantize_bits: int | None = Field(None, ge=2, le=8)

    @field_validator("model")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("expected a built-in model name (mlp, cnn, gru) or a dotted import path")
        return value


class TeacherConfig(_Strict):
    """The teacher: a finished run directory (``run``), or a safetensors ``checkpoint`` plus a ``model`` spec, and/or
    a teacher ``cache`` directory (built by ``mentor cache build``).

    With ``cache`` the training reads the teacher's outputs from it (``tail``: how the classes outside its top-k are
    treated, see :func:`mentor.losses.sparse_kl_div`). If ``run`` or ``checkpoint`` is given as well, the cache
    must have been built from that teacher (fingerprints compared) and it scores the evaluation.

    Several teachers (multi-teacher distillation, :class:`mentor.teachers.Ensemble`): ``runs`` (a list of run
    directories, instead of ``run``/``checkpoint``/``cache``) combined by ``combine``: ``mean`` (equal weights),
    ``weights`` (the list ``weights``, one per run), ``max_prob`` / ``entropy`` (per item, from each teacher's
    confidence) or ``router`` (per item, from a learned router on the input with ``router_hidden`` hidden units;
    train it with ``recipe: {name: multi_teacher, args: {router: true}}``). ``space``: average the teachers'
    probabilities (``probs``) or logits (``logits``).

    ``num_classes`` keeps only the teacher's first outputs: a language model whose output layer was padded beyond
    the shared vocabulary (520 rows for 512 tokens) is truncated to the shared range. Without it, different output
    sizes are an error that names both.

    ``tokenizer`` (recipe ``cross_tokenizer_kd`` only): the teacher's own tokenizer, when it differs from the
    student's (the data's): an integer is the built-in byte-level BPE of that many tokens
    (:func:`mentor.lm.data.tokenizer`), a string a folder with a saved Hugging Face fast tokenizer. With
    ``teacher.run`` it defaults to the built-in tokenizer of that run's ``data.vocab_size``.
    """

    run: str | None = None
    checkpoint: str | None = None
    model: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    cache: str | None = None
    tail: Literal["rest", "renormalize"] = "rest"
    num_classes: int | None = Field(None, ge=1)
    runs: list[str] | None = None
    combine: Literal["mean", "weights", "max_prob", "entropy", "router"] = "mean"
    weights: list[float] | None = None
    space: Literal["probs", "logits"] = "probs"
    router_hidden: int = Field(64, ge=1)
    tokenizer: int | str | None = None

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, bool) or (isinstance(value, int) and value < 260) or value == "":
            raise ValueError("expected the size of the built-in tokenizer (an integer >= 260) or the folder of a "
                             "saved Hugging Face fast tokenizer")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> TeacherConfig:
        if self.runs is not None and self.tokenizer is not None:
            raise ValueError("'tokenizer' applies to one teacher ('run' or 'checkpoint'), not to several ('runs')")
        if self.runs is not None:
            others = [k for k in ("run", "checkpoint", "cache") if getattr(self, k) is not None]
            if others:
                raise ValueError(f"'runs' (several teachers) excludes {others}: give either 'runs' or one teacher")
            if len(self.runs) < 2:
                raise ValueError(f"'runs' needs at least 2 run directories, got {self.runs}")
            if (self.weights is not None) != (self.combine == "weights"):
                raise ValueError(f"'weights' goes with combine: weights (one per run); got combine {self.combine!r} "
                                 f"and weights {self.weights}")
            if self.weights is not None and (len(self.weights) != len(self.runs) or min(self.weights) < 0
                                             or sum(self.weights) <= 0):
                raise ValueError(f"weights = {self.weights}: expected {len(self.runs)} numbers >= 0 with a positive "
                                 "sum, one per run")
            return self
        if self.combine != "mean" or self.weights is not None:
            raise ValueError("'combine' and 'weights' apply to several teachers ('runs'), not to one")
        if self.run is not None and self.checkpoint is not None:
            raise ValueError("give either 'run' or 'checkpoint' (with 'model'), not both")
        if self.run is None and self.checkpoint is None and self.cache is None:
            raise ValueError("expected 'run' (a run directory), 'checkpoint' plus 'model', or 'cache'")
        if self.checkpoint is not None and self.model is None:
            raise ValueError("'checkpoint' needs 'model' (the teacher's architecture, e.g. cnn)")
        return self


class CacheConfig(_Strict):
    """What ``mentor cache build CONFIG`` stores (see :mod:`mentor.cache`): the teacher of ``teacher`` is run over
    the training data of ``data``; the cache goes to ``dir`` (default: ``teacher.cache``)."""

    dir: str | None = None
    k: int | None = Field(None, ge=1)
    values_dtype: Literal["float16", "bfloat16"] = "float16"
    features: list[str] = Field(default_factory=list)
    feature_inputs: bool = False
    outputs: list[str] = Field(default_factory=list)
    num_views: int = Field(1, ge=1)
    augment: str | None = None
    shard_size: int = Field(8192, ge=1)
    batch_size: int = Field(512, ge=1)
    seed: int = Field(0, ge=0)
    device: str = "auto"


class ExtraRecipeConfig(_Strict):
    """Another recipe whose terms join the main one's, with a weight (a number or ``{kind: {arguments}}``, see
    :func:`mentor.schedules.from_spec`) on top of each term's own weight."""

    name: str
    args: dict[str, Any] = Field(default_factory=dict)
    weight: float | dict[str, Any] = 1.0


class RecipeConfig(_Strict):
    """A recipe by name (see ``mentor recipes``) with its keyword arguments, plus the terms of other recipes
    (``plus``), e.g. ``{name: dkd, plus: [{name: fitnet, weight: 0.5}]}``."""

    name: str = "supervised"
    args: dict[str, Any] = Field(default_factory=dict)
    plus: list[ExtraRecipeConfig] = Field(default_factory=list)


class OptimConfig(_Strict):
    """Optimiser and learning-rate schedule (see :class:`mentor.train.Optim`)."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(None, gt=0)


class TrainConfig(_Strict):
    """Loop settings (see :func:`mentor.train.fit`)."""

    epochs: int = Field(20, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(128, ge=1)
    grad_accum: int = Field(1, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    cpu: bool = False
    checkpoint_every: int = Field(0, ge=0)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(1, ge=1)
    progress: bool = True
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list)
    out: str = "runs"
    export: Literal["student", "teacher"] = "student"


class RunConfig(_Strict):
    """A whole run."""

    name: str = "run"
    seed: int = Field(0, ge=0)
    data: DataConfig = Field(default_factory=lambda: DataConfig())
    student: ModelConfig = Field(default_factory=lambda: ModelConfig(model="mlp"))
    teacher: TeacherConfig | None = None
    recipe: RecipeConfig = Field(default_factory=lambda: RecipeConfig())
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig())
    train: TrainConfig = Field(default_factory=lambda: TrainConfig())
    cache: CacheConfig | None = None

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not value or any(c in value for c in "/\\") or value in (".", ".."):
            raise ValueError("expected a non-empty name without path separators")
        return value

    @property
    def run_dir(self) -> Path:
        return Path(self.train.out) / self.name

    @property
    def teacher_shares_vocabulary(self) -> bool:
        """Whether the student's and the teacher's outputs are over the same classes, so that evaluation can
        compare them (agreement, KL). False for ``cross_tokenizer_kd``: a teacher with its own tokenizer."""
        return self.recipe.name != "cross_tokenizer_kd"


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        value = item.get("input")
        kind = item["type"]
        if kind == "extra_forbidden":
            lines.append(f"unknown key {key!r} (value {value!r}); check the spelling against the documented keys")
        elif kind == "missing":
            lines.append(f"missing key {key!r}")
        else:
            msg = item["msg"]
            if isinstance(value, dict):
                lines.append(f"{key}: {msg}")
            else:
                lines.append(f"{key} = {value!r}: {msg}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.epochs=3", "recipe.args.temperature=4"]`` -> nested dict; values are parsed as YAML scalars."""
    result: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        value = yaml.safe_load(raw) if raw != "" else ""
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
            node = child
        node[parts[-1]] = value
    return result


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """Validate a config dict (plus overrides) into a :class:`RunConfig`; recipe arguments are checked too."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of keys to values, got {type(raw).__name__}")
    merged = _merge(raw, parse_overrides(overrides or []))
    try:
        cfg = RunConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None
    _check_recipe(cfg)
    return cfg


def build_method(recipe: RecipeConfig) -> Any:
    """The :class:`~mentor.method.Method` a recipe section describes (the main recipe, plus any ``plus`` recipes)."""
    from mentor.recipes import build_recipe
    from mentor.schedules import from_spec

    method = build_recipe(recipe.name, recipe.args)
    for i, extra in enumerate(recipe.plus):
        try:
            weight = from_spec(extra.weight)
        except ValueError as err:
            raise ValueError(f"plus[{i}].weight: {err}") from None
        method = method.plus(build_recipe(extra.name, extra.args), weight)
    return method


def _check_recipe(cfg: RunConfig) -> None:
    try:
        method = build_method(cfg.recipe)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"recipe: {err}") from None
    if any(extra.name == "simkd" for extra in cfg.recipe.plus):
        raise ConfigError("recipe.plus: 'simkd' replaces the student's classifier, so it can only be the main recipe "
                          "(recipe.name: simkd, with other recipes in its 'plus')")
    for extra in cfg.recipe.plus:
        if extra.name in ("dml", "noisy_student"):
            raise ConfigError(f"recipe.plus: {extra.name!r} changes how the run is built (the student cohort, the "
                              "generations of pseudo-labels), so it can only be the main recipe")
    routed = cfg.teacher is not None and cfg.teacher.runs is not None and cfg.teacher.combine == "router"
    trains_router = any(t.student == "route.logits" for t in method.terms)
    if routed and not trains_router:
        raise ConfigError("teacher.combine = 'router' learns its router from the term on 'route.logits': use recipe "
                          "multi_teacher with args {router: true}")
    if trains_router and not routed:
        raise ConfigError("recipe argument router = true trains the router of a routed ensemble: set teacher.runs "
                          "with teacher.combine = 'router'")
    if cfg.recipe.name == "noisy_student" and cfg.teacher is not None and (cfg.teacher.runs or cfg.teacher.cache):
        raise ConfigError("recipe 'noisy_student' pseudo-labels the training items with one teacher network: set "
                          "'teacher.run' or 'teacher.checkpoint' (not 'runs' or 'cache'), or no teacher")
    if cfg.recipe.name == "seq_kd" and (cfg.teacher is None or (cfg.teacher.run is None
                                                                and cfg.teacher.checkpoint is None)):
        raise ConfigError("recipe 'seq_kd' trains on the teacher's generated answers, which needs the teacher "
                          "network: set 'teacher.run' or 'teacher.checkpoint'")
    if method.batch_hook is not None and cfg.teacher is not None and cfg.teacher.cache is not None:
        raise ConfigError(f"recipe {cfg.recipe.name!r} trains on new (on-policy) sequences, which a teacher cache "
                          "cannot score: remove 'teacher.cache' and give the teacher network ('teacher.run')")
    if cfg.teacher is not None and cfg.teacher.cache is not None:
        from mentor.lm.weighting import uncertainty_weighted

        for term in method.terms:
            if term.loss is uncertainty_weighted:
                raise ConfigError(f"recipe term {term.name!r}: token_weighting = {term.kwargs['rule']!r} weights "
                                  "tokens by the teacher's full distribution, which a teacher cache (top-k) does "
                                  "not hold: remove 'teacher.cache' (give 'teacher.run') or set token_weighting: null")
    cross = cfg.recipe.name == "cross_tokenizer_kd"
    if any(extra.name == "cross_tokenizer_kd" for extra in cfg.recipe.plus):
        raise ConfigError("recipe.plus: 'cross_tokenizer_kd' needs a teacher with its own tokenizer, which only the "
                          "main recipe builds: expected recipe.name: cross_tokenizer_kd")
    if cfg.teacher is not None and cfg.teacher.tokenizer is not None and not cross:
        raise ConfigError(f"teacher.tokenizer = {cfg.teacher.tokenizer!r} applies to recipe 'cross_tokenizer_kd' "
                          f"(a teacher with another tokenizer), not to recipe {cfg.recipe.name!r}")
    if cross:
        spec = cfg.teacher
        if spec is None or (spec.run is None and spec.checkpoint is None) or spec.cache is not None:
            raise ConfigError("recipe 'cross_tokenizer_kd' runs the teacher on its own tokenization of every batch: "
                              "set 'teacher.run' or 'teacher.checkpoint' (and no 'teacher.cache')")
        if spec.checkpoint is not None and spec.tokenizer is None:
            raise ConfigError("recipe 'cross_tokenizer_kd' with 'teacher.checkpoint' needs 'teacher.tokenizer' (the "
                              "built-in tokenizer's size, or a saved tokenizer's folder)")
    lm_recipe = cfg.recipe.name in ("lm_kd", "seq_kd", "gkd", "skd", "reverse_kl_on_policy", "cross_tokenizer_kd")
    if lm_recipe and not cfg.data.name.startswith("lm_"):
        raise ConfigError(f"recipe {cfg.recipe.name!r} distils a language model: expected data.name lm_arithmetic, "
                          f"lm_reversal or lm_stdlib, got {cfg.data.name!r}")
    if cfg.recipe.name == "seq_kd" and cfg.data.name == "lm_stdlib":
        raise ConfigError("recipe 'seq_kd' continues the training prompts, but data.name = 'lm_stdlib' has none: "
                          "expected a prompt task (lm_arithmetic, lm_reversal)")
    if method.batch_hook is not None and cfg.data.name == "lm_stdlib":
        raise ConfigError(f"recipe {cfg.recipe.name!r} samples continuations of the training prompts, but "
                          "data.name = 'lm_stdlib' has none: expected a prompt task (lm_arithmetic, lm_reversal)")
    if cfg.recipe.name == "dml" and cfg.teacher is not None:
        raise ConfigError("recipe 'dml' trains peers from each other and the labels: remove 'teacher' (or add a "
                          "teacher's terms to a single student with another recipe)")
    if (method.needs_teacher and cfg.teacher is None and method.generations == 1 and method.teacher is None
            and cfg.recipe.name != "noisy_student"):  # noisy_student trains its first teacher itself
        raise ConfigError(f"recipe {cfg.recipe.name!r} needs a teacher: set 'teacher.run' or 'teacher.checkpoint'")
    if cfg.train.export == "teacher":
        from torch import nn

        from mentor.teachers import EMA

        built = method.teacher(nn.Linear(1, 1)) if method.teacher is not None else None
        if not isinstance(built, EMA):
            raise ConfigError(f"train.export = 'teacher' exports a teacher trained alongside the student (an EMA), "
                              f"but recipe {cfg.recipe.name!r} has none: expected train.export = 'student'")
    if method.needs_labels and cfg.data.train == "transfer":
        raise ConfigError(
            f"recipe {cfg.recipe.name!r} needs labels, but data.train = 'transfer' has none: "
            "expected data.train 'labelled' or 'both'"
        )


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, merge overrides into and validate a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    return config_from_dict(raw, overrides)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
