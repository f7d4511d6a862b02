"""KD, DKD and DIST on MNIST-1D, each with its hyperparameters picked on held-out data with the same budget.

The catalogue (``catalogue_mnist1d.py``) runs every method at the papers' default weights; on CNN -> narrower CNN
that put DKD (beta=8, T=4) and DIST (beta=gamma=2, T=4) below KD (T=4, alpha=0.9). The DKD paper (and mdistiller)
sets beta per teacher-student pair, so this script gives KD, DKD and DIST the same tuning budget:

1. The teacher is the catalogue's (``catalogue_mnist1d.train_teacher``: ``CNN1d``, 25 channels, supervised on the
   4000 labelled items, 150 epochs).
2. ``mentor.data.stratified_split`` (seed 0) draws 500 validation items (50 per class) from the 4000; the other
   3500 are the tuning training set. Each method runs a grid of 8 configurations, 2 seeds each (0, 1), trained on
   the 3500 and scored on the 500, with the catalogue's training (60 epochs, batch 100, AdamW cosine, the pair's
   learning rate):

   * KD (``hinton_kd``): temperature in {1, 2, 4, 8} x alpha in {0.5, 0.9};
   * DKD (``dkd``, alpha=1, weight warmed up over the first 20 epochs): temperature in {1, 4} x beta in {1, 2, 4, 8};
   * DIST (``dist``): temperature in {1, 4} x beta=gamma in {0.5, 1, 2, 4}.

   Scratch (``supervised``) has nothing to tune; it runs on the same split for reference. Each method's pick is
   the configuration of highest mean validation accuracy (ties: the first in the grid order above).
3. Each pick (and scratch) is retrained on all 4000 labelled items with seeds 0, 1, 2 and scored on the test set.

Finished runs are appended to ``bench/_work/catalogue_tuned/{full,quick}.jsonl`` (keyed by the protocol, the
teacher's test accuracy, the pair, the phase, the method, its configuration and the seed), so an interrupted
command picks up where it stopped; ``--fresh`` ignores the cache. Each pair gets its own RESULTS.md section.

    python bench/catalogue_tuned.py                     # CNN -> narrower CNN (about 10 minutes on one core)
    python bench/catalogue_tuned.py --pairs mlp         # CNN -> MLP(512, 512, 512), lr 1e-3 (about 22 minutes)
    python bench/catalogue_tuned.py --pairs mlp cnn     # both
    python bench/catalogue_tuned.py --quick             # the same comparison, smaller (< 90 s)
    python bench/catalogue_tuned.py --test-seeds 10     # the same picks, retrained with seeds 0-9
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_section
from catalogue_mnist1d import student_pairs, train_teacher

from mentor import data, recipes, teachers, train
from mentor.eval import evaluate
from mentor.method import Method

CACHE_DIR = Path(__file__).resolve().parent / "_work" / "catalogue_tuned"
PAIRS = {"cnn": "CNN -> narrower CNN", "mlp": "CNN -> MLP"}
SPLIT_SEED = 0
GRID_SEEDS = [0, 1]
TEST_SEEDS = [0, 1, 2]
BATCH = 100
DKD_WARMUP_EPOCHS = 20

Config = dict[str, float]


def grids() -> dict[str, list[Config]]:
    """Each method's configurations, in the order that breaks ties."""
    return {
        "scratch": [{}],
        "KD": [{"temperature": t, "alpha": a} for t in (1.0, 2.0, 4.0, 8.0) for a in (0.5, 0.9)],
        "DKD": [{"temperature": t, "beta": b} for t in (1.0, 4.0) for b in (1.0, 2.0, 4.0, 8.0)],
        "DIST": [{"temperature": t, "beta": b, "gamma": b} for t in (1.0, 4.0) for b in (0.5, 1.0, 2.0, 4.0)],
    }


def make_method(name: str, config: Config, steps_per_epoch: int) -> Method:
    """The recipe of ``name`` at ``config`` (DKD: alpha=1, warm-up over the first 20 epochs, as in the catalogue)."""
    if name == "scratch":
        return recipes.supervised()
    if name == "KD":
        return recipes.hinton_kd(temperature=config["temperature"], alpha=config["alpha"])
    if name == "DKD":
        return recipes.dkd(alpha=1.0, beta=config["beta"], temperature=config["temperature"],
                           warmup_steps=DKD_WARMUP_EPOCHS * steps_per_epoch)
    if name == "DIST":
        return recipes.dist(beta=config["beta"], gamma=config["gamma"], temperature=config["temperature"])
    raise ValueError(f"unknown method {name!r}")


def config_text(config: Config) -> str:
    if not config:
        return "-"
    short = {"temperature": "T"}
    if "gamma" in config and config["gamma"] == config["beta"]:
        config = {k: v for k, v in config.items() if k != "gamma"}
        short["beta"] = "beta=gamma"
    return ", ".join(f"{short.get(k, k)}={v:g}" for k, v in config.items())


def split_validation(labelled: data.TensorData, n_val: int) -> tuple[data.TensorData, data.TensorData]:
    """``(train, validation)``: ``stratified_split`` draws the validation items (the same count of every class)."""
    index = data.TensorData(torch.arange(len(labelled), dtype=torch.float32).unsqueeze(1), labelled.y)
    val_index, train_index = (part.x[:, 0].long() for part in data.stratified_split(index, n_val, seed=SPLIT_SEED))
    return (data.TensorData(labelled.x[train_index], labelled.y[train_index]),
            data.TensorData(labelled.x[val_index], labelled.y[val_index]))


class RunCache:
    """Finished runs as JSON lines; a torn last line (an interrupted write) is skipped."""

    def __init__(self, path: Path, fresh: bool) -> None:
        self.path = path
        self.runs: dict[str, dict[str, Any]] = {}
        if fresh and path.exists():
            path.unlink()
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.runs[row["key"]] = row
        path.parent.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(fields: dict[str, Any]) -> str:
        return json.dumps(fields, sort_keys=True)

    def get(self, fields: dict[str, Any]) -> dict[str, Any] | None:
        return self.runs.get(self.key(fields))

    def put(self, fields: dict[str, Any], result: dict[str, Any]) -> None:
        row = {"key": self.key(fields), **fields, **result}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.runs[row["key"]] = row


def run_one(cache: RunCache, protocol: dict[str, Any], pair: str, phase: str, name: str, config: Config, seed: int,
            make_student: Callable[[], torch.nn.Module], lr: float, train_data: data.TensorData,
            eval_data: data.TensorData, teacher: teachers.Frozen, epochs: int) -> dict[str, Any]:
    """One training run (or its cached result): ``{"accuracy", "seconds", "cached"}``."""
    fields = {**protocol, "pair": pair, "phase": phase, "method": name, "config": config, "seed": seed}
    hit = cache.get(fields)
    if hit is not None:
        return {"accuracy": hit["accuracy"], "seconds": hit["seconds"], "cached": True}
    method = make_method(name, config, len(train_data) // BATCH)
    torch.manual_seed(seed)
    student = make_student()
    start = time.perf_counter()
    result = train.fit(student, method, train_data, teacher=teacher if method.needs_teacher else None,
                       epochs=epochs, batch_size=BATCH, optim=train.Optim(lr=lr, schedule="cosine"), seed=seed,
                       progress=False, log_every=10_000)
    seconds = time.perf_counter() - start
    accuracy = evaluate(result.student, eval_data)["accuracy"]
    cache.put(fields, {"accuracy": accuracy, "seconds": seconds})
    print(json.dumps({"pair": pair, "phase": phase, "method": name, "config": config, "seed": seed,
                      "accuracy": accuracy, "seconds": round(seconds, 1)}), file=sys.stderr)
    return {"accuracy": accuracy, "seconds": seconds, "cached": False}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the same comparison, smaller (< 90 s)")
    parser.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=["cnn"],
                        help="cnn: CNN -> narrower CNN (default); mlp: CNN -> MLP(512, 512, 512)")
    parser.add_argument("--fresh", action="store_true", help="ignore (and delete) the cache of finished runs")
    parser.add_argument("--test-seeds", type=int, default=len(TEST_SEEDS), metavar="N",
                        help=f"retrain each pick with seeds 0 .. N-1 (default {len(TEST_SEEDS)}); the picks "
                             "themselves do not change")
    args = parser.parse_args()
    if args.test_seeds < 2:
        parser.error(f"--test-seeds must be >= 2 (a spread needs two), got {args.test_seeds}")
    test_seeds = list(range(args.test_seeds))
    torch.set_num_threads(1)
    wall_start = time.perf_counter()
    teacher_epochs, epochs, n_labelled, n_val = (20, 3, 1000, 200) if args.quick else (150, 60, 4000, 500)
    mlp_hidden = (64, 64) if args.quick else (512, 512, 512)

    labelled, test = data.mnist1d("train", n_labelled), data.mnist1d("test")
    tune_train, val = split_validation(labelled, n_val)
    teacher_model = train_teacher(labelled, teacher_epochs, BATCH)
    teacher = teachers.Frozen(teacher_model)
    teacher_acc = evaluate(teacher_model, test)["accuracy"]
    print(json.dumps({"teacher_accuracy": teacher_acc}), file=sys.stderr)

    protocol = {"quick": args.quick, "teacher_epochs": teacher_epochs, "epochs": epochs, "n_labelled": n_labelled,
                "n_val": n_val, "split_seed": SPLIT_SEED, "batch": BATCH, "teacher_accuracy": teacher_acc,
                "mlp_hidden": list(mlp_hidden)}
    cache = RunCache(CACHE_DIR / ("quick.jsonl" if args.quick else "full.jsonl"), args.fresh)
    all_pairs = student_pairs(mlp_hidden)
    report: dict[str, Any] = {}
    for short in args.pairs:
        pair = PAIRS[short]
        make_student, lr = all_pairs[pair]
        pair_seconds = 0.0
        fresh_runs = 0

        def run(phase: str, name: str, config: Config, seed: int, train_data: data.TensorData,
                eval_data: data.TensorData, make_student: Callable[[], torch.nn.Module] = make_student,
                lr: float = lr, pair: str = pair) -> float:
            nonlocal pair_seconds, fresh_runs
            out = run_one(cache, protocol, pair, phase, name, config, seed, make_student, lr, train_data,
                          eval_data, teacher, epochs)
            pair_seconds += out["seconds"]
            fresh_runs += not out["cached"]
            return out["accuracy"]

        grid_rows: dict[str, list[dict[str, Any]]] = {}
        picks: dict[str, dict[str, Any]] = {}
        for name, configs in grids().items():
            rows = []
            for config in configs:
                accs = [run("val", name, config, seed, tune_train, val) for seed in GRID_SEEDS]
                rows.append({"config": config, "val_accs": accs, "val_mean": statistics.mean(accs)})
            grid_rows[name] = rows
            best = max(rows, key=lambda r: r["val_mean"])  # max keeps the first of equal means
            picks[name] = {"config": best["config"], "val_mean": best["val_mean"]}

        results: dict[str, dict[str, Any]] = {}
        for name, pick in picks.items():
            accs = [run("test", name, pick["config"], seed, labelled, test) for seed in test_seeds]
            results[name] = {**pick, "test_accs": accs, "test_mean": statistics.mean(accs),
                             "test_std": statistics.stdev(accs)}

        kd = results["KD"]["test_mean"]
        goals = {"DKD - KD (points)": round(100 * (results["DKD"]["test_mean"] - kd), 2),
                 "DIST - KD (points)": round(100 * (results["DIST"]["test_mean"] - kd), 2),
                 "DKD >= KD": results["DKD"]["test_mean"] >= kd, "DIST >= KD": results["DIST"]["test_mean"] >= kd}
        report[pair] = {"lr": lr, "results": results, "goals": goals, "grid": grid_rows,
                        "train_seconds": pair_seconds, "fresh_runs": fresh_runs}

        seeds_text = ("seeds " + ", ".join(map(str, test_seeds))) if len(test_seeds) <= 3 else \
            f"seeds 0-{test_seeds[-1]}"
        lines = [f"| method | picked config | val acc of pick | test acc ({seeds_text}) |", "|---|---|---|---|"]
        for name, r in results.items():
            lines.append(f"| {name} | {config_text(r['config'])} | {_pct(r['val_mean'])} | "
                         f"{_pct(r['test_mean'])} ± {_pct(r['test_std'])} |")
        grid_lines = ["| method | config | val acc (mean) | seed 0 | seed 1 | picked |", "|---|---|---|---|---|---|"]
        for name, rows in grid_rows.items():
            for r in rows:
                grid_lines.append(f"| {name} | {config_text(r['config'])} | {_pct(r['val_mean'])} | "
                                  + " | ".join(_pct(a) for a in r["val_accs"])
                                  + f" | {'yes' if r['config'] == picks[name]['config'] else ''} |")
        body = (f"Pair {pair} (student lr {lr:g}); CNN teacher test accuracy {_pct(teacher_acc)} "
                f"({teacher_epochs} epochs on the {n_labelled} labelled items, as in catalogue_mnist1d). Each method's "
                f"configuration picked by mean validation accuracy over seeds {GRID_SEEDS} (trained on "
                f"{len(tune_train)} items, scored on {len(val)} held-out items drawn by "
                f"`stratified_split(seed={SPLIT_SEED})`), then retrained on all {n_labelled} labelled items with "
                f"seeds {test_seeds}; MNIST-1D test accuracy (%), mean ± std. Every run: {epochs} epochs, batch "
                f"{BATCH}, AdamW cosine at lr {lr:g}. Same grid size (8 configurations x 2 seeds) for KD, DKD and "
                f"DIST; DKD alpha=1 with the weight warmed up over the first {DKD_WARMUP_EPOCHS} epochs. Scratch has "
                "no hyperparameter (its validation accuracy is for reference). The teacher was trained on all "
                f"{n_labelled} items, validation items included (as in the catalogue); the students never see them "
                f"while tuning. Training time of this pair's runs: {pair_seconds / 60:.1f} min on one thread.\n\n"
                + "\n".join(lines)
                + "\n\nGoal (DKD and DIST at least match KD, by test mean): `" + json.dumps(goals) + "`"
                + "\n\nValidation accuracy (%) of every configuration:\n\n" + "\n".join(grid_lines))
        more = f" ({len(test_seeds)} test seeds)" if test_seeds != TEST_SEEDS else ""
        write_section(f"catalogue_tuned: {pair}{more}" + (" (quick)" if args.quick else ""), body)

    summary = {pair: {"teacher_accuracy": teacher_acc,
                      "picks": {n: {"config": r["config"], "val_mean": r["val_mean"], "test_mean": r["test_mean"],
                                    "test_std": r["test_std"], "test_accs": r["test_accs"]}
                                for n, r in rep["results"].items()},
                      "goals": rep["goals"], "train_seconds": round(rep["train_seconds"], 1),
                      "fresh_runs": rep["fresh_runs"]}
               for pair, rep in report.items()}
    print(json.dumps({"benchmark": "catalogue_tuned", "quick": args.quick, "pairs": args.pairs,
                      "wall_seconds": round(time.perf_counter() - wall_start, 1), "results": summary}))


if __name__ == "__main__":
    main()
