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
           "ExtraRecipeConfig", "build_method", "OptimConfig", "TrainConfig", "load_config", "parse_overrides",
           "config_from_dict"]


class ConfigError(ValueError):
    """A configuration problem, with the key, the value and what was expected."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, validate_assignment=True)


class DataConfig(_Strict):
    """Which data the student trains and is evaluated on.

    ``name: mnist1d`` is built in. ``train`` picks the training set: ``labelled`` (the first ``num_labelled`` of the
    4000 standard training items), ``transfer`` (``transfer_size`` generated unlabelled items with ``transfer_seed``)
    or ``both`` (labelled items plus the unlabelled transfer set). Evaluation uses the 1000-item test split.
    """

    name: Literal["mnist1d"] = "mnist1d"
    train: Literal["labelled", "transfer", "both"] = "labelled"
    num_labelled: int = Field(4000, ge=1, le=4000)
    transfer_size: int = Field(50000, ge=1)
    transfer_seed: int = Field(0, ge=0)


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
    """The teacher: a finished run directory (``run``), or a safetensors ``checkpoint`` plus a ``model`` spec."""

    run: str | None = None
    checkpoint: str | None = None
    model: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> TeacherConfig:
        if self.run is not None and self.checkpoint is not None:
            raise ValueError("give either 'run' or 'checkpoint' (with 'model'), not both")
        if self.run is None and self.checkpoint is None:
            raise ValueError("expected 'run' (a run directory) or 'checkpoint' plus 'model'")
        if self.checkpoint is not None and self.model is None:
            raise ValueError("'checkpoint' needs 'model' (the teacher's architecture, e.g. cnn)")
        return self


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

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not value or any(c in value for c in "/\\") or value in (".", ".."):
            raise ValueError("expected a non-empty name without path separators")
        return value

    @property
    def run_dir(self) -> Path:
        return Path(self.train.out) / self.name


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
    if method.needs_teacher and cfg.teacher is None and method.generations == 1:
        raise ConfigError(f"recipe {cfg.recipe.name!r} needs a teacher: set 'teacher.run' or 'teacher.checkpoint'")
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
