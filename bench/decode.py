"""Sampling speed of ``mentor.lm.generate.sample``: the lean decoder against the model's own forward (issue 6).

Setting of ``bench/lm.py``: the tiny student (2 layers, width 128, vocabulary 512) continues 8 arithmetic prompts
(left-padded, as ``OnPolicy`` gives them) for 32 and 128 new tokens at temperature 0.9, eos 2; one thread. Three
ways, interleaved in one process (the same machine state for each), medians over the repeats:

* ``before``: the model's forward with its KV cache and ``torch.multinomial`` (what ``sample`` did before the
  lean decoder);
* ``model``: ``sample(decoder="model")``: the model's forward, the current draw (the exponential race);
* ``lean``: ``sample(decoder="lean")`` (what ``"auto"`` picks for this model).

All three must give the same tokens (checked). Also speculative KD's interleaved sampling (student and the tiny
teacher, 4 x 256, ``top_k`` 5) with both decoders. Prints one JSON object: milliseconds per call (wall and
thread CPU time) and the speed-ups over ``before``.

    .venv/bin/python bench/decode.py            # 15 repeats
    .venv/bin/python bench/decode.py --quick    # 5 repeats
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from mentor.lm import generate
from mentor.lm.loop import lm_task_data, prompts_of
from mentor.lm.models import tiny_student, tiny_teacher


def _multinomial_draw(logits: torch.Tensor, temperature: float, top_p: float | None,
                      generator: torch.Generator) -> torch.Tensor:
    """The draw before the lean decoder: ``torch.multinomial`` (same tokens, more checks per call)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    z = logits.float() / temperature
    if top_p is not None:
        z = generate.filter_top_p(z, top_p)
    return torch.multinomial(z.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    wall, cpu = time.perf_counter(), time.thread_time()
    out = fn()
    return time.perf_counter() - wall, time.thread_time() - cpu, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 repeats instead of 15")
    args = parser.parse_args()
    torch.set_num_threads(1)
    repeats = 5 if args.quick else 15
    train, _ = lm_task_data("arithmetic", num_train=8, num_test=8, seed=0, max_new_tokens=32)
    ids, mask = prompts_of(train.x, train.y, int(train.pad_id))
    student, teacher = tiny_student(512, seed=1), tiny_teacher(512, seed=2)
    lean_draw = generate._draw

    def plain(way: str, steps: int, seed: int) -> Callable[[], Any]:
        def run() -> Any:
            generate._draw = _multinomial_draw if way == "before" else lean_draw  # type: ignore[assignment]
            try:
                return generate.sample(student, ids, mask, max_new_tokens=steps, temperature=0.9, seed=seed,
                                       eos_id=2, pad_id=0, decoder="lean" if way == "lean" else "model")
            finally:
                generate._draw = lean_draw  # type: ignore[assignment]
        return run

    def speculative(way: str, steps: int, seed: int) -> Callable[[], Any]:
        def run() -> Any:
            generate._draw = _multinomial_draw if way == "before" else lean_draw  # type: ignore[assignment]
            try:
                return generate.speculative_sample(student, teacher, ids, mask, max_new_tokens=steps, top_k=5,
                                                   temperature=0.9, seed=seed, eos_id=2, pad_id=0,
                                                   decoder="lean" if way == "lean" else "model")
            finally:
                generate._draw = lean_draw  # type: ignore[assignment]
        return run

    result: dict[str, Any] = {"settings": {"batch": int(ids.shape[0]), "prompt_width": int(ids.shape[1]),
                                           "temperature": 0.9, "repeats": repeats, "threads": 1,
                                           "torch": torch.__version__}}
    for name, make, steps_list in (("sample", plain, (32, 128)), ("speculative_sample", speculative, (32,))):
        for steps in steps_list:
            times: dict[str, list[tuple[float, float]]] = {w: [] for w in ("before", "model", "lean")}
            same = True
            for seed in range(repeats + 1):  # the first round warms up and is not counted
                outs = {}
                for way in times:
                    wall, cpu, outs[way] = _timed(make(way, steps, seed))
                    if seed:
                        times[way].append((wall, cpu))
                same &= all(torch.equal(outs[w].input_ids, outs["before"].input_ids) for w in outs)
            row: dict[str, Any] = {"same_tokens": bool(same)}
            for way, pairs in times.items():
                row[f"{way}_ms"] = round(1e3 * statistics.median(w for w, _ in pairs), 2)
                row[f"{way}_cpu_ms"] = round(1e3 * statistics.median(c for _, c in pairs), 2)
            for way in ("model", "lean"):
                row[f"{way}_speedup"] = round(row["before_ms"] / row[f"{way}_ms"], 2)
                row[f"{way}_cpu_speedup"] = round(row["before_cpu_ms"] / row[f"{way}_cpu_ms"], 2)
            result[f"{name}_{steps}"] = row
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
