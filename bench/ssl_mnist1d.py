"""Semi-supervised MNIST-1D: 400 labels (40 per class), the rest unlabelled, on the same CNN.

Rows (a function each in :data:`ROWS`, so more methods can be added, e.g. Noisy Student): supervised-only without
augmentation (``supervised_plain``) and with the weak augmentation the SSL methods' labelled batch gets
(``supervised``, the baseline the deltas refer to), ``mean_teacher``, ``fixmatch``, ``freematch``. Two unlabelled
pools: the other 3600 training items (``rest``) and 50k generated MNIST-1D items (``transfer``).
Every run has the same student (``mentor.models.CNN1d``), optimiser (AdamW, cosine), number of steps and labelled
batch (64; the SSL methods add ``mu = 7`` unlabelled items per labelled one); 3 seeds (model init, labelled subset
draw and data order all follow the seed). Accuracy is on the 1000 test items, of the student (``mean_teacher``: the
EMA teacher's too).

Then the step overhead of ``mean_teacher`` and ``fixmatch``: mentor's loop against a hand-written loop with the
same math (the same views from :mod:`mentor.views`, the same batches, EMA update, threshold mask and losses), one
thread, interleaved (ABBA), each run's step time the median over its steady-state steps (each step's end read at
the same point: mentor's teacher ``update``, which the loop calls once per step), the ratio of the medians over
repeats.

    python bench/ssl_mnist1d.py            # full
    python bench/ssl_mnist1d.py --quick    # fewer steps, 1 seed, one pool
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import inspect
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import stable_malloc, write_section

from mentor import atomic, data, models, recipes, schedules, teachers, train
from mentor.semi import SemiData
from mentor.views import Views, weak

LR, BATCH, MU = 3e-3, 64, 7
WORK = Path(__file__).resolve().parent / "_work" / "ssl_mnist1d"


def _row_version(row: Callable[..., Any]) -> str:
    """A short hash of a row's code and of the shared training call, so that a stored row is reused only while
    neither changed (the package's own code is not hashed: rerun with --fresh after changing it)."""
    text = inspect.getsource(row) + inspect.getsource(_fit)
    return hashlib.sha256(text.encode()).hexdigest()[:10]
Row = Callable[[int, data.TensorData, data.TensorData, data.TensorData, int], dict[str, float]]


def _fit(method: Any, seed: int, lab: data.TensorData, test: data.TensorData, steps: int,
         pool: data.TensorData | None) -> train.FitResult:
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"unlabelled": pool, "mu": MU} if pool is not None else {}
    return train.fit(models.CNN1d(), method, lab, eval_data=test, epochs=10**6, max_steps=steps, batch_size=BATCH,
                     optim=train.Optim(lr=LR, schedule="cosine"), seed=seed, progress=False, eval_every=10**6,
                     **kwargs)


def row_supervised_plain(seed: int, lab: data.TensorData, pool: data.TensorData, test: data.TensorData,
                         steps: int) -> dict[str, float]:
    """Cross-entropy on the labelled items only, no augmentation."""
    return {"accuracy": _fit(recipes.supervised(), seed, lab, test, steps, None).metrics["accuracy"]}


def row_supervised(seed: int, lab: data.TensorData, pool: data.TensorData, test: data.TensorData,
                   steps: int) -> dict[str, float]:
    """Cross-entropy on the labelled items only (weakly augmented, as the SSL methods' labelled batch)."""
    method = dataclasses.replace(recipes.supervised(), views=Views(student=weak("signal")))
    return {"accuracy": _fit(method, seed, lab, test, steps, None).metrics["accuracy"]}


def row_mean_teacher(seed: int, lab: data.TensorData, pool: data.TensorData, test: data.TensorData,
                     steps: int) -> dict[str, float]:
    result = _fit(recipes.mean_teacher(rampup_steps=steps // 3), seed, lab, test, steps, pool)
    return {"accuracy": result.metrics["accuracy"], "teacher_accuracy": result.metrics["teacher_accuracy"]}


def row_fixmatch(seed: int, lab: data.TensorData, pool: data.TensorData, test: data.TensorData,
                 steps: int) -> dict[str, float]:
    return {"accuracy": _fit(recipes.fixmatch(tau=TAU), seed, lab, test, steps, pool).metrics["accuracy"]}


def row_fixmatch_tau08(seed: int, lab: data.TensorData, pool: data.TensorData, test: data.TensorData,
                       steps: int) -> dict[str, float]:
    """FixMatch with a 0.8 threshold (the paper's is 0.95): on MNIST-1D at 400 labels the student is rarely 95%
    confident early on; 0.8 was picked from one probe run (seed 0), so it carries a small selection bias."""
    return {"accuracy": _fit(recipes.fixmatch(tau=0.8), seed, lab, test, steps, pool).metrics["accuracy"]}


def row_freematch(seed: int, lab: data.TensorData, pool: data.TensorData, test: data.TensorData,
                  steps: int) -> dict[str, float]:
    return {"accuracy": _fit(recipes.freematch(), seed, lab, test, steps, pool).metrics["accuracy"]}


def row_noisy_student(seed: int, lab: data.TensorData, pool: data.TensorData, test: data.TensorData,
                      steps: int) -> dict[str, float]:
    """Noisy Student, 3 generations (``bench/online.py``'s ``noisy_student_rows``): generation 0 is the same CNN
    trained on the labelled items alone with the weak view (as the ``supervised`` row), each later generation a
    fresh CNN (dropout 0.3, the weak view of its input) on labelled + soft pseudo-labelled items; ``steps`` steps of
    batch 64 per generation (4 x ``steps`` in all). ``accuracy`` is generation 3's."""
    from online import noisy_student_rows

    def cnn(s: int) -> nn.Module:
        torch.manual_seed(s)
        return models.CNN1d(dropout=0.3)

    items = data.TensorData(torch.cat([lab.x, pool.x]),
                            torch.cat([lab.y, torch.full_like(pool.y, data.UNLABELLED)]))
    gen0 = dataclasses.replace(recipes.supervised(), views=Views(student=weak("signal")))  # = the 'supervised' row
    res = noisy_student_rows(items, test, cnn, [seed], generations=3, steps=steps, batch_size=BATCH, lr=LR,
                             gen0_method=gen0)
    accs = {f"gen{g['generation']}_accuracy": g["mean"] for g in res["generations"]}
    return {"accuracy": accs["gen3_accuracy"], **accs}


TAU = 0.95
ROWS: dict[str, Row] = {
    "supervised_plain": row_supervised_plain,
    "supervised": row_supervised,
    "mean_teacher": row_mean_teacher,
    "fixmatch": row_fixmatch,
    "fixmatch_tau0.8": row_fixmatch_tau08,
    "freematch": row_freematch,
    "noisy_student": row_noisy_student,
}
"""One function per row: ``row(seed, labelled, pool, test, steps) -> {"accuracy": ..., ...}``."""


# ------------------------------------------------------------------------------------------------- overhead


class _ClockEMA(teachers.EMA):
    """An EMA teacher that records the clock at each update (the loop calls it once per step, after zero_grad)."""

    def __init__(self, student: nn.Module, decay: Any, clock: list[float]) -> None:
        super().__init__(student, decay=decay)
        self.clock = clock

    def update(self, student: nn.Module, step: int) -> None:
        super().update(student, step)
        self.clock.append(time.perf_counter())


class _ClockSelf(teachers.Self):
    def __init__(self, student: nn.Module, clock: list[float]) -> None:
        super().__init__(student)
        self.clock = clock

    def update(self, student: nn.Module, step: int) -> None:
        self.clock.append(time.perf_counter())


def _median_step(clock: list[float], warm: int) -> float:
    return statistics.median(b - a for a, b in zip(clock[warm:-1], clock[warm + 1:], strict=True))


def _mentor_steps(which: str, seed: int, lab: data.TensorData, pool: data.TensorData, steps: int,
                  warm: int) -> float:
    clock: list[float] = []
    torch.manual_seed(seed)
    student = models.CNN1d()
    if which == "mean_teacher":
        method = recipes.mean_teacher(rampup_steps=steps // 3)
        teacher: Any = _ClockEMA(student, schedules.EMAWarmup(0.99), clock)
    else:
        method = recipes.fixmatch(tau=TAU)
        teacher = _ClockSelf(student, clock)
    train.fit(student, method, lab, unlabelled=pool, mu=MU, teacher=teacher, epochs=10**6, max_steps=steps,
              batch_size=BATCH, optim=train.Optim(lr=LR, schedule="cosine"), seed=seed, progress=False,
              log_every=10**6)
    return _median_step(clock, warm)


def _hand_steps(which: str, seed: int, lab: data.TensorData, pool: data.TensorData, steps: int, warm: int) -> float:
    """The same step written out: batches from the same order, views, teacher, losses, AdamW, cosine LR, EMA."""
    torch.manual_seed(seed)
    student = models.CNN1d()
    method = recipes.mean_teacher(rampup_steps=steps // 3) if which == "mean_teacher" else recipes.fixmatch(tau=TAU)
    views = method.views
    ema = copy.deepcopy(student).eval() if which == "mean_teacher" else None
    if ema is not None:
        for p in ema.parameters():
            p.requires_grad_(False)
    ramp = schedules.RampUp(30.0, steps // 3)
    combined = data.TensorData(torch.cat([lab.x, pool.x]), torch.cat([lab.y, torch.full((len(pool),), -1)]))
    semi = SemiData(len(lab), len(pool), BATCH, MU, 1, seed)
    opt = torch.optim.AdamW(student.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s / steps, 1.0))))
    g = (1 + MU) * BATCH
    n_lab, n_unl = float(BATCH), float(MU * BATCH)
    clock: list[float] = []
    step, epoch = 0, 0
    student.train()
    while step < steps:
        order = semi.epoch_order(epoch)
        for b in range(semi.steps_per_epoch):
            idx = order[b * g : (b + 1) * g]
            x, y = combined.x[idx], combined.y[idx]
            labelled = y >= 0
            with torch.no_grad():
                x_t = views.view(Views.TEACHER, x, idx, step, seed)
            x_s = views.view(Views.STUDENT, x, idx, step, seed)
            if which == "fixmatch":
                x_s = torch.where(labelled[:, None], x_t, x_s)
                with torch.no_grad():
                    probs = torch.softmax(student(x_t).float(), dim=-1)
                conf, pseudo = probs.max(dim=-1)
                w = ((conf >= TAU) & ~labelled).float()
                z = student(x_s)
                ce = F.cross_entropy(z, y.clamp(min=0), reduction="none")
                loss = (ce * labelled).sum() / n_lab + (F.cross_entropy(z, pseudo, reduction="none") * w).sum() / n_unl
            else:
                assert ema is not None
                with torch.no_grad():
                    t_logits = ema(x_t)
                z = student(x_s)
                ce = F.cross_entropy(z, y.clamp(min=0), reduction="none")
                mse = (torch.softmax(z, -1) - torch.softmax(t_logits, -1)).square().mean(-1)
                loss = (ce * labelled).sum() / n_lab + ramp(step) * mse.sum() / g
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                d = min(1 - 1 / (step + 2), 0.99)
                with torch.no_grad():
                    for pe, ps in zip(ema.parameters(), student.parameters(), strict=True):
                        pe.lerp_(ps, 1 - d)
            clock.append(time.perf_counter())
            step += 1
            if step == steps:
                break
        epoch += 1
    return _median_step(clock, warm)


def overhead(lab: data.TensorData, pool: data.TensorData, steps: int, warm: int, reps: int) -> list[dict[str, Any]]:
    rows = []
    for which in ("mean_teacher", "fixmatch"):
        m_times, h_times = [], []
        for r in range(reps):
            order = ("mentor", "hand") if r % 2 == 0 else ("hand", "mentor")
            for who in order:
                fn = _mentor_steps if who == "mentor" else _hand_steps
                (m_times if who == "mentor" else h_times).append(fn(which, r, lab, pool, steps, warm))
        ratio = statistics.median(m_times) / statistics.median(h_times)
        rows.append({"recipe": which, "mentor_ms": 1e3 * statistics.median(m_times),
                     "hand_ms": 1e3 * statistics.median(h_times), "ratio": ratio})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ------------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps, 1 seed, the 'rest' pool only")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run")
    parser.add_argument("--no-overhead", action="store_true", help="skip the step-overhead comparison")
    parser.add_argument("--overhead-only", action="store_true", help="only the step-overhead comparison")
    parser.add_argument("--pool-rows", nargs="*", default=None,
                        help="rows run on the 50k generated pool too (default: all; supervised rows use no pool)")
    parser.add_argument("--rows", nargs="+", default=None, choices=list(ROWS), metavar="ROW",
                        help=f"run only these rows (default: all of {', '.join(ROWS)})")
    parser.add_argument("--fresh", action="store_true",
                        help="rerun rows that bench/_work holds from an earlier run with the same settings and code")
    parser.add_argument("--pools", nargs="+", default=None, choices=["rest", "transfer"],
                        help="unlabelled pools (default: both; quick: rest)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = args.steps or (150 if args.quick else 3000)
    seeds = [0] if args.quick else [0, 1, 2]
    pools = ["rest"] if args.quick or args.overhead_only else ["rest", "transfer"]
    pools = args.pools or pools
    test = data.mnist1d("test")
    full = data.mnist1d("train")
    out: dict[str, Any] = {"benchmark": "ssl_mnist1d", "quick": args.quick, "steps": steps, "seeds": seeds,
                           "labels": 400, "mu": MU, "batch": BATCH, "lr": LR, "threads": 1, "results": []}
    started = time.perf_counter()
    transfer = data.mnist1d_transfer(50_000) if "transfer" in pools else None
    for pool_name in pools:
        for name, row in ROWS.items():
            if args.overhead_only:
                break
            if args.rows is not None and name not in args.rows:
                continue
            if pool_name == "transfer" and (name.startswith("supervised") or
                                            (args.pool_rows is not None and name not in args.pool_rows)):
                continue  # the supervised rows use no pool: their 'rest' result stands for both
            done = WORK / f"{pool_name}_{name}_{steps}_{'-'.join(map(str, seeds))}_{_row_version(row)}.json"
            if done.exists() and not args.fresh:  # the same row, config and code finished earlier: reuse it
                res = dict(json.loads(done.read_text()), reused=True)
                out["results"].append(res)
                print(json.dumps(res), flush=True)
                continue
            accs: dict[str, list[float]] = {}
            t0 = time.perf_counter()
            for seed in seeds:
                lab, rest = data.stratified_split(full, 400, seed=seed)
                pool = rest if pool_name == "rest" else transfer
                assert pool is not None
                for k, v in row(seed, lab, pool, test, steps).items():
                    accs.setdefault(k, []).append(float(v))
            res = {"pool": pool_name, "method": name, "seconds": round(time.perf_counter() - t0, 1),
                   **{k: v for k, v in accs.items()},
                   **{f"{k}_mean": statistics.mean(v) for k, v in accs.items()},
                   **{f"{k}_std": statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in accs.items()}}
            out["results"].append(res)
            print(json.dumps(res), flush=True)
            WORK.mkdir(parents=True, exist_ok=True)
            atomic.write_text(done, json.dumps(res))
    if not args.no_overhead:
        out["malloc_thresholds_fixed"] = stable_malloc()  # else glibc's moving mmap threshold skews early repeats
        lab, rest = data.stratified_split(full, 400, seed=0)
        o_steps, warm, reps = (60, 15, 2) if args.quick else (200, 40, 4)
        out["overhead"] = overhead(lab, rest, o_steps, warm, reps)
    out["total_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out))
    suffix = (" (quick)" if args.quick else "") + (f" ({steps} steps)" if args.steps is not None else "")
    write_section("ssl_mnist1d_overhead" if args.overhead_only else "ssl_mnist1d" + suffix,
                  _markdown(out))


def _markdown(out: dict[str, Any]) -> str:
    lines = [f"MNIST-1D, 400 labels (40 per class, drawn per seed), CNN1d, AdamW lr {out['lr']} cosine, "
             f"{out['steps']} steps, labelled batch {out['batch']} (+ mu = {out['mu']} unlabelled per labelled item "
             f"for the SSL rows), seeds {out['seeds']}; test accuracy, mean +- std over seeds.", "",
             "| unlabelled pool | method | accuracy | EMA teacher accuracy | vs supervised (weak aug.) "
             "| vs supervised (no aug.) | seconds (all seeds) |",
             "|---|---|---|---|---|---|---|"]
    base = {r["pool"]: r["accuracy_mean"] for r in out["results"] if r["method"] == "supervised"}
    plain = {r["pool"]: r["accuracy_mean"] for r in out["results"] if r["method"] == "supervised_plain"}
    for pools in (base, plain):  # the supervised rows use no pool: their 'rest' value stands for both pools
        if "rest" in pools:
            pools.setdefault("transfer", pools["rest"])
    for r in out["results"]:
        teacher = (f"{100 * r['teacher_accuracy_mean']:.1f} +- {100 * r['teacher_accuracy_std']:.1f}"
                   if "teacher_accuracy_mean" in r else "")
        delta = 100 * (r["accuracy_mean"] - base[r["pool"]]) if r["pool"] in base else float("nan")
        delta_plain = 100 * (r["accuracy_mean"] - plain[r["pool"]]) if r["pool"] in plain else float("nan")
        pool = "other 3600 training items" if r["pool"] == "rest" else "50k generated items"
        lines.append(f"| {pool} | {r['method']} | {100 * r['accuracy_mean']:.1f} +- {100 * r['accuracy_std']:.1f} "
                     f"| {teacher} | {delta:+.1f} | {delta_plain:+.1f} | {r['seconds']} |")
    if "overhead" in out:
        lines += ["", "Step overhead vs a hand-written loop with the same math (median step, ratio of medians; glibc "
                  f"malloc thresholds fixed at 1 GiB: {out.get('malloc_thresholds_fixed')}):", "",
                  "| recipe | mentor ms/step | hand ms/step | ratio |", "|---|---|---|---|"]
        for o in out["overhead"]:
            lines.append(f"| {o['recipe']} | {o['mentor_ms']:.2f} | {o['hand_ms']:.2f} | {o['ratio']:.3f} |")
    lines += ["", f"Total {out['total_seconds']} s on 1 thread."]
    reused = [f"{r['method']} ({r['pool']})" for r in out["results"] if r.get("reused")]
    if reused:
        lines.append(f"Reused from an earlier run with the same settings and row code (bench/_work/ssl_mnist1d; "
                     f"its seconds are that run's): {', '.join(reused)}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
