"""Per-step overhead of mentor's loop against a hand-written PyTorch loop doing the same math.

The online KD step on MNIST-1D: a frozen CNN teacher forward, an MLP student forward and backward, the loss
``(1 - alpha) * CE + alpha * T^2 * KL``, AdamW, a cosine LR schedule, the same batches in the same order. mentor runs
``mentor.train.fit`` with ``recipes.hinton_kd``; the hand loop is plain PyTorch. Both run in one process, one
thread, interleaved (ABBA order), and the per-step time is taken over the steady-state steps only (from step
``warm`` to the last step, from mentor's ``elapsed_s`` metric rows and the hand loop's own clock), so set-up is
excluded from both. The teacher forward's share of the hand step is timed on the same batches. Both loops must end
with the same weights (same math), which is checked.

    python bench/overhead.py            # full (about 2-3 minutes)
    python bench/overhead.py --quick    # the same comparison, smaller (< 60 s)
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

from _results import write_section

from mentor import data, models, recipes, teachers, train

T, ALPHA, LR = 4.0, 0.9, 1e-3


def make_models(seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(1000 + seed)
    teacher = models.CNN1d().eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    student = models.MLP()
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
            ce = F.cross_entropy(s_logits, y)
            kd = F.kl_div(F.log_softmax(s_logits / T, dim=-1), F.log_softmax(t_logits / T, dim=-1),
                          reduction="batchmean", log_target=True) * T * T
            loss = (1 - ALPHA) * ce + ALPHA * kd
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
    parser.add_argument("--batch", type=int, nargs="+", default=[128, 512], help="batch sizes to compare")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps, warm, reps = (300, 50, 4) if args.quick else (1000, 100, 8)
    ds = data.mnist1d("train")
    out: dict[str, object] = {"benchmark": "overhead", "quick": args.quick, "steps": steps, "warm": warm,
                              "repeats": reps, "threads": 1, "results": []}
    for batch in args.batch:
        mentor_t, hand_t, ratios, max_diff = [], [], [], 0.0
        for r in range(reps):
            order = ("mentor", "hand") if r % 2 == 0 else ("hand", "mentor")
            got: dict[str, float] = {}
            finals: dict[str, torch.nn.Module] = {}
            for who in order:
                teacher, student = make_models(r)
                fn = run_mentor if who == "mentor" else run_hand
                got[who], finals[who] = fn(teacher, student, ds, steps, batch, warm, r)
            mentor_t.append(got["mentor"])
            hand_t.append(got["hand"])
            ratios.append(got["mentor"] / got["hand"])
            for a, b in zip(finals["mentor"].parameters(), finals["hand"].parameters(), strict=True):
                max_diff = max(max_diff, float((a - b).detach().abs().max()))
        teacher, _ = make_models(0)
        t_teacher = statistics.median(time_teacher(teacher, ds, steps, batch) for _ in range(3))
        row = {
            "batch": batch,
            "mentor_ms_per_step": statistics.median(mentor_t) * 1e3,
            "hand_ms_per_step": statistics.median(hand_t) * 1e3,
            "ratio_of_medians": statistics.median(mentor_t) / statistics.median(hand_t),
            "median_of_ratios": statistics.median(ratios),
            "ratios": [round(x, 4) for x in ratios],
            "teacher_forward_ms": t_teacher * 1e3,
            "teacher_share_of_hand_step": t_teacher / statistics.median(hand_t),
            "max_abs_weight_diff": max_diff,
        }
        out["results"].append(row)  # type: ignore[union-attr]
        print(json.dumps(row), file=sys.stderr)
    lines = ["| batch | mentor ms/step | hand ms/step | ratio (median of ratios) | ratio of medians "
             "| teacher fwd share | max weight diff |", "|---|---|---|---|---|---|---|"]
    for row in out["results"]:  # type: ignore[union-attr]
        lines.append(
            f"| {row['batch']} | {row['mentor_ms_per_step']:.3f} | {row['hand_ms_per_step']:.3f} "
            f"| {row['median_of_ratios']:.4f} | {row['ratio_of_medians']:.4f} | "
            f"{row['teacher_share_of_hand_step']:.1%} | {row['max_abs_weight_diff']:.1e} |"
        )
    body = (f"Online KD step (CNN teacher -> MLP student, hinton_kd, AdamW + cosine), {steps} steps, timed from step "
            f"{warm}, {reps} interleaved repeats, 1 thread. Goal: ratio <= 1.02.\n\n" + "\n".join(lines))
    write_section("overhead" + (" (quick)" if args.quick else ""), body)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
