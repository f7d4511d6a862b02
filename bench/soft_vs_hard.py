"""Soft targets against hard pseudo-labels on the MNIST-1D transfer set, over the training budget.

The plain CNN teacher (``bench/kd_mnist1d.py --teacher plain``, about 0.91), MLP(512, 512, 512) students and the
50000-sample transfer set of ``bench/kd_mnist1d.py``; ``transfer_kd`` (T = 4) and ``hard_label_kd`` (the teacher's
arg-max) are trained for several epoch budgets, 3 seeds each, and the gap ``transfer_kd - hard_label_kd`` is reported
per budget with its seed spread. This is the study behind the issue's goal of a +1.0 point gap: with this teacher
the soft student reaches its teacher's accuracy, so the gap cannot exceed the hard student's distance to the teacher
(about one point), whatever the budget, temperature or (beyond 5000 items) transfer-set size. ``kd_mnist1d.py``'s
default teacher, trained with the weak view (about 0.97), leaves room, and there the gap is +1.8 points.

    python bench/soft_vs_hard.py            # budgets 8, 20, 40 epochs (about 25 minutes on one core)
    python bench/soft_vs_hard.py --quick    # the same comparison, smaller (< 60 s)
    python bench/soft_vs_hard.py --sizes 5000 10000 20000 --budgets 20   # smaller transfer sets, same steps

With ``--sizes``, each transfer set (the first N items of the same generated stream) is trained for about the same
number of optimiser steps as the default set over the budget: ``epochs = budget * default_size / N``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_section
from catalogue_mnist1d import train_teacher

from mentor import data, models, recipes, teachers, train
from mentor.eval import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the same comparison, smaller (< 60 s)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[4.0], metavar="T",
                        help="transfer_kd temperatures to compare with hard_label_kd (default: 4, the recipe's)")
    parser.add_argument("--budgets", type=int, nargs="+", metavar="EPOCHS",
                        help="epoch budgets (default: 8 20 40; quick: 2 5)")
    parser.add_argument("--sizes", type=int, nargs="+", metavar="N",
                        help="transfer-set sizes, each trained for the steps of the budget on the default set "
                             "(default: the default set only: 50000; quick: 5000)")
    args = parser.parse_args()
    if any(not t > 0 for t in args.temperatures):
        parser.error(f"--temperatures must be > 0, got {args.temperatures}")
    if args.budgets is not None and any(b < 1 for b in args.budgets):
        parser.error(f"--budgets must be >= 1 epoch each, got {args.budgets}")
    if args.sizes is not None and any(n < 256 for n in args.sizes):
        parser.error(f"--sizes must be >= 256 items each (one batch), got {args.sizes}")
    torch.set_num_threads(1)
    if args.quick:
        teacher_epochs, size, hidden, budgets, seeds = 20, 5000, (256, 256), [2, 5], [0, 1, 2]
    else:
        teacher_epochs, size, hidden, budgets, seeds = 150, 50000, (512, 512, 512), [8, 20, 40], [0, 1, 2]
    budgets = args.budgets or budgets
    temps = args.temperatures
    soft = [f"transfer_kd T={t:g}" for t in temps]
    labelled, test = data.mnist1d("train"), data.mnist1d("test")
    sizes = args.sizes or [size]
    full = data.mnist1d_transfer(max(size, *sizes), seed=0)
    teacher_model = train_teacher(labelled, teacher_epochs, 100)
    teacher = teachers.Frozen(teacher_model)
    teacher_acc = evaluate(teacher_model, test)["accuracy"]

    rows = []
    for n, budget in [(n, b) for n in sizes for b in budgets]:
        transfer = full.subset(n)
        epochs = max(1, round(budget * size / n))  # about the steps of `budget` epochs of the default set
        accs: dict[str, list[float]] = {name: [] for name in [*soft, "hard_label_kd"]}
        for seed in seeds:
            methods = [(name, recipes.transfer_kd(temperature=t)) for name, t in zip(soft, temps, strict=True)]
            for name, method in [*methods, ("hard_label_kd", recipes.hard_label_kd())]:
                torch.manual_seed(seed)
                student = models.MLP(hidden=hidden)
                start = time.perf_counter()
                result = train.fit(student, method, transfer, teacher=teacher, epochs=epochs, batch_size=256,
                                   optim=train.Optim(lr=2e-3, schedule="cosine"), seed=seed, progress=False,
                                   log_every=10_000)
                acc = evaluate(result.student, test)["accuracy"]
                accs[name].append(acc)
                print(json.dumps({"epochs": epochs, "seed": seed, "method": name, "accuracy": acc,
                                  "seconds": time.perf_counter() - start}), file=sys.stderr)
        for name, t in zip(soft, temps, strict=True):
            gaps = [100 * (a - b) for a, b in zip(accs[name], accs["hard_label_kd"], strict=True)]
            rows.append({
                "size": n, "epochs": epochs, "temperature": t,
                "transfer_kd": accs[name], "hard_label_kd": accs["hard_label_kd"],
                "transfer_mean": statistics.mean(accs[name]), "hard_mean": statistics.mean(accs["hard_label_kd"]),
                "gap_points_mean": statistics.mean(gaps), "gap_points_std": statistics.stdev(gaps), "gaps": gaps,
            })
    lines = ["| transfer items | epochs | T | transfer_kd mean | hard_label_kd mean | gap (points), mean | gap std "
             "| per-seed gaps |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['epochs']} | {r['temperature']:g} | {r['transfer_mean']:.4f} | "
                     f"{r['hard_mean']:.4f} | "
                     f"{r['gap_points_mean']:+.2f} | {r['gap_points_std']:.2f} | "
                     + ", ".join(f"{g:+.1f}" for g in r["gaps"]) + " |")
    shown = ", ".join(f"{t:g}" for t in temps)
    body = (f"CNN teacher (test accuracy {teacher_acc:.4f}) -> MLP{hidden} students on generated transfer "
            f"items (the first N of one stream; epochs scaled so that every size gets the steps of the budget on "
            f"{size} items), batch 256, AdamW lr 2e-3 cosine, seeds {seeds}; transfer_kd at T = {shown} "
            "vs hard_label_kd (the same hard_label_kd runs for every T of a budget).\n\n" + "\n".join(lines))
    default = args.temperatures == [4.0] and args.budgets is None and args.sizes is None
    variant = "" if default else " (transfer-set sizes)" if args.sizes else " (temperatures)"
    write_section("soft_vs_hard" + variant + (" (quick)" if args.quick else ""), body)
    print(json.dumps({"benchmark": "soft_vs_hard", "quick": args.quick, "teacher_accuracy": teacher_acc,
                      "rows": rows}))


if __name__ == "__main__":
    main()
