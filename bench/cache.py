"""Teacher cache on MNIST-1D: epoch time, accuracy from a top-k cache, bytes per item/token, build throughput.

Setting (issue 4): a CNN teacher (trained once on the 4000 labelled items, weights kept under ``bench/_work/``), an
MLP(512, 512, 512) student trained with ``transfer_kd`` (T = 4) on the 50000-sample generated transfer set, one
thread.

* **Epoch time.** Per-step time of mentor's loop, measured from the run's own ``elapsed_s`` between two log rows
  (so Accelerate set-up and evaluation are left out), times the steps of an epoch. Compared in one process,
  interleaved over several rounds, medians: student only (``supervised`` on the transfer set's generating labels),
  cached KD (top-4 and all 10 classes), online KD with the CNN teacher and with a CNN ten times larger (random
  weights: only its cost matters here).
* **Accuracy.** ``transfer_kd`` from the cache for k in {1, 2, 4, 10} with both tail treatments, against online KD
  with the same teacher, 3 seeds (student init and data order), same steps and schedule.
* **Bytes.** Per item for the MNIST-1D caches; per token for a small sequence model (vocabulary 512, 64 positions)
  at k in {4, 16, 64}.
* **Build throughput.** Items per second of ``mentor.cache.build`` over the transfer set against a bare teacher
  forward over the same items at the same batch size, interleaved, medians. Each timed run starts after
  ``gc.collect()`` (both kinds alike): a full collection owed by the bench's earlier work (about 60 ms over this
  process's objects) otherwise lands in whichever run allocates first, and with ``--quick``'s two rounds one such
  pass halved the ratio.

    .venv/bin/python bench/cache.py            # full (about 40 minutes on one core)
    .venv/bin/python bench/cache.py --quick    # small, about a minute
    .venv/bin/python bench/cache.py --part build --no-write   # build throughput only (seconds), printed only
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import stable_malloc, write_section

from mentor import cache, data, models, recipes, teachers, train
from mentor.eval import evaluate

WORK = Path(__file__).resolve().parent / "_work"
TEMPERATURE, LR = 4.0, 2e-3
BATCH = 256


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"teacher_epochs": 20, "transfer_size": 5000, "epochs": 2, "hidden": [256, 256], "seeds": [0],
                "rounds": 2, "timing_steps": 30, "build_rounds": 2, "ks": [1, 4, 10]}
    return {"teacher_epochs": 150, "transfer_size": 50000, "epochs": 20, "hidden": [512, 512, 512],
            "seeds": [0, 1, 2], "rounds": 5, "timing_steps": 60, "build_rounds": 8, "ks": [1, 2, 4, 10]}


def cnn_teacher(epochs: int) -> nn.Module:
    """The CNN teacher, trained once with ``supervised`` on the labelled items and kept under bench/_work."""
    path = WORK / f"cache_teacher_e{epochs}.safetensors"
    torch.manual_seed(0)
    model = models.CNN1d()
    if path.is_file():
        train.load_model_weights(model, path)
        return model
    result = train.fit(model, recipes.supervised(), data.mnist1d("train"), epochs=epochs, batch_size=100,
                       optim=train.Optim(lr=1e-2, schedule="cosine"), seed=0, progress=False, log_every=10_000)
    WORK.mkdir(exist_ok=True)
    train.save_model(result.student, path)
    return result.student


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def student(hidden: list[int], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return models.MLP(hidden=tuple(hidden))


def step_seconds(result: train.FitResult, first: int) -> float:
    """Seconds per step between the log rows at ``first`` and the last step (set-up and evaluation left out)."""
    rows = {r["step"]: r["elapsed_s"] for r in result.history if r.get("split") == "train"}
    last = max(rows)
    return (rows[last] - rows[first]) / (last - first)


def timing(cfg: dict[str, Any], teacher: nn.Module, big: nn.Module, transfer: data.TensorData,
           labelled_transfer: data.TensorData, caches: dict[str, Path]) -> dict[str, Any]:
    steps, warm = cfg["timing_steps"], 10
    kd = recipes.transfer_kd(temperature=TEMPERATURE)
    variants: dict[str, tuple[Any, Any, data.TensorData]] = {
        "student_only": (recipes.supervised(), None, labelled_transfer),
        "cached_k4": (cache.use_sparse_targets(kd, "rest"), teachers.Cached(caches["k4"], dense=False), transfer),
        "cached_k10": (cache.use_sparse_targets(kd, "rest"), teachers.Cached(caches["k10"], dense=False),
                       transfer),
        "online_cnn": (kd, teachers.Frozen(teacher), transfer),
        "online_cnn_x10": (kd, teachers.Frozen(big), transfer),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(cfg["rounds"]):
        for name, (method, t, ds) in variants.items():
            result = train.fit(student(cfg["hidden"], 0), method, ds, teacher=t, max_steps=steps, epochs=1,
                               batch_size=BATCH, optim=train.Optim(lr=LR), progress=False, log_every=warm)
            times[name].append(step_seconds(result, warm))
    per_epoch = len(transfer) // BATCH
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "step_ms_median": {k: 1000 * v for k, v in med.items()},
        "epoch_s": {k: v * per_epoch for k, v in med.items()},
        "ratio_cached_k4_over_student_only": med["cached_k4"] / med["student_only"],
        "ratio_cached_k10_over_student_only": med["cached_k10"] / med["student_only"],
        "speedup_over_online_cnn": med["online_cnn"] / med["cached_k4"],
        "speedup_over_online_cnn_x10": med["online_cnn_x10"] / med["cached_k4"],
        "rounds": cfg["rounds"],
        "steps_timed_per_run": steps - warm,
    }


def accuracy(cfg: dict[str, Any], teacher: nn.Module, transfer: data.TensorData, test: data.TensorData,
             caches: dict[str, Path]) -> dict[str, Any]:
    kd = recipes.transfer_kd(temperature=TEMPERATURE)
    rows: dict[str, list[float]] = {}
    for seed in cfg["seeds"]:
        runs: list[tuple[str, Any, Any]] = [("online", kd, teachers.Frozen(teacher))]
        for k in cfg["ks"]:
            tails = ["rest"] if k == 10 else ["rest", "renormalize"]  # with all classes there is no tail
            for tail in tails:
                runs.append((f"k{k}_{tail}" if k < 10 else "k10", cache.use_sparse_targets(kd, tail),
                             teachers.Cached(caches[f"k{k}"], tail=tail, dense=False)))
        for name, method, t in runs:
            result = train.fit(student(cfg["hidden"], seed), method, transfer, teacher=t, epochs=cfg["epochs"],
                               batch_size=BATCH, optim=train.Optim(lr=LR, schedule="cosine"), seed=seed,
                               progress=False, log_every=10_000)
            acc = evaluate(result.student, test)["accuracy"]
            rows.setdefault(name, []).append(acc)
            print(json.dumps({"seed": seed, "run": name, "accuracy": acc}), flush=True)
    summary = {name: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "runs": v}
               for name, v in rows.items()}
    online = summary["online"]["mean"]
    for s in summary.values():
        s["minus_online_points"] = 100 * (s["mean"] - online)
    return summary


def build_throughput(cfg: dict[str, Any], teacher: nn.Module, transfer: data.TensorData) -> dict[str, Any]:
    teacher.eval()
    bare: list[float] = []
    built: list[float] = []

    def run_bare() -> None:
        gc.collect()
        start = time.perf_counter()
        with torch.no_grad():
            for lo in range(0, len(transfer), 512):
                teacher(transfer.x[lo : lo + 512])
        bare.append(len(transfer) / (time.perf_counter() - start))

    def run_build() -> None:
        tmp = Path(tempfile.mkdtemp(prefix="mentor-bench-cache-"))
        gc.collect()
        start = time.perf_counter()
        cache.build(teacher, transfer.x, tmp / "c", spec=cache.CacheSpec(k=4, batch_size=512), progress=False)
        built.append(len(transfer) / (time.perf_counter() - start))
        shutil.rmtree(tmp)

    run_bare()  # warm-up, not counted
    run_build()
    bare.clear()
    built.clear()
    for r in range(cfg["build_rounds"]):  # ABBA order, so drifting load hits both alike
        for fn in ((run_bare, run_build) if r % 2 == 0 else (run_build, run_bare)):
            fn()
    return {"bare_items_per_s": statistics.median(bare), "build_items_per_s": statistics.median(built),
            "ratio_build_over_bare": statistics.median(built) / statistics.median(bare)}


def token_bytes(tmp: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    lm = nn.Sequential(nn.Embedding(512, 32), nn.Linear(32, 512))  # [B, L] tokens -> [B, L, 512] logits
    tokens = torch.randint(0, 512, (256, 64))
    out = {}
    for k in (4, 16, 64):
        cache.build(lm, tokens, tmp / f"tok{k}", spec=cache.CacheSpec(k=k), progress=False)
        out[f"k{k}"] = cache.info(tmp / f"tok{k}")["logit_bytes_per_position"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--part", choices=["all", "timing", "accuracy", "build"], default="all",
                        help="timing (epoch time, bytes, build throughput) and/or accuracy; each writes its own "
                             "section of bench/RESULTS.md; build: the build throughput alone, printed (no section)")
    parser.add_argument("--no-write", action="store_true", help="print the results, leave bench/RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(1)
    malloc_fixed = stable_malloc()
    cfg = settings(args.quick)
    if args.quick:
        cfg["teacher_epochs"] = 20
    teacher = cnn_teacher(cfg["teacher_epochs"])
    if args.part == "build":
        transfer = data.mnist1d_transfer(cfg["transfer_size"], 0)
        torch.manual_seed(1)
        big = models.CNN1d(channels=88)
        print(json.dumps({"settings": cfg, "malloc_thresholds_fixed": malloc_fixed,
                          "build": build_throughput(cfg, teacher, transfer),
                          "build_x10": build_throughput(cfg, big, transfer)}))
        return
    test = data.mnist1d("test")
    teacher_acc = evaluate(teacher, test)["accuracy"]
    transfer = data.mnist1d_transfer(cfg["transfer_size"], 0)
    labelled_transfer = data.mnist1d_transfer(cfg["transfer_size"], 0, with_labels=True)
    torch.manual_seed(1)
    big = models.CNN1d(channels=88)
    tmp = Path(tempfile.mkdtemp(prefix="mentor-bench-cache-"))
    try:
        caches, sizes = {}, {}
        for k in cfg["ks"]:
            caches[f"k{k}"] = tmp / f"k{k}"
            cache.build(teacher, transfer.x, caches[f"k{k}"], spec=cache.CacheSpec(k=k), progress=False)
            sizes[f"k{k}"] = cache.info(caches[f"k{k}"])["logit_bytes_per_item"]
        if "k4" not in caches:
            raise SystemExit("the timing needs k=4 among the ks")
        result: dict[str, Any] = {
            "settings": cfg, "teacher_accuracy": teacher_acc, "teacher_params": params(teacher),
            "big_teacher_params": params(big), "big_over_teacher_params": params(big) / params(teacher),
            "student_params": params(student(cfg["hidden"], 0)),
            "bytes_per_item": sizes, "fp32_logits_bytes_per_item": 10 * 4,
            "bytes_per_token": token_bytes(tmp),
            "malloc_thresholds_fixed": malloc_fixed,
        }
        if args.part in ("all", "timing"):
            result["build"] = build_throughput(cfg, teacher, transfer)
            result["build_x10"] = build_throughput(cfg, big, transfer)
            print(json.dumps({"build": result["build"], "build_x10": result["build_x10"]}), flush=True)
            result["timing"] = timing(cfg, teacher, big, transfer, labelled_transfer, caches)
            print(json.dumps({"timing": result["timing"]}), flush=True)
        if args.part in ("all", "accuracy"):
            result["accuracy"] = accuracy(cfg, teacher, transfer, test, caches)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))
    suffix = " (quick)" if args.quick else ""
    if args.no_write:
        return
    if "timing" in result:
        write_section("cache" + suffix, render(result))
    if "accuracy" in result:
        write_section("cache_accuracy" + suffix, render_accuracy(result))


def _setting(r: dict[str, Any]) -> str:
    return (f"CNN teacher ({r['teacher_params']} parameters, test accuracy {r['teacher_accuracy']:.3f}) -> "
            f"MLP{tuple(r['settings']['hidden'])} student ({r['student_params']} parameters), transfer_kd T=4, "
            f"{r['settings']['transfer_size']} transfer items, batch {BATCH}, one thread.")


def render(r: dict[str, Any]) -> str:
    t, b = r["timing"], r["build"]
    lines = [
        _setting(r),
        "",
        "**Epoch time** (median step time of mentor's loop x steps per epoch; "
        f"{t['rounds']} interleaved rounds of {t['steps_timed_per_run']} timed steps):",
        "",
        "| run | ms/step | s/epoch |",
        "|---|---|---|",
    ]
    for name in t["step_ms_median"]:
        lines.append(f"| {name} | {t['step_ms_median'][name]:.2f} | {t['epoch_s'][name]:.1f} |")
    lines += [
        "",
        f"- cached KD (k=4) / student only: **{t['ratio_cached_k4_over_student_only']:.3f}** (goal <= 1.10); "
        f"k=10: {t['ratio_cached_k10_over_student_only']:.3f}",
        f"- speed-up of cached KD over online KD: {t['speedup_over_online_cnn']:.2f}x with the CNN teacher, "
        f"{t['speedup_over_online_cnn_x10']:.2f}x with a CNN of {r['big_teacher_params']} parameters "
        f"({r['big_over_teacher_params']:.1f}x the teacher)",
        f"- build throughput {b['build_items_per_s']:.0f} items/s vs bare teacher forward "
        f"{b['bare_items_per_s']:.0f} items/s: ratio **{b['ratio_build_over_bare']:.3f}** (goal >= 0.9); with the "
        f"10x teacher {r['build_x10']['build_items_per_s']:.0f} vs {r['build_x10']['bare_items_per_s']:.0f} items/s: "
        f"ratio **{r['build_x10']['ratio_build_over_bare']:.3f}**",
        f"- glibc malloc thresholds fixed at 1 GiB (see `stable_malloc`): {r.get('malloc_thresholds_fixed')}",
        "- bytes per item (fp16 log-probabilities + uint8 indices): "
        + ", ".join(f"{k}: {v}" for k, v in r["bytes_per_item"].items())
        + f" (fp32 logits: {r['fp32_logits_bytes_per_item']})",
        "- bytes per token, sequence model with a 512-token vocabulary (fp16 + uint16): "
        + ", ".join(f"{k}: {v:.0f}" for k, v in r["bytes_per_token"].items()) + " (goal <= 64 at k=16)",
    ]
    return "\n".join(lines)


def render_accuracy(r: dict[str, Any]) -> str:
    lines = [_setting(r)]
    if "accuracy" in r:
        lines += ["", f"**Accuracy** of transfer_kd from the cache ({len(r['settings']['seeds'])} seeds, "
                  f"{r['settings']['epochs']} epochs, cosine schedule), mean ± std, and the difference to online KD:",
                  "", "| teacher targets | accuracy | minus online (points) |", "|---|---|---|"]
        for name, s in r["accuracy"].items():
            lines.append(f"| {name} | {s['mean']:.4f} ± {s['std']:.4f} | {s['minus_online_points']:+.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
