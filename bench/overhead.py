"""Per-step overhead of mentor's loop against a hand-written PyTorch loop doing the same math.

The online KD step on MNIST-1D: a frozen CNN teacher forward, an MLP student forward and backward, the loss
``(1 - alpha) * CE + alpha * T^2 * KL``, AdamW, a cosine LR schedule, the same batches in the same order. mentor runs
``mentor.train.fit`` with ``recipes.hinton_kd``; the hand loop is plain PyTorch. Both run in one process, one
thread, interleaved (ABBA order), and the per-step time is taken over the steady-state steps only (from step
``warm`` to the last step, from mentor's ``elapsed_s`` metric rows and the hand loop's own clock), so set-up is
excluded from both. The teacher forward's share of the hand step is timed on the same batches. That both loops do
the same math is checked: their gradients on one batch agree to float rounding.

    python bench/overhead.py            # full (about 5 minutes)
    python bench/overhead.py --quick    # the same comparison, smaller (< 60 s)
    python bench/overhead.py --repeats 24   # more interleaved repeats, for a noisy machine
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import stable_malloc, write_section

from mentor import data, models, recipes, teachers, train

T, ALPHA, LR = 4.0, 0.9, 1e-3


def make_models(seed: int, hidden: tuple[int, ...] = (512, 512, 512)) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(1000 + seed)
    teacher = models.CNN1d().eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    student = models.MLP(hidden=hidden)
    return teacher, student


def run_mentor(teacher: torch.nn.Module, student: torch.nn.Module, ds: data.TensorData, steps: int, batch: int,
               warm: int, seed: int) -> tuple[float, torch.nn.Module]:
    result = train.fit(
        student, recipes.hinton_kd(temperature=T, alpha=ALPHA), ds, teacher=teachers.Frozen(teacher),
        epochs=10_000, max_steps=steps, batch_size=batch, optim=train.Optim(lr=LR, schedule="cosine"), seed=seed,
        log_every=warm, progress=False,
    )
    rows = {r["step"]: r["elapsed_s"] for r in result.history if r.get("split") == "train"}
    return (rows[steps] - rows[warm]) / (steps - warm), result.student


def run_hand(teacher: torch.nn.Module, student: torch.nn.Module, ds: data.TensorData, steps: int, batch: int,
             warm: int, seed: int) -> tuple[float, torch.nn.Module]:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(student.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s / steps, 1.0))))
    per_epoch = len(ds) // batch
    step, epoch, t_warm = 0, 0, 0.0
    student.train()
    while step < steps:
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for b in range(per_epoch):
            idx = perm[b * batch : (b + 1) * batch]
            x, y = ds.x[idx], ds.y[idx]
            with torch.no_grad():
                t_logits = teacher(x)
            s_logits = student(x)
            loss = hand_loss(s_logits, t_logits, y)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step == warm:
                t_warm = time.perf_counter()
            if step == steps:
                break
        epoch += 1
    return (time.perf_counter() - t_warm) / (steps - warm), student


def hand_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The hand loop's loss: (1 - alpha) * CE + alpha * T^2 * KL, written with torch.nn.functional."""
    ce = F.cross_entropy(s_logits, y)
    kd = F.kl_div(F.log_softmax(s_logits / T, dim=-1), F.log_softmax(t_logits / T, dim=-1),
                  reduction="batchmean", log_target=True) * T * T
    return (1 - ALPHA) * ce + ALPHA * kd


def same_math(ds: data.TensorData, hidden: tuple[int, ...], batch: int) -> float:
    """Relative difference of the student's gradients on one batch, mentor's step vs the hand loop's: the two
    loops compute the same thing up to float rounding. (Weights after many Adam steps are no check: Adam turns
    rounding in near-zero gradients into learning-rate-sized differences.)"""
    from mentor.method import compute_terms

    grads = []
    for who in ("mentor", "hand"):
        teacher, student = make_models(0, hidden)
        x, y = ds.x[:batch], ds.y[:batch]
        with torch.no_grad():
            t_logits = teacher(x)
        s_logits = student(x)
        if who == "mentor":
            n = float(batch)
            loss, _ = compute_terms(recipes.hinton_kd(temperature=T, alpha=ALPHA), {"logits": s_logits},
                                    {"logits": t_logits}, y, 0, {"ce": n, "kd": n})
        else:
            loss = hand_loss(s_logits, t_logits, y)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
    return float((grads[0] - grads[1]).abs().max() / grads[1].abs().max())


def time_teacher(teacher: torch.nn.Module, ds: data.TensorData, steps: int, batch: int) -> float:
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(7))
    n = min(steps, len(ds) // batch)
    start = time.perf_counter()
    with torch.no_grad():
        for b in range(n):
            teacher(ds.x[perm[b * batch : (b + 1) * batch]])
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (< 60 s)")
    parser.add_argument("--repeats", type=int, metavar="N",
                        help="interleaved repeats per student (default 8; quick: 4); more on a noisy machine")
    args = parser.parse_args()
    if args.repeats is not None and args.repeats < 2:
        parser.error(f"--repeats must be >= 2, got {args.repeats}")
    torch.set_num_threads(1)
    steps, warm, reps = (150, 30, 4) if args.quick else (600, 100, 8)
    reps = args.repeats or reps
    malloc_fixed = stable_malloc()  # glibc's moving mmap threshold otherwise skews early repeats
    ds = data.mnist1d("train")
    out: dict[str, object] = {"benchmark": "overhead", "malloc_thresholds_fixed": malloc_fixed,
                              "quick": args.quick, "steps": steps, "warm": warm,
                              "repeats": reps, "threads": 1, "results": []}
    # The student of the demo and of bench/kd_mnist1d.py (MLP 3x512) at two batch sizes, and a 100-100 MLP as the
    # worst case: so small a step that per-step Python and autograd bookkeeping weigh the most.
    configs = [((512, 512, 512), 128), ((512, 512, 512), 512), ((100, 100), 128)]
    for hidden, batch in configs:
        mentor_t, hand_t, ratios = [], [], []
        for r in range(reps):
            order = ("mentor", "hand") if r % 2 == 0 else ("hand", "mentor")
            got: dict[str, float] = {}
            for who in order:
                teacher, student = make_models(r, hidden)
                fn = run_mentor if who == "mentor" else run_hand
                got[who], _ = fn(teacher, student, ds, steps, batch, warm, r)
            mentor_t.append(got["mentor"])
            hand_t.append(got["hand"])
            ratios.append(got["mentor"] / got["hand"])
        teacher, _ = make_models(0, hidden)
        t_teacher = statistics.median(time_teacher(teacher, ds, steps, batch) for _ in range(3))
        row = {
            "student": "MLP" + "x".join(str(h) for h in hidden),
            "batch": batch,
            "mentor_ms_per_step": statistics.median(mentor_t) * 1e3,
            "hand_ms_per_step": statistics.median(hand_t) * 1e3,
            "ratio_of_medians": statistics.median(mentor_t) / statistics.median(hand_t),
            "median_of_ratios": statistics.median(ratios),
            "ratios": [round(x, 4) for x in ratios],
            "teacher_forward_ms": t_teacher * 1e3,
            "teacher_share_of_hand_step": t_teacher / statistics.median(hand_t),
            "grad_rel_diff": same_math(ds, hidden, batch),
        }
        out["results"].append(row)  # type: ignore[union-attr]
        print(json.dumps(row), file=sys.stderr)
    lines = ["| student | batch | mentor ms/step | hand ms/step | ratio (median of ratios) | ratio of medians "
             "| teacher fwd share | gradient rel. diff |", "|---|---|---|---|---|---|---|---|"]
    for row in out["results"]:  # type: ignore[union-attr]
        lines.append(
            f"| {row['student']} | {row['batch']} | {row['mentor_ms_per_step']:.3f} | {row['hand_ms_per_step']:.3f} "
            f"| {row['median_of_ratios']:.4f} | {row['ratio_of_medians']:.4f} | "
            f"{row['teacher_share_of_hand_step']:.1%} | {row['grad_rel_diff']:.1e} |"
        )
    body = (f"Online KD step (CNN teacher -> MLP student, hinton_kd, AdamW + cosine), {steps} steps, timed from step "
            f"{warm}, {reps} interleaved repeats, 1 thread, glibc malloc thresholds fixed at 1 GiB: {malloc_fixed}. "
            "Goal: ratio <= 1.02.\n\n" + "\n".join(lines))
    write_section("overhead" + (" (quick)" if args.quick else ""), body)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
