"""Training-free student selection (DisWOT, ``mentor select``) against the accuracy the students reach with KD.

A CNN1d teacher is trained once (supervised, MNIST-1D train 4000, AdamW lr 1e-2 cosine, batch 100). Candidate
students of several families, widths and depths (MLPs and small CNN1d's) are then

1. ranked without training by :func:`mentor.select.rank_candidates` (the DisWOT score on 4 batches of 64 training
   items; the time of this step is the "selection time"), and
2. each distilled from the teacher with ``hinton_kd`` (T=4, alpha=0.9, 4000 labelled items, AdamW lr 1e-3
   cosine, batch 100), starting from the very initialisation that was scored, and evaluated on the 1000-item test
   split.

Reported: Spearman's rank correlation (average ranks for ties) between the score and the KD test accuracy, goal
>= 0.6; the same for the two parts of the score, and, as a baseline any selector should be compared with, for the
parameter count. One seed per student for the accuracies (each student is trained once). One thread.

    .venv/bin/python bench/select_students.py --quick      # < 60 s, short teacher and KD runs
    .venv/bin/python bench/select_students.py              # teacher 150 epochs, KD 30 epochs
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_section

from mentor import data, models, recipes, teachers, train
from mentor.config import RunConfig, config_from_dict
from mentor.eval import evaluate
from mentor.run import build_student
from mentor.select import rank_candidates

WORK = Path(__file__).resolve().parent / "_work"
TEMPERATURE, ALPHA = 4.0, 0.9
LR_TEACHER, LR_STUDENT, BATCH = 1e-2, 1e-3, 100
TEACHER_SEED, STUDENT_SEED = 1234, 0
GOAL = 0.6

CANDIDATES: list[tuple[str, str, dict[str, Any]]] = [
    ("mlp32", "mlp", {"hidden": [32]}),
    ("mlp64x64", "mlp", {"hidden": [64, 64]}),
    ("mlp128", "mlp", {"hidden": [128]}),
    ("mlp256x256", "mlp", {"hidden": [256, 256]}),
    ("mlp512x512x512", "mlp", {"hidden": [512, 512, 512]}),
    ("cnn4", "cnn", {"channels": 4}),
    ("cnn8", "cnn", {"channels": 8}),
    ("cnn16", "cnn", {"channels": 16}),
]


def settings(quick: bool) -> dict[str, int]:
    if quick:
        return {"teacher_epochs": 30, "kd_epochs": 10}
    return {"teacher_epochs": 150, "kd_epochs": 30}


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, tied values sharing the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho: Pearson's correlation of the (tie-averaged) ranks; nan when either side is constant."""
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else float("nan")


def candidate_config(name: str, model: str, args: dict[str, Any]) -> RunConfig:
    return config_from_dict({"name": name, "seed": STUDENT_SEED, "student": {"model": model, "args": args}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short teacher and KD runs (< 60 s)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = settings(args.quick)
    labelled, test = data.mnist1d("train"), data.mnist1d("test")

    start = time.perf_counter()
    torch.manual_seed(TEACHER_SEED)
    teacher = models.CNN1d()
    teacher_dir = WORK / ("select_teacher_quick" if args.quick else "select_teacher")
    train.fit(teacher, recipes.supervised(), labelled, epochs=cfg["teacher_epochs"], batch_size=BATCH,
              optim=train.Optim(lr=LR_TEACHER, schedule="cosine"), seed=TEACHER_SEED, out=teacher_dir,
              progress=False, log_every=10_000)
    teacher_acc = evaluate(teacher, test)["accuracy"]
    print(json.dumps({"teacher_accuracy": teacher_acc, "seconds": time.perf_counter() - start}), file=sys.stderr)

    base = config_from_dict({
        "name": "select_base", "seed": 0, "data": {"train": "labelled", "num_labelled": 4000},
        "teacher": {"checkpoint": str(teacher_dir / "student.safetensors"), "model": "cnn"},
        "recipe": {"name": "hinton_kd", "args": {"temperature": TEMPERATURE, "alpha": ALPHA}},
    })
    candidates = [candidate_config(*c) for c in CANDIDATES]
    start = time.perf_counter()
    ranking = rank_candidates(base, candidates, num_batches=4, batch_size=64)
    selection_seconds = time.perf_counter() - start
    print(json.dumps({"selection_seconds": selection_seconds}), file=sys.stderr)

    frozen = teachers.Frozen(teacher)
    by_name = {r["name"]: r for r in ranking}
    for cand in candidates:
        t0 = time.perf_counter()
        student = build_student(cand)  # the same initialisation that was scored
        result = train.fit(student, recipes.hinton_kd(temperature=TEMPERATURE, alpha=ALPHA), labelled,
                           teacher=frozen, epochs=cfg["kd_epochs"], batch_size=BATCH,
                           optim=train.Optim(lr=LR_STUDENT, schedule="cosine"), seed=STUDENT_SEED, progress=False,
                           log_every=10_000)
        row = by_name[cand.name]
        row["kd_accuracy"] = evaluate(result.student, test)["accuracy"]
        row["kd_seconds"] = time.perf_counter() - t0
        print(json.dumps({k: row[k] for k in ("name", "score", "kd_accuracy", "kd_seconds")}), file=sys.stderr)

    acc = [r["kd_accuracy"] for r in ranking]
    rho = {key: spearman([float(r[key]) for r in ranking], acc)
           for key in ("score", "semantic", "relational", "params")}
    best_by_acc = max(ranking, key=lambda r: r["kd_accuracy"])
    result = {
        "quick": args.quick, "teacher_accuracy": teacher_acc, "candidates": len(ranking),
        "spearman": rho["score"], "spearman_semantic": rho["semantic"], "spearman_relational": rho["relational"],
        "spearman_params_baseline": rho["params"], "goal_spearman": GOAL,
        "goal_met": bool(rho["score"] >= GOAL), "selection_seconds": selection_seconds,
        "top1_selected": ranking[0]["name"], "top1_by_kd_accuracy": best_by_acc["name"],
        "rows": [{k: r[k] for k in ("rank", "name", "params", "score", "semantic", "relational", "kd_accuracy")}
                 for r in ranking],
        **cfg,
    }

    lines = ["| rank (score) | student | params | score | semantic | relational | KD test acc | rank (acc) |",
             "|---|---|---|---|---|---|---|---|"]
    acc_rank = ranks([-a for a in acc])
    for r, ar in zip(ranking, acc_rank, strict=True):
        lines.append(f"| {r['rank']} | {r['name']} | {r['params']} | {r['score']:.4f} | {r['semantic']:.4f} | "
                     f"{r['relational']:.4f} | {r['kd_accuracy']:.4f} | {ar:g} |")
    body = (
        f"CNN1d teacher (supervised, {cfg['teacher_epochs']} epochs, test accuracy {teacher_acc:.4f}); "
        f"{len(ranking)} candidate students ranked at initialisation by `mentor.select.rank_candidates` (DisWOT "
        "score: semantic + relational, 4 batches of 64 training items) and each distilled once (1 seed) with "
        f"hinton_kd (T={TEMPERATURE}, alpha={ALPHA}, 4000 labelled, {cfg['kd_epochs']} epochs, lr {LR_STUDENT}, "
        f"batch {BATCH}) from the scored initialisation. One thread.\n\n" + "\n".join(lines) + "\n\n"
        f"Spearman(score, KD accuracy) = {rho['score']:.3f} (goal >= {GOAL}: {result['goal_met']}); semantic "
        f"alone {rho['semantic']:.3f}, relational alone {rho['relational']:.3f}; parameter count (baseline) "
        f"{rho['params']:.3f}. Selection time {selection_seconds:.2f} s for {len(ranking)} candidates (teacher "
        f"load, data, building and scoring every student). Top pick: {ranking[0]['name']}; best after KD: "
        f"{best_by_acc['name']}."
    )
    write_section("select" + (" (quick)" if args.quick else ""), body)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
