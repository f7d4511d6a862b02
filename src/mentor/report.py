"""Markdown reports with PNG plots for finished runs, and comparison tables over several students.

:func:`write_report` reads a run directory (``config.yaml``, ``metrics.jsonl``, ``result.json``,
``student.safetensors``; see :mod:`mentor.run`) and writes ``report.md`` next to them, with three plots in
``plots/``:

- ``loss.png``: the total loss and every ``loss/<term>`` of the training rows over steps;
- ``eval.png``: accuracy (and agreement with the teacher, where there is one) of the evaluation rows over epochs;
- ``reliability.png``: a reliability diagram of the final student on the test split, rebuilt from ``config.yaml``
  and ``student.safetensors``.

The metrics table shows the final evaluation recorded by the run (``result.json``, else the last evaluation row of
``metrics.jsonl``); values the run did not record are filled in from a fresh evaluation of the saved student on the
CPU, and the latency of one batch is always measured afresh (:func:`mentor.eval.latency_ms`).

:func:`write_comparison_report` writes a table of several students (the demo's summary) and a bar chart of their
accuracy.

Plots use matplotlib's Agg canvas directly (no ``pyplot``, no screen). Every file is written to a temporary name in
its folder and then renamed, so a failed report never leaves a half-written file.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mentor import atomic

__all__ = ["format_value", "read_metrics", "write_comparison_report", "write_report"]

_FRACTION_DIGITS = 4
_PLOT_DPI = 110


# ------------------------------------------------------------------------------------------------ small helpers


def format_value(key: str, value: Any) -> str:
    """Format one metric for a Markdown table.

    Args:
        key: The metric name (``accuracy``, ``params``, ``latency_ms``, ...); it picks the format.
        value: The value; ``None`` or a missing value prints as ``n/a``.

    Returns:
        ``accuracy``, ``agreement``, ``kl_to_teacher`` and ``ece`` with 4 decimals (``0.8123``), ``params`` as an
        integer with thousands separators (``12,345``), ``latency_ms`` with 3 decimals, anything else as ``str``.
    """
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if key == "params" and isinstance(value, (int, float)):
        return f"{int(value):,}"
    if key == "latency_ms" and isinstance(value, (int, float)):
        return f"{float(value):.3f}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{_FRACTION_DIGITS}f}"
    return str(value)


def _escape_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _save_figure(fig: Any, path: Path) -> None:
    """Render ``fig`` as PNG with the Agg canvas and write it atomically."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_PLOT_DPI, bbox_inches="tight")
    atomic.write_bytes(path, buffer.getvalue())


def _new_figure(width: float = 6.4, height: float = 4.0) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` file.

    Args:
        path: The file.

    Returns:
        One dict per non-empty line.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: A line is not a JSON object; the message names the file and the line number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {str(path)!r} does not exist")
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{str(path)!r} line {number} is not valid JSON ({err}): {line[:80]!r}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{str(path)!r} line {number} is not a JSON object: {line[:80]!r}")
        rows.append(row)
    return rows


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


# ------------------------------------------------------------------------------------------------------ plots


def _series(
    rows: Sequence[Mapping[str, Any]], keys: Sequence[str], x_of: Callable[[Mapping[str, Any]], float]
) -> dict[str, list[tuple[float, float]]]:
    """``{key: [(x, value), ...]}`` for every key with at least one numeric value in ``rows``."""
    series = {}
    for key in keys:
        points = [(x_of(r), v) for r in rows if (v := _number(r.get(key))) is not None]
        if points:
            series[key] = points
    return series


def _finish(fig: Any, ax: Any, path: Path, *, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    _save_figure(fig, path)


def _plot_losses(rows: Sequence[Mapping[str, Any]], path: Path) -> bool:
    """Total loss and every ``loss/<term>`` over steps; ``False`` (nothing written) without training rows."""
    train = [r for r in rows if r.get("split") == "train" and _number(r.get("step")) is not None]
    keys = ["loss", *sorted({k for r in train for k in r if k.startswith("loss/")})]
    series = _series(train, keys, lambda r: float(r["step"]))
    if not series:
        return False
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for key, points in series.items():
        xs, ys = zip(*points, strict=True)
        total = key == "loss"
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3,
                linewidth=2.2 if total else 1.3, color="black" if total else None,
                label="loss (weighted total)" if total else key)
    _finish(fig, ax, path, xlabel="step", ylabel="loss", title="Training loss terms")
    return True


def _plot_eval(rows: Sequence[Mapping[str, Any]], path: Path) -> bool:
    """Accuracy and agreement over epochs; ``False`` (nothing written) without evaluation rows."""
    evals = [r for r in rows if r.get("split") == "eval" and _number(r.get("epoch")) is not None]
    series = _series(evals, ("accuracy", "agreement"), lambda r: float(r["epoch"]) + 1.0)
    if not series:
        return False
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for key, points in series.items():
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", markersize=4, label=key)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0.0, 1.02)
    _finish(fig, ax, path, xlabel="epochs completed", ylabel="fraction of test items",
            title="Evaluation on the test split")
    return True


def _plot_reliability(bins: Sequence[Mapping[str, float]], ece: float, path: Path) -> None:
    """Reliability diagram (accuracy per confidence bin against the diagonal) with a histogram of bin counts."""
    fig = _new_figure(6.0, 6.4)
    grid = fig.add_gridspec(2, 1, height_ratios=(3, 1), hspace=0.08)
    ax = fig.add_subplot(grid[0])
    hist = fig.add_subplot(grid[1], sharex=ax)
    centres = [(b["lower"] + b["upper"]) / 2 for b in bins]
    widths = [b["upper"] - b["lower"] for b in bins]
    filled = [b["count"] > 0 for b in bins]
    acc = [b["accuracy"] if f else 0.0 for b, f in zip(bins, filled, strict=True)]
    conf = [b["confidence"] if f else 0.0 for b, f in zip(bins, filled, strict=True)]
    ax.bar(centres, acc, width=widths, edgecolor="black", linewidth=0.6, color="tab:blue", label="accuracy")
    gap_bottom = [min(a, c) for a, c in zip(acc, conf, strict=True)]
    gap_height = [abs(c - a) if f else 0.0 for a, c, f in zip(acc, conf, filled, strict=True)]
    ax.bar(centres, gap_height, bottom=gap_bottom, width=widths, fill=False, hatch="///", edgecolor="tab:red",
           linewidth=0.6, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability of the final student (ECE {ece:.4f})")
    ax.legend(loc="best", fontsize="small")
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelbottom=False)
    hist.bar(centres, [b["count"] for b in bins], width=widths, color="gray", edgecolor="black", linewidth=0.6)
    hist.set_xlabel("confidence (top-1 probability)")
    hist.set_ylabel("items")
    hist.grid(True, alpha=0.3)
    _save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- run loading


def _check_run_dir(run_dir: Path) -> None:
    """Fail before writing anything if ``run_dir`` is not a finished run directory."""
    expected = "a finished run directory written by 'mentor train' (config.yaml, metrics.jsonl, student.safetensors)"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist: expected {expected}")
    generations = sorted(p.name for p in run_dir.glob("gen*") if p.is_dir() and re.fullmatch(r"gen\d+", p.name))
    hint = (
        f"; this looks like a multi-generation run: report each generation instead ({', '.join(generations)})"
        if generations
        else ""
    )
    for name in ("metrics.jsonl", "config.yaml", "student.safetensors"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"run directory {str(run_dir)!r} has no {name}: expected {expected}{hint}")


def _previous_generation(run_dir: Path) -> Path | None:
    """For ``.../gen<k>`` with ``k > 1``, or ``k = 1`` beside a ``gen0`` (noisy_student's supervised first teacher):
    the weights of generation ``k - 1`` (its teacher), if present."""
    match = re.fullmatch(r"gen(\d+)", run_dir.name)
    if match is None or int(match.group(1)) < 1:
        return None
    weights = run_dir.parent / f"gen{int(match.group(1)) - 1}" / "student.safetensors"
    return weights if weights.is_file() else None


def _load_models(run_dir: Path, cfg: Any) -> tuple[nn.Module, nn.Module | None, str, list[str]]:
    """The saved student, its teacher (or ``None``), a description of the teacher and notes for the report."""
    from mentor.config import ConfigError
    from mentor.run import build_student, load_teacher
    from mentor.train import load_model_weights

    notes: list[str] = []
    with torch.random.fork_rng(devices=[]):  # build_student seeds the global generator; leave the caller's alone
        student = build_student(cfg)
        load_model_weights(student, run_dir / "student.safetensors")
        teacher: nn.Module | None = None
        description = "none"
        previous = _previous_generation(run_dir)
        if previous is not None:
            teacher = build_student(cfg, 0)
            load_model_weights(teacher, previous)
            description = f"previous generation ({previous.parent.name})"
        elif cfg.teacher is not None and (cfg.teacher.run is not None or cfg.teacher.checkpoint is not None):
            spec = cfg.teacher
            description = f"run {spec.run}" if spec.run is not None else f"{spec.model} from {spec.checkpoint}"
            try:
                teacher = load_teacher(spec)
            except (ConfigError, FileNotFoundError, ValueError) as err:
                notes.append(
                    f"The teacher could not be loaded ({err}); agreement and KL to the teacher are the values "
                    "recorded during training."
                )
    student.eval()
    if teacher is not None:
        teacher.eval()
    return student, teacher, description, notes


def _recorded_metrics(run_dir: Path, rows: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], str]:
    """The run's final evaluation: ``result.json`` if readable, else the last evaluation row of the metrics."""
    result_path = run_dir / "result.json"
    if result_path.is_file():
        try:
            result = json.loads(result_path.read_text())
        except json.JSONDecodeError:
            result = None
        if isinstance(result, dict) and isinstance(result.get("metrics"), dict) and result["metrics"]:
            return dict(result["metrics"]), "result.json"
    evals = [r for r in rows if r.get("split") == "eval"]
    if evals:
        keep = ("accuracy", "agreement", "kl_to_teacher", "ece", "params")
        return {k: evals[-1][k] for k in keep if k in evals[-1]}, "the last evaluation row of metrics.jsonl"
    return {}, ""


# ----------------------------------------------------------------------------------------------------- report


def write_report(run_dir: str | Path, *, latency_batch: int = 1000) -> Path:
    """Write ``run_dir/report.md`` with plots in ``run_dir/plots/``.

    The report has a title with the run name and recipe, the final evaluation (accuracy, agreement and KL to the
    teacher where there is a teacher, ECE, parameters, latency of one batch on the CPU), the resolved config and
    three plots: loss terms over steps, accuracy and agreement over epochs, and a reliability diagram of the final
    student on the test split. A plot without data (no training rows, say) is left out and the report says so.

    Args:
        run_dir: A finished run directory (``config.yaml``, ``metrics.jsonl``, ``student.safetensors``; for a
            multi-generation run, one ``gen<k>`` folder).
        latency_batch: Items in the batch whose forward time is measured (at most the test split's size).

    Returns:
        The path of ``report.md``.

    Raises:
        FileNotFoundError: ``run_dir`` or one of the files above is missing; the message names the path and what a
            run directory must contain.
        ValueError: ``metrics.jsonl`` has a line that is not a JSON object, or the saved weights do not fit the
            student that ``config.yaml`` describes.
    """
    from mentor.config import load_config
    from mentor.eval import evaluate, expected_calibration_error, latency_ms, predict, reliability_bins
    from mentor.run import load_data
    from mentor.teachers import Frozen

    run_dir = Path(run_dir)
    if latency_batch < 1:
        raise ValueError(f"latency_batch must be >= 1, got {latency_batch}")
    _check_run_dir(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    config_text = (run_dir / "config.yaml").read_text()
    cfg = load_config(run_dir / "config.yaml")
    student, teacher_model, teacher_description, notes = _load_models(run_dir, cfg)
    _, test = load_data(cfg)
    if test.y.dim() > 1:  # a language model: per-token metrics and generation samples
        return _write_lm_report(run_dir, cfg, rows, config_text, student, teacher_model, teacher_description, notes,
                                test)

    frozen = Frozen(teacher_model) if teacher_model is not None else None
    fresh = evaluate(student, test, frozen, device="cpu")
    recorded, source = _recorded_metrics(run_dir, rows)
    metrics: dict[str, Any] = {}
    for key in ("accuracy", "agreement", "kl_to_teacher", "ece", "params"):
        value = recorded.get(key, fresh.get(key))
        metrics[key] = value
    batch = test.x[: min(latency_batch, len(test))]
    metrics["latency_ms"] = latency_ms(student, batch)
    if source and "accuracy" in recorded and "accuracy" in fresh:
        if abs(float(recorded["accuracy"]) - float(fresh["accuracy"])) > 0.5 / max(len(test), 1):
            again, before = format_value("accuracy", fresh["accuracy"]), format_value("accuracy", recorded["accuracy"])
            notes.append(
                f"Re-evaluating student.safetensors on the CPU gives accuracy {again}, not the recorded {before} "
                "(trained on another device, or "
                "the weights changed after the run)."
            )
    if not source:
        notes.append("The run recorded no evaluation; the metrics come from a fresh evaluation of student.safetensors.")

    logits = predict(student, test)
    labelled = test.y >= 0
    probs = torch.softmax(logits[labelled], dim=-1)
    labels = test.y[labelled]
    plots_dir = run_dir / "plots"
    plots: list[tuple[str, str]] = []
    if _plot_losses(rows, plots_dir / "loss.png"):
        plots.append(("Loss terms over steps", "plots/loss.png"))
    else:
        notes.append("No training rows in metrics.jsonl: the loss plot is left out.")
    if _plot_eval(rows, plots_dir / "eval.png"):
        title = "Accuracy and agreement over epochs" if teacher_model is not None else "Accuracy over epochs"
        plots.append((title, "plots/eval.png"))
    else:
        notes.append("No evaluation rows in metrics.jsonl: the accuracy plot is left out.")
    if int(labelled.sum()) > 0:
        ece = expected_calibration_error(probs, labels)
        _plot_reliability(reliability_bins(probs, labels), ece, plots_dir / "reliability.png")
        plots.append(("Reliability diagram (final student, test split)", "plots/reliability.png"))
    else:
        notes.append("The test split has no labels: the reliability diagram is left out.")

    generation = f" ({run_dir.name})" if re.fullmatch(r"gen\d+", run_dir.name) else ""
    recipe_args = ", ".join(f"{k}={v}" for k, v in cfg.recipe.args.items())
    train_rows = [r for r in rows if r.get("split") == "train"]
    last_step = max((int(r["step"]) for r in rows if _number(r.get("step")) is not None), default=0)
    no_teacher = "n/a (no teacher)"
    table = [
        ("accuracy", "accuracy", format_value("accuracy", metrics["accuracy"])),
        ("agreement", "agreement with the teacher (top-1)",
         format_value("agreement", metrics["agreement"]) if metrics["agreement"] is not None else no_teacher),
        ("kl_to_teacher", "KL(teacher ‖ student)",
         format_value("kl_to_teacher", metrics["kl_to_teacher"]) if metrics["kl_to_teacher"] is not None
         else no_teacher),
        ("ece", "ECE (15 bins)", format_value("ece", metrics["ece"])),
        ("params", "parameters", format_value("params", metrics["params"])),
        ("latency_ms", f"latency per batch of {batch.shape[0]} (ms, CPU)", format_value("latency_ms",
                                                                                        metrics["latency_ms"])),
    ]
    lines = [
        f"# {cfg.name}{generation}: {cfg.recipe.name}",
        "",
        f"- recipe: `{cfg.recipe.name}`" + (f" ({recipe_args})" if recipe_args else ""),
        f"- student: `{cfg.student.model}`" + (f" {json.dumps(cfg.student.args)}" if cfg.student.args else ""),
        f"- teacher: {teacher_description}",
        f"- data: mnist1d, train = {cfg.data.train}, evaluated on the test split ({len(test)} items)",
        f"- steps: {last_step}, training rows logged: {len(train_rows)}",
        "",
        "## Final evaluation",
        "",
        f"From {source}." if source else "From a fresh evaluation of student.safetensors.",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {_escape_cell(label)} | {value} |" for _, label, value in table],
        "",
    ]
    return _finish_report(run_dir, lines, notes, plots, config_text)


def _finish_report(run_dir: Path, lines: list[str], notes: Sequence[str], plots: Sequence[tuple[str, str]],
                   config_text: str) -> Path:
    """Append the notes, plots and resolved config to a report's lines and write ``report.md`` atomically."""
    if notes:
        lines += ["## Notes", "", *[f"- {note}" for note in notes], ""]
    lines += ["## Plots", ""]
    for title, rel in plots:
        lines += [f"### {title}", "", f"![{title}]({rel})", ""]
    lines += ["## Resolved config", "", "```yaml", config_text.rstrip("\n"), "```", ""]
    report = run_dir / "report.md"
    atomic.write_text(report, "\n".join(lines))
    return report


_LM_METRICS = (
    ("exact_match", "exact match (greedy answers, held-out prompts)"),
    ("perplexity", "perplexity (target tokens)"),
    ("token_accuracy", "next-token accuracy (target tokens)"),
    ("agreement", "token agreement with the teacher (top-1)"),
    ("kl_to_teacher", "KL(teacher ‖ student) per target token"),
    ("params", "parameters"),
)


def _plot_lm_eval(rows: Sequence[Mapping[str, Any]], path: Path) -> bool:
    """Exact match, token accuracy and agreement over evaluations; ``False`` without evaluation rows."""
    evals = [r for r in rows if r.get("split") == "eval" and _number(r.get("step")) is not None]
    series = _series(evals, ("exact_match", "token_accuracy", "agreement"), lambda r: float(r["step"]))
    if not series:
        return False
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for key, points in series.items():
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", markersize=4, label=key)
    ax.set_ylim(0.0, 1.02)
    _finish(fig, ax, path, xlabel="step", ylabel="fraction", title="Evaluation on the held-out split")
    return True


def _write_lm_report(
    run_dir: Path, cfg: Any, rows: Sequence[Mapping[str, Any]], config_text: str, student: nn.Module,
    teacher_model: nn.Module | None, teacher_description: str, notes: list[str], test: Any, samples: int = 8,
) -> Path:
    """``report.md`` of a language-model run: the per-token metrics, plots, and a few greedy generations."""
    from mentor.lm.loop import LMData, evaluate_lm, greedy_answers
    from mentor.teachers import Frozen

    recorded, source = _recorded_metrics(run_dir, rows)
    # A teacher with another tokenizer (cross_tokenizer_kd) has other logits: no token-for-token agreement or KL.
    compared = Frozen(teacher_model) if teacher_model is not None and cfg.teacher_shares_vocabulary else None
    fresh = evaluate_lm(student, test, compared)
    metrics = {key: recorded.get(key, fresh.get(key)) for key, _ in _LM_METRICS}
    plots_dir = run_dir / "plots"
    plots: list[tuple[str, str]] = []
    if _plot_losses(rows, plots_dir / "loss.png"):
        plots.append(("Loss terms over steps", "plots/loss.png"))
    if _plot_lm_eval(rows, plots_dir / "eval.png"):
        plots.append(("Exact match and token metrics over steps", "plots/eval.png"))
    lines = [
        f"# {cfg.name}: {cfg.recipe.name}",
        "",
        f"- recipe: `{cfg.recipe.name}`" + (f" ({', '.join(f'{k}={v}' for k, v in cfg.recipe.args.items())})"
                                            if cfg.recipe.args else ""),
        f"- student: `{cfg.student.model}`" + (f" {json.dumps(cfg.student.args)}" if cfg.student.args else ""),
        f"- teacher: {teacher_description}",
        f"- data: {cfg.data.name}, evaluated on the held-out split ({len(test)} sequences)",
        "",
        "## Final evaluation",
        "",
        f"From {source}." if source else "From a fresh evaluation of student.safetensors.",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {_escape_cell(label)} | {format_value(key, metrics[key]) if metrics[key] is not None else 'n/a'} |"
          for key, label in _LM_METRICS],
        "",
    ]
    if isinstance(test, LMData) and test.max_new_tokens > 0:
        from mentor.lm.data import tokenizer

        tok = tokenizer(cfg.data.vocab_size or 512)
        part = LMData(test.x[:samples], test.y[:samples], eos_id=test.eos_id, pad_id=test.pad_id,
                      max_new_tokens=test.max_new_tokens)
        prompts, completions, references = greedy_answers(student, part)
        lines += ["## Generation samples (greedy, held-out prompts)", "", "| prompt | student | reference | match |",
                  "|---|---|---|---|"]
        for p, c, r in zip(prompts, completions, references, strict=True):
            texts = [str(tok.decode(t, skip_special_tokens=True)) for t in (p, c, r)]
            lines.append("| " + " | ".join(f"`{_escape_cell(t)}`" for t in texts) + f" | {'yes' if c == r else 'no'} |")
        lines.append("")
    return _finish_report(run_dir, lines, notes, plots, config_text)


# ------------------------------------------------------------------------------------------------- comparison

_COMPARISON_COLUMNS = (
    ("name", "student"),
    ("accuracy", "accuracy"),
    ("agreement", "agreement"),
    ("kl_to_teacher", "KL(t‖s)"),
    ("ece", "ECE"),
    ("params", "params"),
    ("latency_ms", "latency ms/batch"),
)


def _plot_accuracy_bars(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> bool:
    """Bar chart of accuracy per row; ``False`` (nothing written) when no row has an accuracy."""
    named = [(str(r["name"]), v) for r in rows if (v := _number(r.get("accuracy"))) is not None]
    if not named:
        return False
    names, values = zip(*named, strict=True)
    fig = _new_figure(max(4.0, 1.1 * len(names) + 1.5), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    positions = list(range(len(names)))
    bars = ax.bar(positions, values, color="tab:blue", edgecolor="black", linewidth=0.6)
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(f"{value:.3f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom",
                    fontsize="small", xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(positions)
    ax.set_xticklabels(names, rotation=20 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.0, min(1.0, max(values) * 1.12 + 0.02))
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    _save_figure(fig, path)
    return True


def write_comparison_report(
    path: str | Path,
    rows: list[dict[str, Any]],
    title: str,
    plots_from: dict[str, Path] | None = None,
) -> Path:
    """Write a Markdown comparison of several students, for example the demo's teacher and students.

    Args:
        path: The Markdown file to write (its folder is created).
        rows: One dict per student with ``name`` and any of ``accuracy``, ``agreement``, ``kl_to_teacher``,
            ``ece``, ``params``, ``latency_ms`` (missing or ``None`` values print as ``n/a``).
        title: The report's title.
        plots_from: Optional ``{row name: run directory}``. When given, a bar chart of accuracy per row is written
            to ``<folder of path>/plots/accuracy.png`` and embedded, and every run directory is linked (its
            ``report.md`` where present), with relative links.

    Returns:
        The path of the Markdown file.

    Raises:
        ValueError: ``rows`` is empty, or a row is not a mapping with a ``name``.
    """
    path = Path(path)
    if not rows:
        raise ValueError("write_comparison_report needs at least one row, got none")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or not row.get("name"):
            raise ValueError(f"row {i} must be a dict with a non-empty 'name', got {row!r}")
    folder = path.parent
    header = "| " + " | ".join(label for _, label in _COMPARISON_COLUMNS) + " |"
    rule = "|" + "|".join("---" if key == "name" else "---:" for key, _ in _COMPARISON_COLUMNS) + "|"
    body = [
        "| " + " | ".join(_escape_cell(format_value(key, row.get(key))) for key, _ in _COMPARISON_COLUMNS) + " |"
        for row in rows
    ]
    lines = [f"# {title}", "", header, rule, *body, ""]
    if plots_from is not None:
        if _plot_accuracy_bars(rows, folder / "plots" / "accuracy.png", f"{title}: test accuracy"):
            lines += ["## Accuracy", "", "![Test accuracy per student](plots/accuracy.png)", ""]
        if plots_from:
            lines += ["## Runs", ""]
            for name, run_dir in plots_from.items():
                run_dir = Path(run_dir)
                rel = Path(os.path.relpath(run_dir, folder)).as_posix()
                if (run_dir / "report.md").is_file():
                    lines.append(f"- **{name}**: [report]({rel}/report.md)")
                else:
                    lines.append(f"- **{name}**: [{rel}]({rel})")
            lines.append("")
    atomic.write_text(path, "\n".join(lines))
    return path
