"""Teachers that learn alongside, on MNIST-1D, 3 seeds: Deep Mutual Learning and multi-teacher distillation.

**DML** (``recipes.dml``): cohorts of 2 and 3 peers of the same architecture, for two families: the narrow
``CNN1d(channels=8)`` of ``catalogue_mnist1d.py`` (which underfits here) and the full ``CNN1d`` (25 channels, 100%
training accuracy), peer ``i`` initialised from seed ``100 * seed + i``, against each peer trained alone
(``supervised``) from the same initialisation, same data order, optimiser and steps. Goal: every peer of a cohort
beats itself trained alone (mean over seeds).

**multi_teacher** (``recipes.multi_teacher``): three teachers of different architectures trained once on the
4000 labelled items (``CNN1d`` 25 channels, ``MLP(256, 256)``, ``GRUClassifier(hidden=64)``, cached in
``bench/_work/``), combined by the mean of their probabilities, per-item confidence (largest probability;
entropy) or a learned router on the input, against ``hinton_kd`` from each teacher alone; the student is the narrow
CNN again (its scratch accuracy is the DML table's peer 0 alone). Goal: the best multi-teacher student at least
matches the student of the best single teacher.

Every student trains 60 epochs on the 4000 labelled items, batch 100, AdamW cosine at lr 1e-2; KD at T=4,
alpha=0.9 (the KD term's weight). One thread.

``noisy_student_rows(...)`` runs Noisy Student (``recipes.noisy_student``) for the semi-supervised benchmark
(``bench/ssl_mnist1d.py``: 400 labels, the other 3600 training items unlabelled, 3 generations): the same
``PseudoLabels`` teachers and loop as ``mentor train`` with ``recipe: noisy_student``.

    python bench/online.py                  # full (about 25 minutes on one free core)
    python bench/online.py --quick          # the same comparisons, smaller (about 1 minute)
    python bench/online.py --noisy          # also Noisy Student at 400 labels (3 generations), reported here
    python bench/online.py --part dml &  python bench/online.py --part multi noisy   # parts in parallel

Each part's result is stored in ``bench/_work/online_<part>.json`` with its command; every run rewrites the
RESULTS.md section from the parts stored there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_section

from mentor import atomic, data, models, recipes, teachers, train
from mentor.eval import evaluate
from mentor.recipes.noisy_student import pseudo_label_teacher

WORK = Path(__file__).resolve().parent / "_work"
BATCH, LR, T, ALPHA = 100, 1e-2, 4.0, 0.9


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"epochs": 4, "teacher_epochs": 10, "n_labelled": 1000, "seeds": [0, 1, 2]}
    return {"epochs": 60, "teacher_epochs": 60, "n_labelled": 4000, "seeds": [0, 1, 2]}


def peer(seed: int, channels: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return models.CNN1d(channels=channels)


FAMILIES = {"CNN1d(8)": 8, "CNN1d(25)": 25}
"""The DML peer families: the narrow CNN (which underfits here: 8 channels) and the full CNN (which reaches 100%
training accuracy, i.e. overfits)."""


def fit(model: nn.Module, method: Any, ds: data.TensorData, epochs: int, seed: int,
        teacher: Any = None, lr: float = LR) -> float:
    """Train ``model`` in place; return the wall time."""
    start = time.perf_counter()
    train.fit(model, method, ds, teacher=teacher, epochs=epochs, batch_size=BATCH,
              optim=train.Optim(lr=lr, schedule="cosine"), seed=seed, progress=False, log_every=100_000)
    return time.perf_counter() - start


def summarise(values: Sequence[float]) -> dict[str, Any]:
    return {"accs": list(values), "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def cell(row: dict[str, Any]) -> str:
    return f"{100 * row['mean']:.1f} ± {100 * row['std']:.1f}"


# ------------------------------------------------------------------------------------------------------------ DML


def dml_bench(cfg: dict[str, Any], labelled: data.TensorData, test: data.TensorData) -> dict[str, Any]:
    """Each peer family: ``{family: dml_family(...)}``."""
    return {name: dml_family(cfg, labelled, test, channels) for name, channels in FAMILIES.items()}


def dml_family(cfg: dict[str, Any], labelled: data.TensorData, test: data.TensorData,
               channels: int) -> dict[str, Any]:
    """Peers alone vs in cohorts of 2 and 3: ``{setting: {peer: [acc per seed]}}``."""
    acc: dict[str, dict[int, list[float]]] = {"alone": {0: [], 1: [], 2: []}, "dml2": {0: [], 1: []},
                                              "dml3": {0: [], 1: [], 2: []}}
    seconds: dict[str, list[float]] = {"alone": [], "dml2": [], "dml3": []}
    train_acc: list[float] = []
    for seed in cfg["seeds"]:
        for i in range(3):
            m = peer(100 * seed + i, channels)
            seconds["alone"].append(fit(m, recipes.supervised(), labelled, cfg["epochs"], seed))
            acc["alone"][i].append(evaluate(m, test)["accuracy"])
            train_acc.append(evaluate(m, labelled)["accuracy"])
        for k in (2, 3):
            peers = [peer(100 * seed + i, channels) for i in range(k)]
            seconds[f"dml{k}"].append(fit(recipes.Cohort(peers), recipes.dml(peers=k), labelled, cfg["epochs"], seed))
            for i, p in enumerate(peers):
                acc[f"dml{k}"][i].append(evaluate(p, test)["accuracy"])
        print(json.dumps({"dml_channels": channels, "dml_seed": seed, "acc": acc}), file=sys.stderr)
    table = {s: {i: summarise(v) for i, v in rows.items()} for s, rows in acc.items()}
    goals = {f"dml{k}_peer{i}_minus_alone_points": 100 * (table[f"dml{k}"][i]["mean"] - table["alone"][i]["mean"])
             for k in (2, 3) for i in range(k)}
    goals["every_peer_improves"] = all(v > 0 for v in goals.values())
    return {"table": table, "seconds": {k: statistics.median(v) for k, v in seconds.items()}, "goals": goals,
            "alone_train_accuracy": statistics.mean(train_acc)}


# ---------------------------------------------------------------------------------------------- multi-teacher


TEACHERS: dict[str, tuple[Callable[[], nn.Module], float]] = {
    "CNN": (lambda: models.CNN1d(), 1e-2),
    "MLP": (lambda: models.MLP(hidden=(256, 256)), 1e-3),
    "GRU": (lambda: models.GRUClassifier(hidden=64), 1e-2),
}


def teacher_models(cfg: dict[str, Any], labelled: data.TensorData) -> dict[str, nn.Module]:
    """The three teachers, trained once per setting and cached in ``bench/_work/``."""
    from safetensors.torch import load_file

    out: dict[str, nn.Module] = {}
    for name, (make, lr) in TEACHERS.items():
        path = WORK / f"online_teacher_{name}_e{cfg['teacher_epochs']}_n{cfg['n_labelled']}.safetensors"
        torch.manual_seed(1234)
        model = make()
        if path.is_file():
            model.load_state_dict(load_file(str(path)))
        else:
            fit(model, recipes.supervised(), labelled, cfg["teacher_epochs"], 1234, lr=lr)
            train.save_model(model, path)
        out[name] = model.eval()
    return out


def multi_teacher_bench(cfg: dict[str, Any], labelled: data.TensorData, test: data.TensorData) -> dict[str, Any]:
    nets = teacher_models(cfg, labelled)
    teacher_acc = {n: evaluate(m, test)["accuracy"] for n, m in nets.items()}
    print(json.dumps({"teacher_accuracy": teacher_acc}), file=sys.stderr)
    frozen = [teachers.Frozen(m) for m in nets.values()]

    def ensemble(by: str) -> teachers.Ensemble:
        router = teachers.Router(labelled.x[0].numel(), len(frozen)) if by == "router" else None
        return teachers.Ensemble(frozen, by=by, router=router)

    rows: dict[str, list[float]] = {f"KD from {n}": [] for n in nets}
    rows.update({"mean": [], "max_prob": [], "entropy": [], "router": []})
    ens_acc: dict[str, float] = {}
    for by in ("fixed", "max_prob", "entropy"):
        mix = ensemble(by).targets(test.x)["logits"]
        ens_acc["mean" if by == "fixed" else by] = float((mix.argmax(-1) == test.y).double().mean())
    for seed in cfg["seeds"]:
        for n, net in nets.items():
            s = peer(100 * seed)
            fit(s, recipes.hinton_kd(temperature=T, alpha=ALPHA), labelled, cfg["epochs"], seed,
                teacher=teachers.Frozen(net))
            rows[f"KD from {n}"].append(evaluate(s, test)["accuracy"])
        for by in ("mean", "max_prob", "entropy", "router"):
            ens = ensemble("fixed" if by == "mean" else by)
            s = peer(100 * seed)
            fit(s, recipes.multi_teacher(temperature=T, alpha=ALPHA, router=by == "router"), labelled,
                cfg["epochs"], seed, teacher=ens)
            rows[by].append(evaluate(s, test)["accuracy"])
            if by == "router":
                mix = ens.targets(test.x)["logits"]
                ens_acc.setdefault("router", 0.0)
                ens_acc["router"] += float((mix.argmax(-1) == test.y).double().mean()) / len(cfg["seeds"])
        print(json.dumps({"multi_teacher_seed": seed, "rows": rows}), file=sys.stderr)
    table = {k: summarise(v) for k, v in rows.items()}
    single = {k: v for k, v in table.items() if k.startswith("KD from")}
    best_single = max(single, key=lambda k: single[k]["mean"])
    best_multi = max(("mean", "max_prob", "entropy", "router"), key=lambda k: table[k]["mean"])
    goals = {"best_single": best_single, "best_multi": best_multi,
             "best_multi_minus_best_single_points": 100 * (table[best_multi]["mean"] - table[best_single]["mean"]),
             "multi_matches_best_single": table[best_multi]["mean"] >= table[best_single]["mean"]}
    return {"teacher_accuracy": teacher_acc, "ensemble_accuracy": ens_acc, "table": table, "goals": goals}


# ------------------------------------------------------------------------------------------------ Noisy Student


def noisy_student_rows(
    train_data: data.TensorData,
    test: data.TensorData,
    make_model: Callable[[int], nn.Module],
    seeds: Sequence[int] = (0, 1, 2),
    *,
    generations: int = 3,
    epochs: int = 60,
    steps: int | None = None,
    batch_size: int = BATCH,
    lr: float = LR,
    hard: bool = False,
    augment: str = "weak",
    magnitude: float = 0.5,
    gen0_method: Any = None,
) -> dict[str, Any]:
    """Noisy Student on ``train_data`` (labelled items plus unlabelled ones marked ``-1``), as ``mentor train``
    runs it: generation 0 is ``make_model(seed)`` trained with ``supervised`` on the labelled items alone for as
    many steps as one generation takes; generation ``k >= 1`` is a fresh ``make_model(seed + k)`` trained on every
    item against generation ``k - 1``'s pseudo-labels of the clean inputs (labelled items keep their labels), with
    the student's input noised by ``augment`` (and the model's own dropout, if any).

    Args:
        train_data: All training items; unlabelled ones carry label ``-1``.
        test: Evaluation data.
        make_model: ``seed -> model`` (set the seed inside; e.g. ``lambda s: (torch.manual_seed(s), CNN1d())[1]``).
        seeds: One run of all generations per seed.
        generations: Student generations after generation 0.
        epochs: Epochs over ``train_data`` per generation.
        steps: Steps per generation instead (``None``: ``epochs`` decides).
        batch_size: Batch size.
        lr: AdamW peak learning rate (cosine schedule).
        hard: Hard pseudo-labels.
        augment: ``"strong"``, ``"weak"`` or ``"none"`` (see :func:`mentor.recipes.noisy_student.student_noise`).
        magnitude: RandAugment magnitude of ``"strong"``.
        gen0_method: How generation 0 learns the labelled items (default ``recipes.supervised()``; e.g. with a
            weak view, as the semi-supervised baselines do).

    Returns:
        ``{"generations": [{"generation": k, "accs": [...], "mean": m, "std": s}, ...], "seconds": s}``
        (generation 0 is the supervised teacher).
    """
    known = train_data.y >= 0
    labelled = data.TensorData(train_data.x[known], train_data.y[known])
    per_epoch = len(train_data) // batch_size
    steps = per_epoch * epochs if steps is None else steps
    epochs = -(-steps // per_epoch)
    gen0_epochs = -(-steps // (len(labelled) // batch_size))
    method = recipes.noisy_student(generations=generations, hard=hard, augment=augment, magnitude=magnitude)
    accs: list[list[float]] = [[] for _ in range(generations + 1)]
    start = time.perf_counter()
    for seed in seeds:
        model = make_model(seed + 1000)
        train.fit(model, gen0_method or recipes.supervised(), labelled, epochs=gen0_epochs, max_steps=steps,
                  batch_size=batch_size, optim=train.Optim(lr=lr, schedule="cosine"), seed=seed + 1000,
                  progress=False, log_every=100_000)
        accs[0].append(evaluate(model, test)["accuracy"])
        for gen in range(1, generations + 1):
            teacher = pseudo_label_teacher(model, train_data.x, train_data.y, hard=hard, augment=augment,
                                           magnitude=magnitude, seed=seed)
            model = make_model(seed + gen - 1)
            train.fit(model, method, train_data, teacher=teacher, epochs=epochs, max_steps=steps, batch_size=batch_size,
                      optim=train.Optim(lr=lr, schedule="cosine"), seed=seed + gen - 1, progress=False,
                      log_every=100_000)
            accs[gen].append(evaluate(model, test)["accuracy"])
        print(json.dumps({"noisy_student_seed": seed, "accs": accs}), file=sys.stderr)
    return {"generations": [{"generation": g, **summarise(a)} for g, a in enumerate(accs)],
            "seconds": time.perf_counter() - start}


def ssl_split(num_labelled: int = 400, seed: int = 0) -> data.TensorData:
    """The 4000 MNIST-1D training items, all but ``num_labelled`` (stratified, seeded) marked unlabelled."""
    lab, rest = data.stratified_split(data.mnist1d("train"), num_labelled, seed=seed)
    return data.TensorData(torch.cat([lab.x, rest.x]), torch.cat([lab.y, rest.y]))


# ------------------------------------------------------------------------------------------------------- main


PARTS = ("dml", "multi", "noisy")


def _part_path(part: str, quick: bool) -> Path:
    return WORK / f"online_{part}{'_quick' if quick else ''}.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the same comparisons, smaller (about 2 minutes)")
    parser.add_argument("--noisy", action="store_true", help="also Noisy Student, 400 labels, 3 generations")
    parser.add_argument("--part", choices=PARTS, nargs="+", default=None,
                        help="run only these parts (in separate processes at once, say); every run writes the "
                             "section from the parts stored in bench/_work/, each with the command that made it")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = settings(args.quick)
    WORK.mkdir(exist_ok=True)
    parts = args.part or (["dml", "multi"] + (["noisy"] if args.noisy else []))
    labelled, test = data.mnist1d("train", cfg["n_labelled"]), data.mnist1d("test")
    command = "python " + " ".join(["bench/online.py", *sys.argv[1:]])
    for part in parts:
        started = time.perf_counter()
        if part == "dml":
            result: Any = dml_bench(cfg, labelled, test)
        elif part == "multi":
            result = multi_teacher_bench(cfg, labelled, test)
        else:
            result = noisy_student_rows(ssl_split(400), test, _cnn, epochs=cfg["epochs"])
        stored = {"result": result, "minutes": (time.perf_counter() - started) / 60, "command": command,
                  "settings": cfg}
        atomic.write_text(_part_path(part, args.quick), json.dumps(stored))
    have = {p: json.loads(_part_path(p, args.quick).read_text()) for p in PARTS if _part_path(p, args.quick).is_file()}
    write_section("online" + (" (quick)" if args.quick else ""), _markdown(have, cfg))
    print(json.dumps({"benchmark": "online", "quick": args.quick, "settings": cfg, **have}))


def _markdown(have: dict[str, Any], cfg: dict[str, Any]) -> str:
    body = [f"MNIST-1D test accuracy (%), mean ± std over seeds {cfg['seeds']}; {cfg['n_labelled']} labelled items, "
            f"{cfg['epochs']} epochs, batch {BATCH}, AdamW cosine lr {LR}, one thread. Each part with its command "
            "and its minutes (wall time on a shared machine)."]
    if "dml" in have:
        dml = have["dml"]
        body.append(f"**DML** (`{dml['command']}`, {dml['minutes']:.1f} min): each peer alone vs the same peer (same "
                    "initialisation, data order, optimiser, steps) in a cohort; CE + mean KL to the other peers' "
                    "detached predictions, T=1.")
        for family, res in dml["result"].items():
            d = res["table"]
            lines = [f"| {family} peer | alone | in DML-2 | in DML-3 |", "|---|---|---|---|"]
            for i in ("0", "1", "2"):
                lines.append(f"| peer {i} | {cell(d['alone'][i])} | "
                             f"{cell(d['dml2'][i]) if i in d['dml2'] else '-'} | {cell(d['dml3'][i])} |")
            body.append("\n".join(lines) + f"\n\nTraining accuracy alone: {100 * res['alone_train_accuracy']:.1f}. "
                        f"Goal (every peer improves): `{json.dumps(res['goals'])}`")
    if "multi" in have:
        multi = have["multi"]
        m = multi["result"]
        lines = ["| student (CNN1d(8)) learns from | student accuracy | teacher / ensemble accuracy |",
                 "|---|---|---|"]
        for k, row in m["table"].items():
            t_acc = (m["teacher_accuracy"][k.split()[-1]] if k.startswith("KD from")
                     else m["ensemble_accuracy"].get(k))
            label = k if k.startswith("KD from") else f"multi_teacher ({k})"
            lines.append(f"| {label} | {cell(row)} | {100 * t_acc:.1f} |" if t_acc is not None else
                         f"| {label} | {cell(row)} | - |")
        body.append(f"**multi_teacher** (`{multi['command']}`, {multi['minutes']:.1f} min): teachers trained "
                    f"{cfg['teacher_epochs']} epochs (CNN1d(25) and GRU(64) at lr 1e-2, MLP(256, 256) at lr 1e-3); "
                    f"KD at T={T}, alpha={ALPHA}; the router's ensemble accuracy is the mean over seeds of the "
                    "trained routers.\n\n" + "\n".join(lines)
                    + "\n\nGoal (the best multi-teacher student at least matches the best single teacher's): "
                    f"`{json.dumps(m['goals'])}`")
    if "noisy" in have:
        noisy = have["noisy"]
        gens = " | ".join(f"gen {g['generation']}: {cell(g)}" for g in noisy["result"]["generations"])
        body.append(f"**noisy_student** (`{noisy['command']}`, {noisy['minutes']:.1f} min): 400 labels (40 per "
                    "class), the other 3600 training items unlabelled, CNN1d(25) with dropout 0.3, soft "
                    "pseudo-labels, the weak signal view (shift, scaling) on the student's input, batch 100, lr "
                    f"1e-2, {cfg['epochs']} epochs over the 4000 items per generation; gen 0 = supervised on the "
                    f"400 labels for as many steps: {gens}. With the strong view (RandAugment + cutout) instead, "
                    "generations 2 and 3 fall below generation 1 (measured apart with "
                    "`noisy_student_rows(..., augment=\"strong\")`, seeds 0 and 1, 60 epochs: gen 0-3 56.0 / 60.0 / "
                    "53.7 / 51.7).")
    return "\n\n".join(body)


def _cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return models.CNN1d(dropout=0.3)


if __name__ == "__main__":
    main()
