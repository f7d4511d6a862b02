"""Bad input fails early, with a message that names the key or value and what was expected, before any work.

Every case checks (a) the exception type, or for the command line exit status 2 and the text on stderr, (b) that
the message names the offending key / value and what would be right, and (c) where a run directory is involved,
that nothing was trained or written there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import mentor.run as mentor_run
from mentor import losses, recipes
from mentor.cli import main
from mentor.config import ConfigError, config_from_dict, load_config
from mentor.data import TensorData
from mentor.models import MLP, CNN1d, build_model
from mentor.run import run
from mentor.teachers import Frozen
from mentor.train import Optim, fit, load_model_weights, save_model

# ------------------------------------------------------------------------------------------------------ helpers


def tiny_data(n: int = 16, classes: int = 10, features: int = 40, seed: int = 0) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    return TensorData(torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g))


def tiny_mlp(num_classes: int = 10, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(hidden=[8], num_classes=num_classes)


def base_config(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    """A small valid config whose run directory is ``tmp_path/runs/bad``; ``sections`` replace whole sections."""
    cfg: dict[str, Any] = {
        "name": "bad",
        "seed": 0,
        "data": {"name": "mnist1d", "train": "labelled", "num_labelled": 32},
        "student": {"model": "mlp", "args": {"hidden": [8]}},
        "recipe": {"name": "supervised"},
        "optim": {"name": "adamw", "lr": 0.01},
        "train": {"epochs": 1, "batch_size": 8, "progress": False, "out": str(tmp_path / "runs")},
    }
    cfg.update(sections)
    return cfg


def write_yaml(tmp_path: Path, cfg: dict[str, Any], name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs" / "bad"


def assert_nothing_written(path: Path) -> None:
    """No training happened in ``path``: no config, metrics, checkpoints or weights (ideally no folder at all)."""
    for name in ("config.yaml", "metrics.jsonl", "student.safetensors", "result.json", "checkpoints"):
        assert not (path / name).exists(), f"{path / name} was written although the input was bad"


def assert_untrained(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed: a training step ran on bad input"


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def fake_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny random train/test sets instead of MNIST-1D, so run-level cases stay fast and need no generated data."""
    monkeypatch.setattr(mentor_run, "load_data", lambda cfg: (tiny_data(32, seed=1), tiny_data(8, seed=2)))


def cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``mentor ARGV``, expect exit status 2, and return stderr."""
    capsys.readouterr()
    status = main(argv)
    captured = capsys.readouterr()
    assert status == 2, f"exit status {status}, stderr: {captured.err}"
    assert captured.err.startswith(f"mentor {argv[0]}: error: ")
    return captured.err


# --------------------------------------------------------------------------------------- configuration keys


def test_unknown_top_level_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({**base_config(tmp_path), "epochs": 3})
    msg = str(info.value)
    assert "unknown key 'epochs'" in msg
    assert "(value 3)" in msg
    assert "documented keys" in msg


def test_unknown_nested_key_typo_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = base_config(tmp_path)
    cfg["train"] = {**cfg["train"], "epoch": 3}
    err = cli_error(capsys, ["train", str(write_yaml(tmp_path, cfg))])
    assert "unknown key 'train.epoch'" in err
    assert "(value 3)" in err
    assert not run_dir(tmp_path).exists()


def test_wrong_type_names_key_value_and_expected_type(tmp_path: Path) -> None:
    cfg = base_config(tmp_path)
    cfg["train"] = {**cfg["train"], "epochs": "ten"}
    with pytest.raises(ConfigError) as info:
        config_from_dict(cfg)
    msg = str(info.value)
    assert "train.epochs = 'ten'" in msg
    assert "valid integer" in msg


def test_unknown_optimiser_name_lists_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(base_config(tmp_path), ["optim.name=adamx"])
    msg = str(info.value)
    assert "optim.name = 'adamx'" in msg
    assert "'adamw'" in msg and "'sgd'" in msg


# ------------------------------------------------------------------------------------------ recipe arguments


@pytest.mark.parametrize(
    ("recipe", "temperature"), [("hinton_kd", 0), ("hinton_kd", -1.5), ("transfer_kd", 0), ("transfer_kd", -2.0)]
)
def test_temperature_must_be_positive(tmp_path: Path, recipe: str, temperature: float) -> None:
    cfg = base_config(tmp_path, recipe={"name": recipe, "args": {"temperature": temperature}},
                      teacher={"checkpoint": str(tmp_path / "t.safetensors"), "model": "mlp"})
    if recipe == "transfer_kd":
        cfg["data"] = {"train": "transfer", "transfer_size": 64}
    with pytest.raises(ConfigError) as info:
        config_from_dict(cfg)
    assert f"temperature must be > 0, got {temperature}" in str(info.value)


def test_temperature_override_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = base_config(tmp_path, recipe={"name": "hinton_kd"},
                      teacher={"checkpoint": str(tmp_path / "t.safetensors"), "model": "mlp"})
    err = cli_error(capsys, ["train", str(write_yaml(tmp_path, cfg)), "recipe.args.temperature=-1"])
    assert "temperature must be > 0, got -1" in err
    assert not run_dir(tmp_path).exists()


@pytest.mark.parametrize("alpha", [1.5, -0.1])
def test_alpha_outside_unit_interval(tmp_path: Path, alpha: float) -> None:
    cfg = base_config(tmp_path, recipe={"name": "hinton_kd", "args": {"alpha": alpha}},
                      teacher={"checkpoint": str(tmp_path / "t.safetensors"), "model": "mlp"})
    with pytest.raises(ConfigError) as info:
        config_from_dict(cfg)
    msg = str(info.value)
    assert "alpha must be in [0, 1]" in msg
    assert f"got {alpha}" in msg


def test_recipe_argument_of_the_wrong_type(tmp_path: Path) -> None:
    cfg = base_config(tmp_path, recipe={"name": "hinton_kd", "args": {"temperature": "four"}},
                      teacher={"checkpoint": str(tmp_path / "t.safetensors"), "model": "mlp"})
    with pytest.raises(ConfigError) as info:
        config_from_dict(cfg)
    msg = str(info.value)
    assert "'temperature'" in msg
    assert "'four'" in msg
    assert "number" in msg


def test_unknown_recipe_name_lists_the_recipes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(base_config(tmp_path, recipe={"name": "hinton"}))
    msg = str(info.value)
    assert "unknown recipe 'hinton'" in msg
    assert "hinton_kd" in msg and "supervised" in msg


def test_unknown_recipe_argument_lists_the_arguments(tmp_path: Path) -> None:
    cfg = base_config(tmp_path, recipe={"name": "hinton_kd", "args": {"temp": 4}},
                      teacher={"checkpoint": str(tmp_path / "t.safetensors"), "model": "mlp"})
    with pytest.raises(ConfigError) as info:
        config_from_dict(cfg)
    msg = str(info.value)
    assert "recipe 'hinton_kd' has no argument 'temp'" in msg
    assert "temperature" in msg and "alpha" in msg


def test_unknown_recipe_argument_from_python() -> None:
    with pytest.raises(ValueError, match="recipe 'transfer_kd' has no argument 'alpha': expected one of temperature"):
        recipes.build_recipe("transfer_kd", {"alpha": 0.5})


def test_recipe_needing_labels_with_transfer_data(tmp_path: Path) -> None:
    cfg = base_config(tmp_path, recipe={"name": "hinton_kd"}, data={"train": "transfer", "transfer_size": 64},
                      teacher={"checkpoint": str(tmp_path / "t.safetensors"), "model": "mlp"})
    with pytest.raises(ConfigError) as info:
        config_from_dict(cfg)
    msg = str(info.value)
    assert "recipe 'hinton_kd' needs labels" in msg
    assert "data.train = 'transfer'" in msg
    assert "'labelled' or 'both'" in msg


def test_recipe_needing_a_teacher_without_one_in_the_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(base_config(tmp_path, recipe={"name": "hinton_kd"}))
    msg = str(info.value)
    assert "recipe 'hinton_kd' needs a teacher" in msg
    assert "teacher.run" in msg and "teacher.checkpoint" in msg


def test_recipe_needing_a_teacher_without_one_in_fit(tmp_path: Path) -> None:
    student = tiny_mlp()
    before = snapshot(student)
    with pytest.raises(ValueError, match="recipe 'hinton_kd' needs a teacher, but none was given"):
        fit(student, recipes.hinton_kd(), tiny_data(), batch_size=4, progress=False, out=tmp_path / "run")
    assert_untrained(student, before)
    assert_nothing_written(tmp_path / "run")


# ------------------------------------------------------------------------------------------------- teachers


def test_teacher_student_class_count_mismatch_in_fit(tmp_path: Path) -> None:
    save_model(tiny_mlp(num_classes=5), tmp_path / "teacher5.safetensors")
    teacher = MLP(hidden=[8], num_classes=5)
    load_model_weights(teacher, tmp_path / "teacher5.safetensors")
    student = tiny_mlp(num_classes=10)
    before = snapshot(student)
    with pytest.raises(ValueError) as info:
        fit(student, recipes.hinton_kd(), tiny_data(), teacher=Frozen(teacher), batch_size=4, progress=False,
            out=tmp_path / "run")
    msg = str(info.value)
    assert "teacher has 5 output classes but the student has 10" in msg
    assert "expected the same number of classes" in msg
    assert_untrained(student, before)
    assert_nothing_written(tmp_path / "run")


def test_teacher_student_class_count_mismatch_in_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_data: None
) -> None:
    save_model(tiny_mlp(num_classes=5), tmp_path / "teacher5.safetensors")
    cfg = base_config(tmp_path, recipe={"name": "hinton_kd"},
                      teacher={"checkpoint": str(tmp_path / "teacher5.safetensors"), "model": "mlp",
                               "args": {"hidden": [8], "num_classes": 5}})
    err = cli_error(capsys, ["train", str(write_yaml(tmp_path, cfg))])
    assert "teacher has 5 output classes but the student has 10" in err
    assert_nothing_written(run_dir(tmp_path))


def test_missing_teacher_checkpoint_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere" / "teacher.safetensors"
    cfg = base_config(tmp_path, recipe={"name": "hinton_kd"}, teacher={"checkpoint": str(missing), "model": "mlp"})
    err = cli_error(capsys, ["train", str(write_yaml(tmp_path, cfg))])
    assert f"teacher.checkpoint = {str(missing)!r} does not exist" in err
    assert not run_dir(tmp_path).exists()


def test_missing_checkpoint_file_for_load_model_weights(tmp_path: Path) -> None:
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(FileNotFoundError, match=f"checkpoint {str(missing)!r} does not exist"):
        load_model_weights(tiny_mlp(), missing)


def test_teacher_checkpoint_of_another_architecture(tmp_path: Path, fake_data: None) -> None:
    save_model(CNN1d(), tmp_path / "cnn.safetensors")
    cfg = config_from_dict(base_config(tmp_path, recipe={"name": "hinton_kd"},
                                       teacher={"checkpoint": str(tmp_path / "cnn.safetensors"), "model": "mlp"}))
    with pytest.raises(ConfigError) as info:
        run(cfg, report=False)
    msg = str(info.value)
    assert "cnn.safetensors" in msg
    assert "does not fit model MLP (another architecture?)" in msg
    assert "missing keys" in msg and "unexpected keys" in msg and "conv1.weight" in msg
    assert not run_dir(tmp_path).exists()


def test_teacher_run_that_is_not_a_run(tmp_path: Path, fake_data: None) -> None:
    folder = tmp_path / "some_folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a run")
    cfg = config_from_dict(base_config(tmp_path, recipe={"name": "hinton_kd"}, teacher={"run": str(folder)}))
    with pytest.raises(ConfigError) as info:
        run(cfg, report=False)
    msg = str(info.value)
    assert f"teacher.run = {str(folder)!r} is not a finished run directory" in msg
    assert "config.yaml and student.safetensors" in msg
    assert not run_dir(tmp_path).exists()


def test_teacher_checkpoint_without_model(tmp_path: Path) -> None:
    cfg = base_config(tmp_path, recipe={"name": "hinton_kd"}, teacher={"checkpoint": str(tmp_path / "t.safetensors")})
    with pytest.raises(ConfigError) as info:
        config_from_dict(cfg)
    msg = str(info.value)
    assert "teacher" in msg
    assert "'checkpoint' needs 'model'" in msg


# ---------------------------------------------------------------------------------------------------- data


def test_empty_dataset(tmp_path: Path) -> None:
    empty = TensorData(torch.zeros(0, 40), torch.zeros(0, dtype=torch.long))
    student = tiny_mlp()
    before = snapshot(student)
    with pytest.raises(ValueError, match="train data is empty: expected at least one item"):
        fit(student, recipes.supervised(), empty, batch_size=4, progress=False, out=tmp_path / "run")
    assert_untrained(student, before)
    assert_nothing_written(tmp_path / "run")


def test_nan_in_the_inputs(tmp_path: Path) -> None:
    data = tiny_data()
    data.x[3, 7] = float("nan")
    student = tiny_mlp()
    before = snapshot(student)
    with pytest.raises(ValueError) as info:
        fit(student, recipes.supervised(), data, batch_size=4, progress=False, out=tmp_path / "run")
    msg = str(info.value)
    assert "train data has NaN or inf in its inputs (first at item 3)" in msg
    assert "expected finite values" in msg
    assert_untrained(student, before)
    assert_nothing_written(tmp_path / "run")


def test_nan_in_the_eval_data(tmp_path: Path) -> None:
    eval_data = tiny_data(8)
    eval_data.x[5, 0] = float("inf")
    student = tiny_mlp()
    before = snapshot(student)
    with pytest.raises(ValueError, match=r"eval data has NaN or inf in its inputs \(first at item 5\)"):
        fit(student, recipes.supervised(), tiny_data(), eval_data=eval_data, batch_size=4, progress=False,
            out=tmp_path / "run")
    assert_untrained(student, before)
    assert_nothing_written(tmp_path / "run")


@pytest.mark.parametrize("bad_label", [12, -3])
def test_label_out_of_range(tmp_path: Path, bad_label: int) -> None:
    data = tiny_data()
    data.y[5] = bad_label
    student = tiny_mlp()
    before = snapshot(student)
    with pytest.raises(ValueError) as info:
        fit(student, recipes.supervised(), data, batch_size=4, progress=False, out=tmp_path / "run")
    msg = str(info.value)
    assert f"train data has label {bad_label}, out of range" in msg
    assert "expected 0..9" in msg
    assert_untrained(student, before)
    assert_nothing_written(tmp_path / "run")


@pytest.mark.parametrize("num_labelled", [0, 4001])
def test_num_labelled_out_of_range(tmp_path: Path, num_labelled: int) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(base_config(tmp_path), [f"data.num_labelled={num_labelled}"])
    msg = str(info.value)
    assert f"data.num_labelled = {num_labelled}" in msg
    assert ("greater than or equal to 1" if num_labelled < 1 else "less than or equal to 4000") in msg


def test_batch_larger_than_dataset_in_fit(tmp_path: Path) -> None:
    student = tiny_mlp()
    before = snapshot(student)
    with pytest.raises(ValueError) as info:
        fit(student, recipes.supervised(), tiny_data(16), batch_size=64, progress=False, out=tmp_path / "run")
    msg = str(info.value)
    assert "train data has 16 items, fewer than one global batch of 64" in msg
    assert "batch_size 64" in msg
    assert_untrained(student, before)
    assert_nothing_written(tmp_path / "run")


def test_batch_larger_than_dataset_in_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_data: None
) -> None:
    cfg = base_config(tmp_path)
    err = cli_error(capsys, ["train", str(write_yaml(tmp_path, cfg)), "train.batch_size=16", "train.grad_accum=4"])
    assert "train.batch_size" in err and "train.grad_accum" in err
    assert "64" in err and "32" in err
    assert_nothing_written(run_dir(tmp_path))


# --------------------------------------------------------------------------------------------------- models


def test_unknown_model_name(tmp_path: Path, fake_data: None) -> None:
    cfg = config_from_dict(base_config(tmp_path, student={"model": "resnet9000"}))
    with pytest.raises(ConfigError) as info:
        run(cfg, report=False)
    msg = str(info.value)
    assert "student.model" in msg
    assert "'resnet9000' is neither a built-in name (mlp, cnn, gru, tiny_llama) nor a dotted path" in msg
    assert not run_dir(tmp_path).exists()


def test_dotted_path_to_a_missing_attribute(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            fake_data: None) -> None:
    cfg = base_config(tmp_path, student={"model": "mentor.models.NoSuchNet"})
    err = cli_error(capsys, ["train", str(write_yaml(tmp_path, cfg))])
    assert "student.model" in err
    assert "module 'mentor.models' has no attribute 'NoSuchNet'" in err
    assert not run_dir(tmp_path).exists()


def test_dotted_path_to_a_missing_module() -> None:
    expected = r"model 'no_such_pkg\.models\.Net': cannot import module 'no_such_pkg\.models'"
    with pytest.raises(ValueError, match=expected):
        build_model("no_such_pkg.models.Net")


def test_model_kwargs_the_model_does_not_accept(tmp_path: Path, fake_data: None) -> None:
    cfg = config_from_dict(base_config(tmp_path, student={"model": "mlp", "args": {"hidden_size": 8}}))
    with pytest.raises(ConfigError) as info:
        run(cfg, report=False)
    msg = str(info.value)
    assert "student.model" in msg
    assert "model 'mlp' does not accept arguments {'hidden_size': 8}" in msg
    assert "hidden_size" in msg
    assert not run_dir(tmp_path).exists()


# -------------------------------------------------------------------------------------- optimiser and loop


@pytest.mark.parametrize("lr", [0, -0.1])
def test_learning_rate_not_positive_in_the_config(tmp_path: Path, lr: float) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(base_config(tmp_path), [f"optim.lr={lr}"])
    msg = str(info.value)
    assert f"optim.lr = {lr}" in msg
    assert "greater than 0" in msg


def test_learning_rate_not_positive_in_optim() -> None:
    with pytest.raises(ValueError, match=r"optim\.lr must be a finite number > 0, got 0\.0"):
        Optim(lr=0.0)


def test_grad_accum_zero_in_the_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(base_config(tmp_path), ["train.grad_accum=0"])
    msg = str(info.value)
    assert "train.grad_accum = 0" in msg
    assert "greater than or equal to 1" in msg


def test_grad_accum_zero_in_fit(tmp_path: Path) -> None:
    student = tiny_mlp()
    before = snapshot(student)
    with pytest.raises(ValueError, match=r"train\.grad_accum must be an integer >= 1, got 0"):
        fit(student, recipes.supervised(), tiny_data(), batch_size=4, grad_accum=0, progress=False,
            out=tmp_path / "run")
    assert_untrained(student, before)
    assert_nothing_written(tmp_path / "run")


def test_fp16_on_the_cpu_in_fit(tmp_path: Path) -> None:
    student = tiny_mlp()
    before = snapshot(student)
    with pytest.raises(ValueError) as info:
        fit(student, recipes.supervised(), tiny_data(), batch_size=4, mixed_precision="fp16", cpu=True,
            progress=False, out=tmp_path / "run")
    msg = str(info.value)
    assert "train.mixed_precision 'fp16' needs a CUDA GPU" in msg
    assert "'bf16' or 'no'" in msg
    assert_untrained(student, before)
    assert_nothing_written(tmp_path / "run")


def test_fp16_on_the_cpu_in_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_data: None) -> None:
    cfg = base_config(tmp_path)
    err = cli_error(capsys, ["train", str(write_yaml(tmp_path, cfg)), "train.mixed_precision=fp16", "train.cpu=true"])
    assert "train.mixed_precision" in err and "'fp16'" in err
    assert "'bf16' or 'no'" in err
    assert_nothing_written(run_dir(tmp_path))


def test_resume_without_any_checkpoint_in_fit(tmp_path: Path) -> None:
    student = tiny_mlp()
    before = snapshot(student)
    with pytest.raises(FileNotFoundError) as info:
        fit(student, recipes.supervised(), tiny_data(), batch_size=4, resume=True, progress=False,
            out=tmp_path / "run")
    msg = str(info.value)
    assert "cannot resume: no checkpoint in" in msg
    assert str(tmp_path / "run" / "checkpoints") in msg
    assert "'latest'" in msg
    assert_untrained(student, before)
    assert_nothing_written(tmp_path / "run")


def test_resume_without_any_checkpoint_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_data: None
) -> None:
    err = cli_error(capsys, ["train", str(write_yaml(tmp_path, base_config(tmp_path))), "--resume"])
    assert "cannot resume" in err
    assert str(run_dir(tmp_path)) in err
    assert "checkpoints/latest" in err
    assert_nothing_written(run_dir(tmp_path))


# ------------------------------------------------------------------------------------ files and overrides


def test_bad_override_syntax_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = cli_error(capsys, ["train", str(write_yaml(tmp_path, base_config(tmp_path))), "train.epochs"])
    assert "override 'train.epochs' is not of the form key.path=value" in err
    assert not run_dir(tmp_path).exists()


@pytest.mark.parametrize("override", ["=3", "train..epochs=3"])
def test_bad_override_key(tmp_path: Path, override: str) -> None:
    with pytest.raises(ConfigError, match=f"override '{override}' is not of the form key.path=value"):
        config_from_dict(base_config(tmp_path), [override])


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    err = cli_error(capsys, ["train", str(missing)])
    assert f"config file {str(missing)!r} does not exist" in err
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(missing)


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("train: {epochs: 3\nrecipe: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert f"config file {str(path)!r} is not valid YAML" in msg
    assert "line" in msg


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- train\n- epochs\n")
    with pytest.raises(ConfigError, match="a config must be a mapping of keys to values, got list"):
        load_config(path)


# ---------------------------------------------------------------------------------------------------- losses


def test_kl_div_with_mismatched_shapes() -> None:
    with pytest.raises(ValueError) as info:
        losses.kl_div(torch.randn(4, 10), torch.randn(4, 5))
    msg = str(info.value)
    assert "student and teacher logits must have the same shape" in msg
    assert "(4, 10)" in msg and "(4, 5)" in msg


def test_generalized_jsd_beta_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got 1.5"):
        losses.generalized_jsd(torch.randn(4, 10), torch.randn(4, 10), beta=1.5)


def test_loss_temperature_zero() -> None:
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0"):
        losses.kl_div(torch.randn(4, 10), torch.randn(4, 10), temperature=0)


def test_tracker_without_its_package_fails_before_training(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here; the error path needs it absent")
    data = TensorData(torch.randn(16, 40), torch.randint(0, 10, (16,)))
    with pytest.raises(ValueError, match=r"train.trackers: 'tensorboard' needs the 'tensorboard' package"):
        fit(MLP(hidden=[8]), recipes.supervised(), data, epochs=1, batch_size=8, out=tmp_path / "run",
            trackers=["tensorboard"], progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    with pytest.raises(ValueError, match=r"unknown tracker 'comet'"):
        fit(MLP(hidden=[8]), recipes.supervised(), data, epochs=1, batch_size=8, trackers=["comet"], progress=False)


def test_wrong_feature_layer_fails_before_the_run_directory_is_written(tmp_path: Path) -> None:
    teacher_path = tmp_path / "t.safetensors"
    save_model(CNN1d(channels=4), teacher_path)
    cfg = config_from_dict({
        "name": "fit", "data": {"num_labelled": 200},
        "student": {"model": "mlp", "args": {"hidden": [8]}},
        "teacher": {"checkpoint": str(teacher_path), "model": "cnn", "args": {"channels": 4}},
        "recipe": {"name": "fitnet", "args": {"teacher_layer": "conv9", "inputs": False}},
        "train": {"epochs": 1, "batch_size": 50, "out": str(tmp_path), "progress": False},
    })
    with pytest.raises(ValueError, match=r"teacher feature: .*'conv9'.*conv1"):
        run(cfg)
    assert not (tmp_path / "fit").exists()


def test_supervised_augment_must_be_a_preset(tmp_path: Path) -> None:
    cfg = base_config(tmp_path, recipe={"name": "supervised", "args": {"augment": "shift"}})
    with pytest.raises(ConfigError) as info:
        config_from_dict(cfg)
    assert "augment must be one of none, weak, strong, weak_image, strong_image, got 'shift'" in str(info.value)
    assert_nothing_written(run_dir(tmp_path))
