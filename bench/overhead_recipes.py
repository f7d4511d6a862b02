"""Per-recipe step overhead: mentor's loop against a hand-written loop doing the same math, for each catalogue recipe.

For fitnet, attention_transfer, rkd, similarity_preserving, dkd, dist, ofa, simkd and feature_regression (each with
its defaults) one online distillation step on MNIST-1D: a frozen CNN teacher forward, the student forward and
backward, the recipe's terms, AdamW over the student and its projectors / branches, a cosine LR schedule, the same
batches in the same order. mentor runs ``mentor.train.fit(..., max_steps=...)`` with the recipe; the hand loop
registers its own forward hooks on the same modules, applies the projectors itself and sums the same loss
functions from ``mentor.losses`` with the same weights (plain ``F.cross_entropy`` for the labels), so the ratio
measures what mentor's loop, taps and term machinery add per step, not the losses. Students: the MLP 512x3 of the
catalogue; attention_transfer needs feature maps and uses the narrower CNN (8 channels); simkd trains the SimKD
composite in both loops; rkd runs at batch 32 (its angle loss is cubic in the batch: at 128 one step takes about a
second, all of it in the loss). Both loops run in one process, one thread, interleaved (ABBA order). Each step's
end is read at the same point of both loops, after ``zero_grad`` (mentor: a ``Frozen`` teacher whose ``update``,
which the loop calls once per step, reads the clock). The clock is the main thread's CPU time
(``time.thread_time``): with one torch thread every forward and backward kernel runs on it, and time spent
descheduled while other processes use the cores (this machine is shared) is not counted, which wall-clock time
cannot avoid. A run's step time is the median over steps ``warm`` to the last; the table gives the median over
repeats. That both loops compute the same thing is checked on one batch: the gradients of student and
projectors agree to float rounding.

    python bench/overhead_recipes.py            # full (about 8 minutes on one core)
    python bench/overhead_recipes.py --quick    # the same comparison, smaller (< 90 s)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import stable_malloc, write_section

from mentor import data, losses, models, recipes, teachers, train
from mentor.method import Method, compute_terms
from mentor.taps import FeaturePairs, build_projector
from mentor.teachers import as_outputs

LR = 1e-3
MLP_HIDDEN = (512, 512, 512)
Loss = Callable[[Tensor, Tensor, Tensor, list[Tensor], list[Tensor]], Tensor]


@dataclass(frozen=True)
class Tap:
    """One feature of the hand loop: student module, teacher module (``None``: the logit space), inputs flag and
    projector kind; the same as the recipe's :class:`~mentor.method.Feature`, written out by hand."""

    student: str
    teacher: str | None
    inputs: bool
    projector: str | None


@dataclass(frozen=True)
class Case:
    name: str
    method: Callable[[], Method]
    student: Callable[[], nn.Module]
    taps: tuple[Tap, ...]
    loss: Loss  # (student logits, teacher logits, labels, projected student features, teacher features) -> loss
    simkd: bool = False
    batch: int | None = None  # None: the bench's batch size


def _ce(s: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(s, y)


PEN = Tap("classifier", "classifier", True, None)  # the penultimate features, as the relational recipes tap them
CASES: tuple[Case, ...] = (
    Case("fitnet", recipes.fitnet, lambda: models.MLP(hidden=MLP_HIDDEN), (Tap("classifier", "classifier", True,
                                                                                "linear"),),
         lambda s, t, y, fs, ft: _ce(s, y) + losses.hint_mse(fs[0], ft[0])),
    Case("attention_transfer", recipes.attention_transfer, lambda: models.CNN1d(channels=8),
         tuple(Tap(c, c, False, None) for c in ("conv1", "conv2", "conv3")),
         lambda s, t, y, fs, ft: _ce(s, y) + sum((losses.attention_transfer(a, b) for a, b in zip(fs, ft,
                                                                                                   strict=True)),
                                                 torch.zeros(()))),
    Case("rkd", recipes.rkd, lambda: models.MLP(hidden=MLP_HIDDEN), (PEN,),
         lambda s, t, y, fs, ft: _ce(s, y) + 25.0 * losses.rkd_distance(fs[0], ft[0])
         + 50.0 * losses.rkd_angle(fs[0], ft[0]), batch=32),
    Case("similarity_preserving", recipes.similarity_preserving, lambda: models.MLP(hidden=MLP_HIDDEN), (PEN,),
         lambda s, t, y, fs, ft: _ce(s, y) + 3000.0 * losses.similarity_preserving(fs[0], ft[0])),
    Case("dkd", recipes.dkd, lambda: models.MLP(hidden=MLP_HIDDEN), (),
         lambda s, t, y, fs, ft: _ce(s, y) + losses.dkd(s, t, y, alpha=1.0, beta=8.0, temperature=4.0)),
    Case("dist", recipes.dist, lambda: models.MLP(hidden=MLP_HIDDEN), (),
         lambda s, t, y, fs, ft: _ce(s, y) + losses.dist(s, t, beta=1.0, gamma=1.0, temperature=1.0)),
    Case("ofa", lambda: recipes.ofa(stages=["features.1", "features.3", "features.5"]),
         lambda: models.MLP(hidden=MLP_HIDDEN), tuple(Tap(f"features.{i}", None, False, "head") for i in (1, 3, 5)),
         lambda s, t, y, fs, ft: _ce(s, y) + losses.ofa_loss(s, t, y)
         + sum((losses.ofa_loss(b, t, y) for b in fs), torch.zeros(()))),
    Case("simkd", recipes.simkd, lambda: models.MLP(hidden=MLP_HIDDEN),
         (Tap("classifier.teacher_head", "classifier", True, None),),
         lambda s, t, y, fs, ft: losses.hint_mse(fs[0], ft[0]), simkd=True),
    Case("feature_regression", recipes.feature_regression, lambda: models.MLP(hidden=MLP_HIDDEN),
         (Tap("classifier", "classifier", True, "linear"),),
         lambda s, t, y, fs, ft: losses.hint_mse(fs[0], ft[0])),
)


def make_models(case: Case, seed: int, example: Tensor) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(1000 + seed)
    teacher = models.CNN1d().eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    student = case.student()
    if case.simkd:
        student = recipes.simkd_student(student, teacher, example)
    return teacher, student


def check_taps(case: Case, method: Method) -> None:
    """The hand loop's taps are the recipe's features, in order."""
    got = [Tap(f.student, f.teacher, f.inputs, f.projector) for f in method.features]
    if got != list(case.taps):
        raise AssertionError(f"{case.name}: hand taps {case.taps} differ from the recipe's features {got}")


class HandHooks:
    """Forward hooks registered by hand: ``student[i]`` / ``teacher[i]`` hold the latest feature of tap ``i``."""

    def __init__(self, taps: tuple[Tap, ...], student: nn.Module, teacher: nn.Module) -> None:
        self.student: list[Tensor] = [torch.empty(0)] * len(taps)
        self.teacher: list[Tensor] = [torch.empty(0)] * len(taps)
        s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
        self.handles = []
        for i, tap in enumerate(taps):
            for store, mod in ((self.student, s_mods[tap.student]),
                               (self.teacher, t_mods[tap.teacher] if tap.teacher is not None else None)):
                if mod is None:
                    continue
                if tap.inputs:
                    self.handles.append(mod.register_forward_pre_hook(self._pre(store, i)))
                else:
                    self.handles.append(mod.register_forward_hook(self._post(store, i)))

    @staticmethod
    def _pre(store: list[Tensor], i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            store[i] = args[0]
        return hook

    @staticmethod
    def _post(store: list[Tensor], i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            store[i] = out
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def hand_projectors(case: Case, student: nn.Module, teacher: nn.Module, example: Tensor) -> list[nn.Module | None]:
    """Projectors built by hand from the shapes of one dry batch (teacher ``None``: the 10 logits)."""
    hooks = HandHooks(case.taps, student, teacher)
    with torch.no_grad():
        teacher(example)
        student(example)
    hooks.remove()
    return [build_projector(tap.projector, s.shape[1:], t.shape[1:] if tap.teacher is not None else (10,))
            if tap.projector is not None else None
            for tap, s, t in zip(case.taps, hooks.student, hooks.teacher, strict=True)]


def hand_loss(case: Case, hooks: HandHooks, projs: list[nn.Module | None], s_logits: Tensor, t_logits: Tensor,
              y: Tensor) -> Tensor:
    fs = [p(f) if p is not None else f for p, f in zip(projs, hooks.student, strict=True)]
    return case.loss(s_logits, t_logits, y, fs, hooks.teacher)


class TimedFrozen(teachers.Frozen):
    """A frozen teacher whose ``update`` (called by the loop once per step, after ``zero_grad``) reads the thread's
    CPU clock."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.stamps: list[float] = []

    def update(self, student: nn.Module, step: int) -> None:
        self.stamps.append(time.thread_time())


def median_step(stamps: list[float], warm: int) -> float:
    """Median duration of steps ``warm + 1`` .. last from the clock readings at the end of each step."""
    return statistics.median(b - a for a, b in zip(stamps[warm - 1:-1], stamps[warm:], strict=True))


def run_mentor(case: Case, teacher: nn.Module, student: nn.Module, ds: data.TensorData, steps: int, batch: int,
               warm: int, seed: int) -> float:
    timed = TimedFrozen(teacher)
    train.fit(student, case.method(), ds, teacher=timed, epochs=10_000, max_steps=steps, batch_size=batch,
              optim=train.Optim(lr=LR, schedule="cosine"), seed=seed, log_every=steps, progress=False)
    return median_step(timed.stamps, warm)


def run_hand(case: Case, teacher: nn.Module, student: nn.Module, ds: data.TensorData, steps: int, batch: int,
             warm: int, seed: int) -> float:
    projs = hand_projectors(case, student, teacher, ds.x[:2])
    torch.manual_seed(seed)
    params = [p for p in student.parameters() if p.requires_grad]
    params += [p for m in projs if m is not None for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s / steps, 1.0))))
    hooks = HandHooks(case.taps, student, teacher)
    per_epoch = len(ds) // batch
    step, epoch = 0, 0
    stamps: list[float] = []
    student.train()
    while step < steps:
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for b in range(per_epoch):
            idx = perm[b * batch : (b + 1) * batch]
            x, y = ds.x[idx], ds.y[idx]
            with torch.no_grad():
                t_logits = teacher(x)
            s_logits = student(x)
            loss = hand_loss(case, hooks, projs, s_logits, t_logits, y)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            stamps.append(time.thread_time())
            step += 1
            if step == steps:
                break
        epoch += 1
    hooks.remove()
    return median_step(stamps, warm)


def same_math(case: Case, ds: data.TensorData, batch: int) -> float:
    """Relative difference of the gradients (student and projectors) on one batch, mentor's step vs the hand
    loop's, from the same initial weights."""
    method = case.method()
    check_taps(case, method)
    teacher, student = make_models(case, 0, ds.x[:2])
    x, y = ds.x[:batch], ds.y[:batch]
    pairs = FeaturePairs(method.features, student, teacher, x[:2]) if method.features else None
    hand_student = copy.deepcopy(student)
    projs: list[nn.Module | None] = [copy.deepcopy(pairs.projectors[f.name]) if f.projector is not None else None
                                     for f in method.features] if pairs is not None else []
    # mentor: the loop's own pieces (taps around the two forwards, projectors, compute_terms)
    frozen = teachers.Frozen(teacher)
    if pairs is not None:
        with pairs.capture():
            t_out = frozen.targets(x)
            s_out = as_outputs(student(x))
        pairs.merge(s_out, t_out)
    else:
        t_out, s_out = frozen.targets(x), as_outputs(student(x))
    total, _ = compute_terms(method, s_out, t_out, y, 0, {t.name: float(batch) for t in method.terms})
    total.backward()
    mentor_mods = [student] + ([pairs.projectors] if pairs is not None else [])
    # hand
    hooks = HandHooks(case.taps, hand_student, teacher)
    with torch.no_grad():
        t_logits = teacher(x)
    loss = hand_loss(case, hooks, projs, hand_student(x), t_logits, y)
    loss.backward()
    hooks.remove()
    hand_mods = [hand_student] + [m for m in projs if m is not None]

    def grads(mods: list[nn.Module]) -> Tensor:
        return torch.cat([p.grad.flatten() for m in mods for p in m.parameters() if p.grad is not None])

    g_m, g_h = grads(mentor_mods), grads(hand_mods)
    if g_m.shape != g_h.shape:
        raise AssertionError(f"{case.name}: mentor has {g_m.numel()} gradient entries, the hand loop {g_h.numel()}")
    return float((g_m - g_h).abs().max() / g_h.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (< 90 s)")
    parser.add_argument("--only", nargs="+", metavar="RECIPE", choices=[c.name for c in CASES],
                        help="time only these recipes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # Many short interleaved repeats rather than a few long ones: on a shared machine the load changes over seconds,
    # and the median of many mentor/hand pairs run back to back is what stays put.
    steps, warm, reps, batch = (60, 20, 2, 128) if args.quick else (150, 30, 10, 128)
    malloc_fixed = stable_malloc()  # glibc's moving mmap threshold made early repeats page-fault (rkd: 1.2x)
    ds = data.mnist1d("train")
    out: dict[str, object] = {"benchmark": "overhead_recipes", "malloc_thresholds_fixed": malloc_fixed,
                              "quick": args.quick, "steps": steps, "warm": warm,
                              "repeats": reps, "batch": batch, "threads": 1, "results": []}
    results: list[dict[str, object]] = []
    for case in CASES:
        if args.only and case.name not in args.only:
            continue
        case_batch = case.batch or batch
        diff = same_math(case, ds, case_batch)
        mentor_t, hand_t, ratios = [], [], []
        for r in range(reps):
            order = ("mentor", "hand") if r % 2 == 0 else ("hand", "mentor")
            got: dict[str, float] = {}
            for who in order:
                teacher, student = make_models(case, r, ds.x[:2])
                fn = run_mentor if who == "mentor" else run_hand
                got[who] = fn(case, teacher, student, ds, steps, case_batch, warm, r)
            mentor_t.append(got["mentor"])
            hand_t.append(got["hand"])
            ratios.append(got["mentor"] / got["hand"])
        row: dict[str, object] = {
            "recipe": case.name,
            "student": ("CNN1d(8)" if isinstance(case.student(), models.CNN1d)
                        else "MLP" + "x".join(map(str, MLP_HIDDEN))) + (" + SimKD head" if case.simkd else ""),
            "batch": case_batch,
            "mentor_ms_per_step": statistics.median(mentor_t) * 1e3,
            "hand_ms_per_step": statistics.median(hand_t) * 1e3,
            "median_of_ratios": statistics.median(ratios),
            "ratio_of_medians": statistics.median(mentor_t) / statistics.median(hand_t),
            "ratios": [round(x, 4) for x in ratios],
            "grad_rel_diff": diff,
        }
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    out["results"] = results
    worst = max(float(r["median_of_ratios"]) for r in results)  # type: ignore[arg-type]
    out["goal"] = {"worst_median_ratio": worst, "all_within_1.05": worst <= 1.05}
    lines = ["| recipe | student | batch | mentor ms/step | hand ms/step | ratio (median of ratios) | ratio of medians "
             "| gradient rel. diff |", "|---|---|---|---|---|---|---|---|"]
    for row in results:
        lines.append(f"| {row['recipe']} | {row['student']} | {row['batch']} | {row['mentor_ms_per_step']:.3f} | "
                     f"{row['hand_ms_per_step']:.3f} | {row['median_of_ratios']:.4f} | {row['ratio_of_medians']:.4f} "
                     f"| {row['grad_rel_diff']:.1e} |")
    body = (f"One online distillation step per recipe (CNN teacher, recipe defaults, AdamW + cosine), {steps} steps, "
            f"median step time (main thread CPU time) from step {warm}, {reps} interleaved repeats, 1 thread; the "
            "hand loop hooks the same modules itself and sums the same `mentor.losses` terms; glibc malloc thresholds "
            f"fixed at 1 GiB (`stable_malloc`): {malloc_fixed}. Goal: ratio <= 1.05 "
            f"(worst median ratio {worst:.4f}).\n\n" + "\n".join(lines))
    if not args.only:
        write_section("overhead_recipes" + (" (quick)" if args.quick else ""), body)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
