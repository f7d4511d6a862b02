"""The classic distillation catalogue on MNIST-1D, in the style of RepDistiller's table, 3 seeds.

One CNN teacher (``CNN1d``, 25 channels, trained with ``supervised`` on the 4000 labelled items) and two students:

* ``CNN -> MLP`` (different families): ``MLP(512, 512, 512)``;
* ``CNN -> narrower CNN``: ``CNN1d(channels=8)``.

Methods: scratch (``supervised``), KD (``hinton_kd`` T=4, alpha=0.9), FitNet (hint on the penultimate features
through a linear projector), AT (attention maps of the three convolutions; CNN students only), RKD (25 x distance +
50 x angle on the penultimate features), SP (weight 3000), DKD (alpha=1, beta=8, T=4, weight warmed up over the
first 20 epochs), DIST (beta=gamma=2, T=4), OFA (a ``"head"`` branch into the logit space on each hidden layer /
convolution of the student, OFA loss with eps=1, T=1, all weights 1: the authors' defaults) and, as an extra
column, SimKD (the student's penultimate feature through an MLP projector into the teacher's frozen classifier,
feature loss only; the accuracy is that of this composite, which is what SimKD deploys). Weights are the papers'
defaults, not tuned here. Every student trains 60 epochs on the same 4000 labelled items (batch 100, AdamW
cosine, lr 1e-3 for the MLP and 1e-2 for the CNN student, the rates that train each family well from scratch
here); seeds change the student's initialisation and the data order.

    python bench/catalogue_mnist1d.py                       # full (about 25 minutes on one core)
    python bench/catalogue_mnist1d.py --quick               # the same comparison, smaller (< 90 s)
    python bench/catalogue_mnist1d.py --only OFA SimKD      # these columns only, merged into RESULTS.md's table
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import RESULTS, write_section

from mentor import data, models, recipes, teachers, train
from mentor.eval import evaluate
from mentor.method import Method


def methods(steps_per_epoch: int, cnn_student: bool, mlp_depth: int = 3) -> dict[str, Callable[[], Method] | None]:
    stages = ["conv1", "conv2", "conv3"] if cnn_student else [f"features.{2 * i + 1}" for i in range(mlp_depth)]
    return {
        "scratch": recipes.supervised,
        "KD": lambda: recipes.hinton_kd(temperature=4.0, alpha=0.9),
        "FitNet": lambda: recipes.fitnet(hint_weight=1.0),
        "AT": (lambda: recipes.attention_transfer(weight=100.0)) if cnn_student else None,
        "RKD": recipes.rkd,
        "SP": recipes.similarity_preserving,
        "DKD": lambda: recipes.dkd(alpha=1.0, beta=8.0, temperature=4.0, warmup_steps=20 * steps_per_epoch),
        "DIST": lambda: recipes.dist(beta=2.0, gamma=2.0, temperature=4.0),
        "OFA": lambda: recipes.ofa(stages=stages),
        "SimKD": recipes.simkd,  # trains the composite student (see SIMKD below)
    }


SIMKD = "SimKD"


def train_teacher(labelled: data.TensorData, epochs: int, batch: int, augment: str = "none") -> torch.nn.Module:
    """The CNN teacher of the MNIST-1D benchmarks (``CNN1d``, 25 channels): ``supervised(augment=augment)``, AdamW
    cosine at lr 1e-2, seed 1234."""
    torch.manual_seed(1234)
    teacher_model = models.CNN1d()
    train.fit(teacher_model, recipes.supervised(augment=augment), labelled, epochs=epochs, batch_size=batch,
              optim=train.Optim(lr=1e-2, schedule="cosine"), seed=1234, progress=False, log_every=10_000)
    return teacher_model


def student_pairs(mlp_hidden: tuple[int, ...]) -> dict[str, tuple[Callable[[], torch.nn.Module], float]]:
    """Each pair's student constructor and learning rate."""
    # Each student family at the learning rate that trains it from scratch well here: the MLPs at 1e-3 (as in
    # kd_mnist1d.py), the CNNs at 1e-2 (as the CNN teacher; at 1e-3 an 8-channel CNN underfits in 60 epochs).
    return {
        "CNN -> MLP": (lambda: models.MLP(hidden=mlp_hidden), 1e-3),
        "CNN -> narrower CNN": (lambda: models.CNN1d(channels=8), 1e-2),
    }


def _section_name(quick: bool) -> str:
    return "catalogue_mnist1d" + (" (quick)" if quick else "")


def _old_section(quick: bool) -> tuple[dict[str, dict[str, str]], str, str, list[str]]:
    """The table cells, teacher cells, goal line and provenance lines of the current RESULTS.md section."""
    name = _section_name(quick)
    text = RESULTS.read_text() if RESULTS.exists() else ""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    if begin not in text or end not in text:
        return {}, "", "", []
    section = text[text.index(begin): text.index(end)]
    lines = section.splitlines()
    header = next((line for line in lines if line.startswith("| pair | teacher |")), None)
    cells: dict[str, dict[str, str]] = {}
    teacher_cells: dict[str, str] = {}
    if header is not None:
        names = [c.strip() for c in header.strip("|").split("|")]
        for line in lines[lines.index(header) + 2:]:
            if not line.startswith("|"):
                break
            values = [c.strip() for c in line.strip("|").split("|")]
            row = dict(zip(names, values, strict=False))
            cells[row["pair"]] = {k: v for k, v in row.items() if k not in ("pair", "teacher")}
            teacher_cells[row["pair"]] = row["teacher"]
    goal = next((line for line in lines if line.startswith("Goal (")), "")
    command = next((line for line in lines if line.startswith("Command: ")), "")
    provenance = [line for line in lines if line.startswith("Columns ")]
    if command:
        provenance.insert(0, "Columns not re-run, from the earlier command: " + command[len("Command: "):])
    return cells, json.dumps(teacher_cells), goal, provenance


def _cell(row: dict[str, Any] | None) -> str:
    return f"{100 * row['mean']:.1f} ± {100 * row['std']:.1f}" if row else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the same comparison, smaller (< 90 s)")
    parser.add_argument("--only", nargs="+", metavar="METHOD",
                        help="run only these columns (e.g. OFA SimKD) and merge them into the table already in "
                             "bench/RESULTS.md, keeping the other columns and the command that made them")
    args = parser.parse_args()
    torch.set_num_threads(1)
    teacher_epochs, epochs, seeds, n_labelled = (20, 3, [0, 1, 2], 1000) if args.quick else (150, 60, [0, 1, 2], 4000)
    mlp_hidden = (64, 64) if args.quick else (512, 512, 512)
    all_names = list(methods(1, True))
    if args.only:
        unknown = [n for n in args.only if n not in all_names]
        if unknown:
            parser.error(f"--only: unknown method(s) {unknown}; expected some of {all_names}")
    labelled, test = data.mnist1d("train", n_labelled), data.mnist1d("test")
    batch = 100
    steps_per_epoch = len(labelled) // batch

    teacher_model = train_teacher(labelled, teacher_epochs, batch)
    teacher = teachers.Frozen(teacher_model)
    teacher_acc = evaluate(teacher_model, test)["accuracy"]
    print(json.dumps({"teacher_accuracy": teacher_acc}), file=sys.stderr)

    pairs = student_pairs(mlp_hidden)
    table: dict[str, dict[str, Any]] = {}
    for pair, (make_student, lr) in pairs.items():
        cnn_student = "CNN" in pair.split("->")[1]
        rows: dict[str, Any] = {}
        for name, make_method in methods(steps_per_epoch, cnn_student, len(mlp_hidden)).items():
            if args.only and name not in args.only:
                continue
            if make_method is None:
                rows[name] = None
                continue
            accs, seconds = [], []
            for seed in seeds:
                torch.manual_seed(seed)
                student = make_student()
                if name == SIMKD:  # the deployed composite: backbone -> projector -> the teacher's classifier
                    student = recipes.simkd_student(student, teacher_model, labelled.x[:2])
                method = make_method()
                start = time.perf_counter()
                result = train.fit(student, method, labelled, teacher=teacher if method.needs_teacher else None,
                                   epochs=epochs, batch_size=batch, optim=train.Optim(lr=lr, schedule="cosine"),
                                   seed=seed, progress=False, log_every=10_000)
                seconds.append(time.perf_counter() - start)
                accs.append(evaluate(result.student, test)["accuracy"])
                print(json.dumps({"pair": pair, "method": name, "seed": seed, "accuracy": accs[-1]}), file=sys.stderr)
            rows[name] = {"accs": accs, "mean": statistics.mean(accs), "std": statistics.stdev(accs),
                          "seconds": statistics.median(seconds)}
        table[pair] = rows

    old_cells, old_teacher, old_goal, provenance = _old_section(args.quick) if args.only else ({}, "", "", [])
    lines = ["| pair | teacher | " + " | ".join(all_names) + " |", "|---" * (len(all_names) + 2) + "|"]
    for pair, rows in table.items():
        cells = [_cell(rows[n]) if n in rows else old_cells.get(pair, {}).get(n, "not run") for n in all_names]
        lines.append(f"| {pair} | {100 * teacher_acc:.1f} | " + " | ".join(cells) + " |")
    goals: dict[str, Any] = {}
    if all(n in rows for rows in table.values() for n in ("KD", "DKD", "DIST")):
        for pair, rows in table.items():
            kd = rows["KD"]["mean"]
            goals[pair] = {"DKD - KD (points)": 100 * (rows["DKD"]["mean"] - kd),
                           "DIST - KD (points)": 100 * (rows["DIST"]["mean"] - kd),
                           "DKD >= KD": rows["DKD"]["mean"] >= kd, "DIST >= KD": rows["DIST"]["mean"] >= kd}
        goal_line = "Goal (DKD and DIST at least match KD): `" + json.dumps(goals) + "`"
    else:
        goal_line = old_goal
    notes = []
    if args.only:
        notes.append(f"Columns {', '.join(args.only)}: this command (teacher retrained identically, test accuracy "
                     f"{100 * teacher_acc:.1f}; the earlier columns' teacher cells were {old_teacher}).")
        notes += [line for line in provenance if line.startswith("Columns not re-run")]  # older commands
    body = (f"MNIST-1D test accuracy (%), mean ± std over seeds {seeds}; {n_labelled} labelled training items, "
            f"{epochs} epochs, batch {batch}, AdamW cosine at lr 1e-3 (MLP student) / 1e-2 (CNN student); CNN teacher "
            f"{teacher_epochs} epochs. Method "
            "weights are the papers' defaults (see the script's docstring), not tuned on MNIST-1D. n/a: AT needs "
            "spatial maps in the student (an MLP has none). SimKD is an extra column: its accuracy is that of the "
            "deployed composite (student backbone, projector, the teacher's frozen classifier), which holds more "
            "parameters than the student.\n\n" + "\n".join(lines)
            + ("\n\n" + goal_line if goal_line else "") + ("\n\n" + "\n\n".join(notes) if notes else ""))
    write_section(_section_name(args.quick), body)
    print(json.dumps({"benchmark": "catalogue_mnist1d", "quick": args.quick, "only": args.only,
                      "teacher_accuracy": teacher_acc, "table": table, "goals": goals}))


if __name__ == "__main__":
    main()
