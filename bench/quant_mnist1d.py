"""Quantized distillation on MNIST-1D (Polino et al. 2018, https://arxiv.org/abs/1802.05668): k-bit MLP students.

One CNN teacher (``supervised`` on the 4000 labelled MNIST-1D items), then MLP students trained with ``hinton_kd``
(T=4, alpha=0.9) on the same items, 3 seeds each:

* ``float``  the plain student;
* ``8bit``, ``4bit``, ``2bit``  the same student with fake-quantized weights (``mentor.quant.quantize_weights``:
  symmetric per-output-channel k-bit levels, straight-through gradient to float latent weights).

A seed fixes the student's initialisation and the data order, so the variants of one seed start from the same
weights and see the same batches. For every quantized student the exported artefact (int8 codes + per-channel
scales) is loaded into a float MLP and evaluated (it must give the same accuracy as the fake-quantized model), and
the ``torch.ao`` dynamic int8 model built from the same codes is evaluated too (activations quantized on the fly).
For the float student, post-training quantization (PTQ: its trained weights rounded to k bits, no retraining) is
the baseline that quantized distillation should beat. Sizes are tensor data bytes of the float state dict and of
the bit-packed artefact (``ceil(n * k / 8)`` bytes per weight tensor + float32 scales + float32 biases). One thread.

    .venv/bin/python bench/quant_mnist1d.py            # full (about 15 minutes on one core)
    .venv/bin/python bench/quant_mnist1d.py --quick    # smaller, < 60 s
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_section

from mentor import data, models, quant, recipes, teachers, train
from mentor.eval import evaluate

TEMPERATURE, ALPHA = 4.0, 0.9
LR_TEACHER, LR_STUDENT, BATCH = 1e-2, 1e-3, 100
VARIANTS: dict[str, int | None] = {"float": None, "8bit": 8, "4bit": 4, "2bit": 2}


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"teacher_epochs": 20, "student_epochs": 8, "hidden": [256, 256], "seeds": [0, 1, 2]}
    return {"teacher_epochs": 150, "student_epochs": 60, "hidden": [512, 512, 512], "seeds": [0, 1, 2]}


def summarise(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def float_mlp(hidden: list[int]) -> torch.nn.Module:
    return models.MLP(hidden=tuple(hidden))


def run_student(bits: int | None, cfg: dict[str, Any], seed: int, labelled: data.TensorData, test: data.TensorData,
                frozen: teachers.Frozen) -> dict[str, Any]:
    torch.manual_seed(seed)
    student = float_mlp(cfg["hidden"])
    if bits is not None:
        quant.quantize_weights(student, bits)
    start = time.perf_counter()
    result = train.fit(student, recipes.hinton_kd(temperature=TEMPERATURE, alpha=ALPHA), labelled, teacher=frozen,
                       epochs=cfg["student_epochs"], batch_size=BATCH,
                       optim=train.Optim(lr=LR_STUDENT, schedule="cosine"), seed=seed, progress=False,
                       log_every=10_000)
    seconds = time.perf_counter() - start
    metrics = evaluate(result.student, test, frozen)
    row: dict[str, Any] = {"seed": seed, "accuracy": metrics["accuracy"], "agreement": metrics["agreement"],
                           "steps": result.steps, "seconds": seconds}
    if bits is None:
        row["ptq_accuracy"] = {}
        for b in (8, 4, 2):
            rounded = float_mlp(cfg["hidden"])
            quant.dequantize(quant.export_quantized(result.student, b), rounded)
            row["ptq_accuracy"][f"{b}bit"] = evaluate(rounded, test)["accuracy"]
    else:
        exported = float_mlp(cfg["hidden"])
        quant.dequantize(quant.export_quantized(result.student, pack=True), exported)
        row["artefact_accuracy"] = evaluate(exported, test)["accuracy"]
        row["dynamic_int8_accuracy"] = evaluate(quant.to_dynamic_int8(result.student), test)["accuracy"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the same comparison, smaller (< 60 s)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = settings(args.quick)
    labelled, test = data.mnist1d("train"), data.mnist1d("test")

    torch.manual_seed(1234)
    teacher = models.CNN1d()
    start = time.perf_counter()
    train.fit(teacher, recipes.supervised(), labelled, epochs=cfg["teacher_epochs"], batch_size=BATCH,
              optim=train.Optim(lr=LR_TEACHER, schedule="cosine"), seed=1234, progress=False, log_every=10_000)
    teacher_acc = evaluate(teacher, test)["accuracy"]
    print(json.dumps({"teacher_accuracy": teacher_acc, "seconds": time.perf_counter() - start}), file=sys.stderr)
    frozen = teachers.Frozen(teacher)

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    for seed in cfg["seeds"]:
        for name, bits in VARIANTS.items():
            row = run_student(bits, cfg, seed, labelled, test, frozen)
            runs[name].append(row)
            print(json.dumps({"variant": name, **row}), file=sys.stderr)

    sizes: dict[str, dict[str, Any]] = {}
    for name, bits in VARIANTS.items():
        reference = float_mlp(cfg["hidden"])
        report = quant.model_size_bytes(reference, bits or 8)
        sizes[name] = ({"packed_bytes": report["float_bytes"], "storage_bytes": report["float_bytes"],
                        "packed_ratio": 1.0} if bits is None else
                       {k: report[k] for k in ("packed_bytes", "storage_bytes", "packed_ratio")})
    summary: dict[str, dict[str, Any]] = {}
    for name, rows in runs.items():
        entry: dict[str, Any] = {"accuracy": summarise([r["accuracy"] for r in rows]),
                                 "agreement": statistics.mean(r["agreement"] for r in rows),
                                 "seconds_per_run": statistics.median(r["seconds"] for r in rows), **sizes[name]}
        if name == "float":
            entry["ptq_accuracy"] = {b: summarise([r["ptq_accuracy"][b] for r in rows]) for b in ("8bit", "4bit",
                                                                                                   "2bit")}
        else:
            entry["artefact_equals_fake_quant"] = all(r["artefact_accuracy"] == r["accuracy"] for r in rows)
            entry["dynamic_int8_accuracy"] = summarise([r["dynamic_int8_accuracy"] for r in rows])
        summary[name] = entry

    gap = 100 * (summary["float"]["accuracy"]["mean"] - summary["4bit"]["accuracy"]["mean"])
    goals = {"4bit_minus_float_points": -gap, "4bit_within_2_points_of_float": gap <= 2.0,
             "4bit_qat_minus_4bit_ptq_points": 100 * (summary["4bit"]["accuracy"]["mean"]
                                                      - summary["float"]["ptq_accuracy"]["4bit"]["mean"]),
             "4bit_packed_ratio": summary["4bit"]["packed_ratio"]}
    result = {"benchmark": "quant_mnist1d", "quick": args.quick, "settings": cfg, "temperature": TEMPERATURE,
              "alpha": ALPHA, "teacher_accuracy": teacher_acc, "summary": summary, "goals": goals, "runs": runs}

    lines = ["| student | mean acc | std | min | max | mean agreement | packed bytes | x float | int8-storage bytes "
             "| exported artefact = fake-quant | dynamic int8 acc | PTQ of float student | seconds/run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in summary.items():
        acc = e["accuracy"]
        quantized = name != "float"
        cells = [name, f"{acc['mean']:.4f}", f"{acc['std']:.4f}", f"{acc['min']:.4f}", f"{acc['max']:.4f}",
                 f"{e['agreement']:.4f}", f"{e['packed_bytes']:,}", f"{e['packed_ratio']:.3f}",
                 f"{e['storage_bytes']:,}",
                 str(e["artefact_equals_fake_quant"]) if quantized else "-",
                 f"{e['dynamic_int8_accuracy']['mean']:.4f}" if quantized else "-",
                 f"{summary['float']['ptq_accuracy'][name]['mean']:.4f}" if quantized else "-",
                 f"{e['seconds_per_run']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    body = (
        f"CNN teacher (test accuracy {teacher_acc:.4f}, {cfg['teacher_epochs']} epochs) -> MLP{tuple(cfg['hidden'])} "
        f"students with hinton_kd (T={TEMPERATURE}, alpha={ALPHA}) on the 4000 labelled items, "
        f"{cfg['student_epochs']} epochs, batch {BATCH}, AdamW lr {LR_STUDENT} cosine, seeds {cfg['seeds']}. "
        "k-bit students: symmetric per-output-channel fake-quantized weights (biases float), straight-through "
        "gradient. Sizes: tensor bytes of the float32 state dict vs the bit-packed artefact (codes at k bits + "
        "float32 scale per output channel + float32 biases). PTQ: the float student's trained weights rounded to k "
        "bits without retraining (mean over seeds).\n\n" + "\n".join(lines) + "\n\nGoals: `" + json.dumps(goals)
        + "`"
    )
    write_section("quant_mnist1d" + (" (quick)" if args.quick else ""), body)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
