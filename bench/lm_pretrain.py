"""Pre-training distillation of a causal LM from a per-token top-k teacher cache (issue 6, point 2).

1. A teacher (4 layers x 256) is trained with cross-entropy on the built-in corpus, the standard library's
   docstrings (``data.name: lm_stdlib``, blocks of 128 tokens, 512-token BPE), for a few CPU minutes:
   ``configs/lm_stdlib_teacher.yaml`` through ``mentor.run.run`` (what ``mentor train`` runs). The trained teacher
   is kept under bench/_work/lm_pretrain/ and reused by later runs with the same config.
2. Its per-token top-16 log-probabilities over the training blocks are cached (``mentor.cache.build``, as
   ``mentor cache build configs/lm_stdlib_kd_cached.yaml`` does; timed; 64 bytes per token).
3. A student (2 layers x 128) is pre-trained from a random initialisation for the same number of steps by
   (a) ``ce``: next-token cross-entropy only (``configs/lm_stdlib_scratch.yaml``), (b) ``kd``: the cached top-16
   teacher, forward KL with the dropped mass as one "rest" bucket (``configs/lm_stdlib_kd_cached.yaml``), and
   (c) ``kd_ce``: the same plus the cross-entropy (``recipe.args.ce_weight=1``), 3 seeds each. Reported: held-out
   perplexity and next-token accuracy (mean and std over seeds), top-1 agreement with the teacher and KL to it.
4. Step time of cached KD over CE only, timed apart from those runs: short runs of the same loop, configs, data
   and student (CE only, cached KD, cached KD + CE), interleaved, in several rounds; per run the median time
   between the loop's once-per-step ``teacher.update`` calls (as bench/overhead_recipes.py reads them), per method
   the fastest round, by this process's CPU time (other processes on a shared machine add wall time, not that).

Prints one JSON object on its last line; writes its section of bench/RESULTS.md (``--no-write``: print only).
One thread. ``--quick``: small data, a small teacher, a few steps (a smoke test, under a minute).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "bench" / "_work" / "lm_pretrain"
METHODS = {
    "ce": ("lm_stdlib_scratch.yaml", []),
    "kd": ("lm_stdlib_kd_cached.yaml", []),
    "kd_ce": ("lm_stdlib_kd_cached.yaml", ["recipe.args.ce_weight=1.0"]),
}


def _sizes(quick: bool) -> dict[str, Any]:
    """Steps and data: the shipped configs' sizes, or a smoke test's."""
    if quick:
        return {"teacher_steps": 30, "student_steps": 20, "batch_size": 8, "log_every": 5,
                "data": ["data.num_train=256", "data.num_test=32"],
                "teacher": ["student.args.layers=2", "student.args.width=128"]}
    return {"teacher_steps": 400, "student_steps": 200, "batch_size": 32, "log_every": 25, "data": [],
            "teacher": []}


def _common(work: Path, sizes: dict[str, Any]) -> list[str]:
    return [*sizes["data"], f"train.batch_size={sizes['batch_size']}", f"train.log_every={sizes['log_every']}",
            "train.eval_every=1000", "train.progress=false", f"train.out={work}"]


def teacher_config(work: Path, sizes: dict[str, Any]) -> Any:
    from mentor.config import load_config

    return load_config(REPO / "configs" / "lm_stdlib_teacher.yaml",
                       [*_common(work, sizes), *sizes["teacher"], "name=teacher",
                        f"train.max_steps={sizes['teacher_steps']}"])


def student_config(method: str, seed: int, work: Path, sizes: dict[str, Any]) -> Any:
    from mentor.config import load_config

    file, extra = METHODS[method]
    overrides = [*_common(work / "students", sizes), f"name={method}_seed{seed}", f"seed={seed}",
                 f"train.max_steps={sizes['student_steps']}", *extra]
    if method != "ce":
        overrides += [f"teacher.run={work / 'teacher'}", f"teacher.cache={work / 'cache_k16'}"]
    return load_config(REPO / "configs" / file, overrides)


def _same_config(run_dir: Path, cfg: Any) -> bool:
    from mentor.config import dump_config

    path = run_dir / "config.yaml"
    return (run_dir / "result.json").is_file() and path.is_file() and path.read_text() == dump_config(cfg)


def train_teacher(work: Path, sizes: dict[str, Any]) -> dict[str, Any]:
    """The teacher run (reused when bench/_work holds a finished run of the same config)."""
    from mentor.run import run

    cfg = teacher_config(work, sizes)
    if _same_config(cfg.run_dir, cfg) and (cfg.run_dir / "seconds.json").is_file():
        stored = json.loads((cfg.run_dir / "result.json").read_text())["metrics"]
        seconds = json.loads((cfg.run_dir / "seconds.json").read_text())["seconds"]
        return {**_lm_metrics(stored), "seconds": seconds, "reused": True}
    start = time.perf_counter()
    result = run(cfg, report=False)
    seconds = time.perf_counter() - start
    (cfg.run_dir / "seconds.json").write_text(json.dumps({"seconds": seconds}))
    return {**_lm_metrics(result.final.metrics), "seconds": seconds, "reused": False}


def build_cache(work: Path, sizes: dict[str, Any]) -> dict[str, Any]:
    """The per-token top-16 cache of the teacher over the training blocks, as `mentor cache build` writes it;
    rebuilt (and timed) unless a finished cache of this teacher and data is there."""
    from mentor.cache import CacheError, CacheSpec, TeacherCache, build, fingerprint_data, fingerprint_model, info
    from mentor.run import load_data, load_teacher

    cfg = student_config("kd", 0, work, sizes)
    assert cfg.teacher is not None and cfg.cache is not None
    teacher = load_teacher(cfg.teacher)
    train, _ = load_data(cfg)
    out = Path(cfg.teacher.cache)
    timing = work / "cache_build.json"
    try:
        cache = TeacherCache(out, check=False)
        fresh = (cache.teacher_fingerprint != fingerprint_model(teacher)
                 or cache.dataset_fingerprint != fingerprint_data(train.x) or not timing.is_file())
    except (CacheError, FileNotFoundError, ValueError):
        fresh = True
    if fresh:
        cc = cfg.cache
        start = time.perf_counter()
        build(teacher, train.x, out, spec=CacheSpec(k=cc.k, values_dtype=cc.values_dtype, shard_size=cc.shard_size,
                                                    batch_size=cc.batch_size),
              teacher_spec=cfg.teacher.model_dump(exclude={"cache", "tail"}), dataset_spec=cfg.data.model_dump(),
              progress=False, overwrite=True)
        timing.write_text(json.dumps({"seconds": time.perf_counter() - start}))
    summary = info(out)
    tokens = summary["items"] * summary["positions"][0]
    return {"k": summary["k"], "items": summary["items"], "tokens": tokens, "bytes": summary["bytes"],
            "bytes_per_token": summary["bytes"] / tokens,
            "logit_bytes_per_token": summary["logit_bytes_per_position"],
            "build_s": json.loads(timing.read_text())["seconds"], "reused": not fresh}


def _lm_metrics(m: dict[str, Any]) -> dict[str, Any]:
    keys = ("perplexity", "token_accuracy", "agreement", "kl_to_teacher")
    return {k: m[k] for k in keys if k in m}


def _step_seconds(run_dir: Path) -> float:
    """Median seconds per step over the logged intervals after the first (the loop's ``elapsed_s``)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    marks = [(r["step"], r["elapsed_s"]) for r in rows if r.get("split") == "train"]
    rates = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in itertools.pairwise(marks[1:])]
    return statistics.median(rates) if rates else (marks[-1][1] / marks[-1][0])


def train_student(method: str, seed: int, work: Path, sizes: dict[str, Any]) -> dict[str, Any]:
    """One student run (reused when bench/_work holds a finished run of the same config); the teacher's agreement
    and KL are also measured for the CE-only student, whose run names no teacher."""
    from mentor.lm.loop import evaluate_lm
    from mentor.run import load_data, load_teacher, run
    from mentor.teachers import Frozen

    cfg = student_config(method, seed, work, sizes)
    extra = cfg.run_dir / "bench.json"
    if _same_config(cfg.run_dir, cfg) and extra.is_file():
        stored = json.loads((cfg.run_dir / "result.json").read_text())["metrics"]
        return {**_lm_metrics(stored), **json.loads(extra.read_text()), "reused": True}
    start = time.perf_counter()
    result = run(cfg, report=False)
    seconds = time.perf_counter() - start
    add: dict[str, Any] = {"seconds": seconds, "step_s": _step_seconds(cfg.run_dir)}
    if "agreement" not in result.final.metrics:
        teacher_cfg = teacher_config(work, sizes)
        _, test = load_data(cfg)
        from mentor.config import TeacherConfig

        teacher = load_teacher(TeacherConfig(run=str(teacher_cfg.run_dir)))
        m = evaluate_lm(result.final.student, test, Frozen(teacher))
        add.update(agreement=m["agreement"], kl_to_teacher=m["kl_to_teacher"])
    extra.write_text(json.dumps(add))
    return {**_lm_metrics(result.final.metrics), **add, "reused": False}


class _StepClock:
    """Records the wall and CPU time (this process's, so other processes' load is left out) of each of the loop's
    once-per-step ``teacher.update`` calls."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def update(self, student: Any, step: int) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def step_s(self, skip: int = 3) -> dict[str, float]:
        """Median seconds between steps after the first ``skip``, by the wall clock and by CPU time."""
        return {name: statistics.median(b - a for a, b in itertools.pairwise(marks[skip:]))
                for name, marks in (("wall", self.wall), ("cpu", self.cpu))}


def step_times(work: Path, sizes: dict[str, Any], steps: int, rounds: int) -> dict[str, Any]:
    """Seconds per step of CE only, cached KD and cached KD + CE: ``rounds`` interleaved rounds of ``steps``-step
    runs of the loop with the configs' recipe, optimiser, data and student; per method the fastest round, by CPU
    time (the ratio) and by the wall clock."""
    from mentor.cache import use_sparse_targets
    from mentor.config import build_method
    from mentor.run import build_student, load_data
    from mentor.teachers import Cached
    from mentor.train import Optim, fit

    class ClockedCache(Cached, _StepClock):
        def __init__(self, path: str) -> None:
            Cached.__init__(self, path, dense=False, tail="rest")
            _StepClock.__init__(self)

    class ClockedNone(_StepClock):  # the CE-only step reads no teacher; the clock is all this one is for
        def targets(self, x: Any) -> Any:
            raise AssertionError("the CE-only step reads no teacher")

        def to(self, device: Any) -> Any:
            return self

    configs = {m: student_config(m, 0, work, sizes) for m in METHODS}
    train, _ = load_data(configs["ce"])
    times: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    for _ in range(rounds):
        for method, cfg in configs.items():
            clock: Any
            if method == "ce":
                clock, fit_method = ClockedNone(), build_method(cfg.recipe)
            else:
                assert cfg.teacher is not None and cfg.teacher.cache is not None
                clock = ClockedCache(cfg.teacher.cache)
                fit_method = use_sparse_targets(build_method(cfg.recipe), "rest")
            fit(build_student(cfg, 0), fit_method, train, teacher=clock, epochs=1000, max_steps=steps,
                batch_size=cfg.train.batch_size, optim=Optim(**cfg.optim.model_dump()), progress=False,
                log_every=steps)
            times[method].append(clock.step_s())
    cpu = {m: min(r["cpu"] for r in v) for m, v in times.items()}
    wall = {m: min(r["wall"] for r in v) for m, v in times.items()}
    return {"steps": steps, "rounds": rounds, "step_cpu_s": cpu, "step_wall_s": wall, "per_round": times,
            "ratio_kd_over_ce": cpu["kd"] / cpu["ce"], "ratio_kd_ce_over_ce": cpu["kd_ce"] / cpu["ce"],
            "wall_ratio_kd_over_ce": wall["kd"] / wall["ce"]}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small data, a small teacher, few steps (smoke test)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--timing-rounds", type=int, default=4, help="interleaved rounds of the step-time runs")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from mentor.lm import data as lm_data

    # every run of this process reads the same corpus: tokenise it once (about 1.5 s a time), not once per run
    lm_data.stdlib_blocks = functools.lru_cache(lm_data.stdlib_blocks)  # type: ignore[assignment]
    work = WORK / "quick" if args.quick else WORK
    sizes = _sizes(args.quick)
    start = time.perf_counter()
    out: dict[str, Any] = {"teacher_steps": sizes["teacher_steps"], "student_steps": sizes["student_steps"],
                           "batch_size": sizes["batch_size"], "log_every": sizes["log_every"], "seeds": args.seeds}
    out["teacher"] = train_teacher(work, sizes)
    print(json.dumps({"teacher": out["teacher"]}), flush=True)
    out["cache"] = build_cache(work, sizes)
    print(json.dumps({"cache": out["cache"]}), flush=True)
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    for seed in range(args.seeds):
        for method in METHODS:  # interleaved by seed: a slow spell of the machine hits every method
            rows[method].append(train_student(method, seed, work, sizes))
            print(json.dumps({"method": method, "seed": seed, **rows[method][-1]}), flush=True)
    summary: dict[str, dict[str, Any]] = {}
    for method, runs in rows.items():
        s: dict[str, Any] = {}
        for key in ("perplexity", "token_accuracy", "agreement", "kl_to_teacher"):
            s[key], s[f"{key}_std"] = _mean_std([r[key] for r in runs])
            s[f"{key}_per_seed"] = [r[key] for r in runs]
        s["run_step_s"] = statistics.median(r["step_s"] for r in runs)  # within the runs: contention included
        s["seconds_mean"] = statistics.mean(r["seconds"] for r in runs)
        summary[method] = s
    out["students"] = summary
    out["reused"] = {"teacher": out["teacher"]["reused"], "cache": out["cache"]["reused"],
                     "student_runs": sum(bool(r["reused"]) for runs in rows.values() for r in runs),
                     "of_student_runs": sum(len(runs) for runs in rows.values())}
    out["timing"] = step_times(work, sizes, steps=12 if args.quick else 40, rounds=args.timing_rounds)
    print(json.dumps({"timing": out["timing"]}), flush=True)
    out["total_s"] = time.perf_counter() - start
    if not args.no_write:
        write(out, args.quick)
    print(json.dumps(out), flush=True)


def write(out: dict[str, Any], quick: bool) -> None:
    """This benchmark's section of bench/RESULTS.md."""
    from _results import write_section

    t, c, s, tm = out["teacher"], out["cache"], out["students"], out["timing"]
    blocks = "256 training / 32 held-out blocks (--quick)" if quick else "5990 training / 286 held-out blocks"
    teacher = "2 layers x 128 (--quick)" if quick else "4 layers x 256 (3.5 M parameters)"
    ru = out["reused"]
    reused = ("nothing reused: teacher, cache and every run made by this command" if not (
        ru["teacher"] or ru["cache"] or ru["student_runs"]) else
        f"reused from bench/_work/lm_pretrain, as finished runs of the same configs: "
        f"{'the teacher, ' if ru['teacher'] else ''}{'the cache, ' if ru['cache'] else ''}"
        f"{ru['student_runs']} of {ru['of_student_runs']} student runs")
    names = {"ce": "CE only (scratch)", "kd": "cached top-16 KD (forward KL, rest)", "kd_ce": "cached KD + CE"}
    body = [
        f"Corpus `data.name: lm_stdlib` (the standard library's docstrings, {blocks} of 128 tokens, BPE 512), "
        f"batch {out['batch_size']}, AdamW with a cosine schedule, one thread. Teacher: {teacher}, CE for "
        f"{out['teacher_steps']} steps ({t['seconds'] / 60:.1f} min): held-out perplexity "
        f"**{t['perplexity']:.2f}**, next-token accuracy {t['token_accuracy']:.3f}. Students: 2 layers x 128 "
        f"(0.53 M parameters) from a random initialisation, {out['student_steps']} steps each, seeds "
        f"0-{out['seeds'] - 1} (mean ± std).",
        "",
        *([] if quick else [
            "Why 200 student steps: a teacher of a few CPU minutes is better only than students trained for fewer "
            "steps than it. With 500 steps the CE-only student alone reached perplexity 13.04 (seed 0), below this "
            "teacher's 13.85, so there was nothing left to distil (measured once while setting this benchmark up).",
            ""]),
        "| student | held-out perplexity | per seed | next-token accuracy | agreement with teacher "
        "| KL to teacher / token | step ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, r in s.items():
        body.append(
            f"| {names[method]} | {r['perplexity']:.2f} ± {r['perplexity_std']:.2f} "
            f"| {', '.join(f'{v:.2f}' for v in r['perplexity_per_seed'])} "
            f"| {r['token_accuracy']:.4f} ± {r['token_accuracy_std']:.4f} "
            f"| {r['agreement']:.3f} ± {r['agreement_std']:.3f} | {r['kl_to_teacher']:.3f} "
            f"| {1000 * tm['step_cpu_s'][method]:.1f} |")
    body += [
        "",
        f"Cache: top-{c['k']} of 512 per token, {c['tokens']} tokens ({c['items']} blocks), {c['bytes'] / 1e6:.1f} MB, "
        f"{c['bytes_per_token']:.1f} bytes per token (fp16 values + uint16 indices), built in {c['build_s']:.1f} s "
        "(one teacher forward over the training blocks).",
        "",
        f"Step time, cached KD / CE only: **{tm['ratio_kd_over_ce']:.3f}** (KD + CE: {tm['ratio_kd_ce_over_ce']:.3f}), "
        f"by CPU time (wall clock: {tm['wall_ratio_kd_over_ce']:.3f}, with other processes on the 2 cores). Timed "
        f"apart from the runs above: {tm['rounds']} interleaved rounds of {tm['steps']}-step runs of the same "
        "loop, configs, data and student; per run the median time between steps, per method the fastest round "
        "(the step ms column, CPU time). The KD steps read the cache's top-16 and compute the chunked sparse KL "
        "(1024 positions a chunk); the CE-only step is the plain `supervised` cross-entropy on full logits. "
        "Agreement and KL of the CE-only student are measured against the same teacher after training.",
        "",
        f"Total {out['total_s'] / 60:.1f} min ({reused}). The configs are the shipped ones: "
        "`mentor train configs/lm_stdlib_teacher.yaml`, "
        "`mentor cache build configs/lm_stdlib_kd_cached.yaml`, `mentor train configs/lm_stdlib_kd_cached.yaml` "
        "(`recipe.args.ce_weight=1` for KD + CE), `mentor train configs/lm_stdlib_scratch.yaml`.",
    ]
    write_section("lm_pretrain" + (" (quick)" if quick else ""), "\n".join(body))


if __name__ == "__main__":
    main()
