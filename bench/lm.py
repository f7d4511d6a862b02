"""On-policy GKD on tiny Llamas: TRL's ``GKDTrainer`` side by side with mentor's LM pieces (issue 6).

Setting: teacher ``mentor.lm.models.tiny_teacher`` (4 layers, width 256) and student ``tiny_student`` (2 layers,
width 128), random weights, the 512-token local BPE, the built-in ``arithmetic`` task (prompt ``"12+7="``, answer
``"19"``), batch 8, generalised JSD with ``beta = 0.5``, sampling temperature 0.9 (TRL's default), ``max_new_tokens``
32, AdamW at 1e-4 with gradient clipping at 1.0 on both sides, one thread, for ``lambda`` in {0, 0.5, 1}; and
``lambda = 1`` again with ``max_new_tokens`` 128 (generation without a KV cache grows quadratically).

* **TRL** (``trl.experimental.gkd.GKDTrainer``, in the venv made by ``bench/setup_trl_env.sh``): with its defaults
  (``gradient_checkpointing=True``, so its generation runs **without** a KV cache) and with gradient checkpointing
  off (generation with the cache). Data: the task as chat ``messages`` with a minimal chat template
  (``<s>prompt`` / ``answer</s>``), which TRL's ``DataCollatorForChatML`` turns into the same token sequences as
  ``mentor.lm.data.encode_task``.
* **mentor pieces, hand loop**: a plain Python loop over the pieces of ``mentor.lm`` (not yet ``mentor.train``):
  ``generate.on_policy_at`` decides each step, ``generate.sample`` (KV cache) makes the completions, then one
  decoder pass per model (``models.final_hidden``) and chunked ``losses.token_kd`` with ``divergence("jsd",
  beta=0.5)``.

Each configuration runs in a fresh subprocess (so peak memory is its own). Measured per configuration:

* **tokens/s**: real tokens (prompt + completion, attention mask 1) of the batches the loss is computed on, per
  second of step time (sampling + forward + backward + optimizer), first steps left out as warm-up. TRL's step
  time is read from ``on_step_begin`` / ``on_step_end`` callbacks, mentor's around the loop body.
* **peak RSS**: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end (imports, models and data included), and
  the **training increment**: peak minus the resident size just before the first step (so the different import
  footprints of the two libraries are left out).
* on-policy steps: how many steps sampled (TRL draws with Python's ``random``, mentor from ``(seed, step)``).

    .venv/bin/python bench/lm.py            # full (about 5 minutes)
    .venv/bin/python bench/lm.py --quick    # a few steps per configuration
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "_work"
TRL_PYTHON = ROOT / ".venv-trl" / "bin" / "python"

BATCH, BETA, TEMPERATURE, MAX_NEW, LONG_NEW, LR, SEED = 8, 0.5, 0.9, 32, 128, 1e-4, 0
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def _rss_kib() -> int:
    """Current resident set size (KiB), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _peak_kib() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def _summary(step_times: list[float], step_tokens: list[int], warmup: int, on_policy: int, rss0: int,
             cpu_times: list[float]) -> dict:
    times, tokens, cpu = step_times[warmup:], step_tokens[warmup:], cpu_times[warmup:]
    return {
        "steps_timed": len(times),
        "tokens_per_s": sum(tokens) / sum(times),
        "tokens_per_cpu_s": sum(tokens) / sum(cpu),  # the process's CPU time: robust to other load on the cores
        "step_s": sum(times) / len(times),
        "tokens_per_step": sum(tokens) / len(tokens),
        "on_policy_steps": on_policy,
        "peak_rss_mib": _peak_kib() / 1024,
        "train_increment_mib": (_peak_kib() - rss0) / 1024,
    }


# ------------------------------------------------------------------------------------------------------- workers


def _task(steps: int):
    from mentor.lm import data

    tok = data.tokenizer()
    task = data.arithmetic(BATCH * steps, seed=SEED)
    return tok, task


def worker_trl(cfg: dict[str, Any]) -> dict[str, Any]:
    import random
    import tempfile
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import datasets
    import transformers
    import trl
    from transformers import TrainerCallback

    try:
        from trl import GKDConfig, GKDTrainer  # type: ignore[attr-defined]
    except ImportError:
        from trl.experimental.gkd import GKDConfig, GKDTrainer

    from mentor.lm.models import tiny_student, tiny_teacher

    steps, warmup = cfg["steps"], cfg["warmup"]
    tok, task = _task(steps)
    tok.chat_template = CHAT_TEMPLATE
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
            for p, a in zip(task.prompts, task.answers, strict=True)]
    dataset = datasets.Dataset.from_list(rows)
    student, teacher = tiny_student(len(tok), seed=1), tiny_teacher(len(tok), seed=2)
    student.generation_config.eos_token_id = tok.eos_token_id
    student.generation_config.pad_token_id = tok.pad_token_id
    kwargs: dict[str, Any] = {}
    if cfg["gradient_checkpointing"] is not None:
        kwargs["gradient_checkpointing"] = cfg["gradient_checkpointing"]
    args = GKDConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_gkd_"), per_device_train_batch_size=BATCH, max_steps=steps,
        learning_rate=LR, lmbda=cfg["lmbda"], beta=BETA, temperature=TEMPERATURE, max_new_tokens=cfg["max_new"],
        logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
        seed=SEED, disable_tqdm=True, max_length=256, max_grad_norm=1.0, **kwargs,
    )
    counts = {"tokens": [], "on_policy": 0}
    times: list[float] = []
    cpu_times: list[float] = []

    class Counting(GKDTrainer):  # type: ignore[misc, valid-type]
        def compute_loss(self, model, inputs, *a, **kw):  # type: ignore[no-untyped-def]
            counts["tokens"].append(int(inputs["attention_mask"].sum()))
            return super().compute_loss(model, inputs, *a, **kw)

        @staticmethod
        def generate_on_policy_outputs(model, inputs, generation_config):  # type: ignore[no-untyped-def]
            counts["on_policy"] += 1
            return GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)

    class Clock(TrainerCallback):
        def on_step_begin(self, *a: Any, **kw: Any) -> None:
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a: Any, **kw: Any) -> None:
            times.append(time.perf_counter() - self.t0)
            cpu_times.append(time.process_time() - self.c0)

    trainer = Counting(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                       processing_class=tok, callbacks=[Clock()])
    random.seed(SEED)
    rss0 = _rss_kib()
    trainer.train()
    out = _summary(times, counts["tokens"], warmup, counts["on_policy"], rss0, cpu_times)
    out.update({
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "generation_use_cache": bool(trainer.generation_config.use_cache),
        "versions": f"trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}",
    })
    return out


def worker_mentor(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers

    torch.set_num_threads(1)
    from mentor.lm import data
    from mentor.lm.generate import on_policy_at, sample
    from mentor.lm.losses import divergence, token_kd
    from mentor.lm.models import final_hidden, output_head, tiny_student, tiny_teacher

    steps, warmup = cfg["steps"], cfg["warmup"]
    tok, task = _task(steps)
    enc = data.encode_task(task, tok)
    student, teacher = tiny_student(len(tok), seed=1), tiny_teacher(len(tok), seed=2)
    teacher.eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=LR)
    div = divergence("jsd", beta=BETA)
    s_head, t_head = output_head(student), output_head(teacher)
    times: list[float] = []
    cpu_times: list[float] = []
    tokens: list[int] = []
    on_policy = 0
    rss0 = _rss_kib()
    for step in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        rows = slice(step * BATCH, (step + 1) * BATCH)
        if on_policy_at(step, cfg["lmbda"], SEED):
            on_policy += 1
            g = sample(student, enc.prompt_ids[rows], enc.prompt_mask[rows], max_new_tokens=cfg["max_new"],
                       temperature=TEMPERATURE, seed=SEED * 100_003 + step, eos_id=tok.eos_token_id,
                       pad_id=tok.pad_token_id)
            ids, mask, labels = g.input_ids, g.attention_mask, g.labels
        else:
            ids, mask, labels = enc.input_ids[rows], enc.attention_mask[rows], enc.labels[rows]
        hs = final_hidden(student, ids, mask)
        with torch.no_grad():
            ht = final_hidden(teacher, ids, mask)
        loss = token_kd(hs, s_head, ht, t_head, labels, divergence=div)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        tokens.append(int(mask.sum()))
    out = _summary(times, tokens, warmup, on_policy, rss0, cpu_times)
    out["versions"] = f"transformers {transformers.__version__}, torch {torch.__version__}"
    return out


def worker_mentor_fit(cfg: dict[str, Any]) -> dict[str, Any]:
    """The same configuration through mentor's own loop: ``train.fit`` with ``recipes.gkd`` (on-policy batches from
    the loop's batch hook, full-logit generalised JSD over target positions)."""
    import torch
    import transformers

    torch.set_num_threads(1)
    from mentor import recipes, teachers
    from mentor.lm.generate import on_policy_at
    from mentor.lm.loop import lm_task_data
    from mentor.lm.models import tiny_student, tiny_teacher
    from mentor.train import Optim, fit

    steps, warmup = cfg["steps"], cfg["warmup"]
    train, _ = lm_task_data("arithmetic", num_train=BATCH * steps, num_test=8, seed=SEED,
                            max_new_tokens=cfg["max_new"])
    student, teacher = tiny_student(512, seed=1), tiny_teacher(512, seed=2)
    pad = int(train.pad_id)
    tokens: list[int] = []
    times: list[float] = []
    cpu_times: list[float] = []
    clock = [time.perf_counter(), time.process_time()]

    class Clock(teachers.Frozen):  # the loop calls update once per optimiser step
        def update(self, _student: torch.nn.Module, _step: int) -> None:
            now, cpu = time.perf_counter(), time.process_time()
            times.append(now - clock[0])
            cpu_times.append(cpu - clock[1])
            clock[0], clock[1] = now, cpu

    method = recipes.gkd(lmbda=cfg["lmbda"], beta=BETA, max_new_tokens=cfg["max_new"],
                         sample_temperature=TEMPERATURE, eos_id=int(train.eos_id), pad_id=pad)
    hook = method.batch_hook
    assert hook is not None

    def count(x: torch.Tensor, y: torch.Tensor, context: Any) -> tuple[torch.Tensor, torch.Tensor]:
        # The tokens of each training batch, as the batch hook leaves it (a forward hook on the student would also
        # keep generate.sample off its lean decoder, which runs no module's forward).
        x, y = hook(x, y, context)
        tokens.append(int((x != pad).sum()))
        return x, y

    method = dataclasses.replace(method, batch_hook=count)
    rss0 = _rss_kib()
    clock[0], clock[1] = time.perf_counter(), time.process_time()
    result = fit(student, method, train, teacher=Clock(teacher), epochs=1, max_steps=steps, batch_size=BATCH,
                 optim=Optim(lr=LR, schedule="constant", grad_clip=1.0), seed=SEED, progress=False,
                 log_every=10**6)
    assert result.steps == steps and len(tokens) >= steps
    on_policy = sum(1 for s in range(steps) if on_policy_at(s, cfg["lmbda"], SEED))
    out = _summary(times, tokens[-steps:], warmup, on_policy, rss0, cpu_times)
    out["versions"] = f"transformers {transformers.__version__}, torch {torch.__version__}"
    return out


# ---------------------------------------------------------------------------------------------------------- main


def run_config(python: Path, cfg: dict[str, Any], log) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONPATH": str(ROOT / "src")}
    t0 = time.perf_counter()
    proc = subprocess.run([str(python), __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True,
                          env=env, timeout=1800)
    log.write(f"--- {cfg} ({time.perf_counter() - t0:.0f} s, rc {proc.returncode})\n{proc.stderr[-4000:]}\n")
    log.flush()
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| side | setting | lambda | max_new_tokens | tokens per CPU s | tokens/s (wall) | step (s, wall) "
             "| tokens/step | on-policy steps | peak RSS (MiB) | training increment (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = r["result"]
        if "error" in m:
            lines.append(f"| {r['side']} | {r['setting']} | {r['lmbda']} | {r['max_new']} | error: {m['error']} "
                         "| | | | | | |")
            continue
        lines.append(
            f"| {r['side']} | {r['setting']} | {r['lmbda']} | {r['max_new']} | {m['tokens_per_cpu_s']:.0f} | "
            f"{m['tokens_per_s']:.0f} | "
            f"{m['step_s']:.3f} | {m['tokens_per_step']:.0f} | {m['on_policy_steps']}/{r['steps']} | "
            f"{m['peak_rss_mib']:.0f} | {m['train_increment_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps per configuration")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds over all configurations, interleaved; each figure is the median over rounds "
                             "(default 3, quick 1)")
    args = parser.parse_args()
    if args.worker:
        cfg = json.loads(args.worker)
        fn = {"trl": worker_trl, "mentor": worker_mentor, "mentor_fit": worker_mentor_fit}[cfg["side"]]
        print(json.dumps(fn(cfg)))
        return

    steps, warmup = (5, 1) if args.quick else (16, 3)
    WORK.mkdir(parents=True, exist_ok=True)
    trl_ok = TRL_PYTHON.exists()
    mentor_python = TRL_PYTHON if trl_ok else Path(sys.executable)  # same torch/transformers for both when possible
    plan: list[tuple[str, str, Path, dict[str, Any]]] = []
    for lmbda, max_new in ((0.0, MAX_NEW), (0.5, MAX_NEW), (1.0, MAX_NEW), (1.0, LONG_NEW)):
        base = {"lmbda": lmbda, "steps": steps, "warmup": warmup, "max_new": max_new}
        plan.append(("mentor pieces, hand loop", "lean decoder, chunked token_kd", mentor_python,
                     {**base, "side": "mentor"}))
        plan.append(("mentor train.fit", "recipes.gkd, lean decoder, chunked token KD", mentor_python,
                     {**base, "side": "mentor_fit"}))
        if trl_ok:
            plan.append(("TRL GKDTrainer", "defaults (gradient checkpointing on)", TRL_PYTHON,
                         {**base, "side": "trl", "gradient_checkpointing": None}))
            plan.append(("TRL GKDTrainer", "gradient checkpointing off", TRL_PYTHON,
                         {**base, "side": "trl", "gradient_checkpointing": False}))
    repeats = args.repeats or (1 if args.quick else 3)
    if repeats < 1:
        parser.error(f"--repeats must be >= 1, got {repeats}")
    runs: list[list[dict[str, Any]]] = [[] for _ in plan]
    with open(WORK / "lm_workers.log", "w") as log:
        for round_ in range(repeats):  # round-robin: every configuration sees the same machine load over time
            for i, (side, setting, python, cfg) in enumerate(plan):
                runs[i].append(run_config(python, cfg, log))
                print(json.dumps({"round": round_, "side": side, "setting": setting, **cfg,
                                  "result": runs[i][-1]}), flush=True)
    results = []
    for (side, setting, _, cfg), rs in zip(plan, runs, strict=True):
        ok = [r for r in rs if "error" not in r]
        res: dict[str, Any] = dict(rs[-1]) if not ok else {
            **ok[-1], **{k: statistics.median(r[k] for r in ok) for k in ok[-1] if isinstance(ok[-1][k], float)},
            "rounds": len(ok)}
        results.append({"side": side, "setting": setting, "lmbda": cfg["lmbda"], "max_new": cfg["max_new"],
                        "steps": steps, "result": res, "runs": rs})

    def find(side: str, setting_part: str, lmbda: float, max_new: int) -> dict[str, Any] | None:
        for r in results:
            if (r["side"].startswith(side) and setting_part in r["setting"] and r["lmbda"] == lmbda
                    and r["max_new"] == max_new):
                return r["result"] if "error" not in r["result"] else None
        return None

    ratios = []
    for lmbda, max_new in ((0.0, MAX_NEW), (0.5, MAX_NEW), (1.0, MAX_NEW), (1.0, LONG_NEW)):
        for ours, label in (("mentor pieces", "hand loop"), ("mentor train", "train.fit")):
            m = find(ours, "", lmbda, max_new)
            for part, name in (("defaults", "TRL defaults"), ("off", "TRL without gradient checkpointing")):
                t = find("TRL", part, lmbda, max_new)
                if m and t:
                    ratios.append(
                        f"| {label} | {lmbda} | {max_new} | {name} | "
                        f"{m['tokens_per_cpu_s'] / t['tokens_per_cpu_s']:.2f}x | "
                        f"{m['tokens_per_s'] / t['tokens_per_s']:.2f}x | "
                        f"{m['peak_rss_mib'] / t['peak_rss_mib']:.2f}x | "
                        f"{m['train_increment_mib'] / max(t['train_increment_mib'], 1e-9):.2f}x |"
                    )
    summary = {"settings": {"batch": BATCH, "beta": BETA, "temperature": TEMPERATURE,
                            "max_new_tokens": [MAX_NEW, LONG_NEW],
                            "lr": LR, "steps": steps, "warmup_steps": warmup}, "results": results}
    (WORK / ("lm_quick.json" if args.quick else "lm.json")).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))

    versions = sorted({r["result"].get("versions", "") for r in results if "versions" in r["result"]})
    body = [
        "On-policy GKD on the tiny Llamas (teacher 4 x 256, student 2 x 128, vocabulary 512), arithmetic task, "
        f"batch {BATCH}, beta {BETA}, sampling temperature {TEMPERATURE}, max_new_tokens {MAX_NEW} (and {LONG_NEW} "
        f"at lambda = 1), AdamW {LR}, "
        f"{steps} steps per configuration ({warmup} warm-up steps not timed), one thread, one fresh process per "
        f"configuration and round, {repeats} interleaved round(s), medians over rounds. Speed is given in tokens per "
        "second of the process's CPU time (what the work costs; robust to other processes on the shared cores) and "
        "of wall time. Random weights: the student seldom emits eos, so on-policy completions mostly run to "
        "max_new_tokens (tokens/step gives the real lengths). 'mentor pieces, hand loop' is a plain script over "
        "`mentor.lm` (`generate.sample`, one decoder pass per model, chunked `losses.token_kd` with "
        "generalised JSD); 'mentor train.fit' is `mentor.train.fit` with `recipes.gkd` (its defaults: the lean "
        "decoder of `mentor.lm.decode` for sampling, chunked token KD). Memory: peak RSS of the process, and the "
        "increment over the resident size just before the first step.",
        "",
        f"Versions: {'; '.join(versions) if versions else 'n/a'}.",
        "",
    ]
    if not trl_ok:
        body += [f"TRL not measured: {TRL_PYTHON} does not exist (run `bash bench/setup_trl_env.sh`).", ""]
    body += [table(results), ""]
    if ratios:
        body += ["mentor / TRL (goal: tokens/s >= 2x at lambda = 1; peak memory <= 0.8x):", "",
                 "| mentor side | lambda | max_new_tokens | against | tokens per CPU second | tokens/s (wall) "
                 "| peak RSS | training increment |",
                 "|---|---|---|---|---|---|---|---|",
                 *ratios, ""]
    if args.quick:
        body.insert(0, "**Quick run (`--quick`): few steps, numbers are indicative only.**\n")
    if not args.no_write:
        from _results import write_section

        write_section("LM distillation: on-policy GKD against TRL (bench/lm.py)", "\n".join(body))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
