"""The ``mentor`` command line: ``train``, ``eval``, ``report``, ``recipes``, ``demo``, ``select``, ``cache``.

Every command has ``--help``. Configuration errors are printed as one clear message (exit status 2) before any
work starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "format_table"]

_COLUMNS = [("name", "student"), ("accuracy", "accuracy"), ("agreement", "agreement"),
            ("kl_to_teacher", "KL(t||s)"), ("ece", "ECE"), ("params", "params"), ("latency_ms", "latency ms/batch")]


_LM_COLUMNS = [("name", "student"), ("exact_match", "exact match"), ("perplexity", "perplexity"),
               ("token_accuracy", "token acc."), ("agreement", "agreement"), ("kl_to_teacher", "KL(t||s)/token"),
               ("params", "params"), ("latency_ms", "latency ms/batch")]


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]] | None = None) -> str:
    """A plain-text table of ``rows`` (missing values print as ``-``); by default the classification columns, or
    the language-model ones (exact match, perplexity, ...) when the rows have a perplexity."""
    if columns is None:
        columns = _LM_COLUMNS if any("perplexity" in r for r in rows) else _COLUMNS

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    header = [title for _, title in columns]
    body = [[cell(r.get(key)) for key, _ in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    out = [line, sep] + ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(out)


def _cmd_train(args: argparse.Namespace) -> int:
    from mentor.config import load_config
    from mentor.run import is_main_process, run

    cfg = load_config(args.config, args.overrides)
    result = run(cfg, resume=args.resume)
    if not is_main_process():
        return 0
    first = result.first_generation
    layered = len(result.generations) > 1 or first == 0
    rows = [{"name": f"{cfg.name}" + (f" gen{first + i}" if layered else ""), **r.metrics}
            for i, r in enumerate(result.generations)]
    rows += [{"name": f"{cfg.name} peer{i}", **peer}  # a dml cohort: every peer on its own
             for i, peer in enumerate(result.final.metrics.get("peers", []))]
    print(format_table(rows))
    print(f"run directory: {cfg.run_dir}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from mentor.config import ConfigError, load_config
    from mentor.eval import evaluate
    from mentor.run import build_student, load_data, load_teacher
    from mentor.teachers import Frozen
    from mentor.train import load_model_weights

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "student.safetensors").is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a finished run directory (expected config.yaml and "
                          "student.safetensors)")
    cfg = load_config(run_dir / "config.yaml")
    student = build_student(cfg)
    load_model_weights(student, run_dir / "student.safetensors")
    has_network = cfg.teacher is not None and (cfg.teacher.run is not None or cfg.teacher.checkpoint is not None)
    has_network = has_network and cfg.teacher_shares_vocabulary  # another tokenizer: no agreement / KL
    teacher = Frozen(load_teacher(cfg.teacher)) if has_network else None  # type: ignore[arg-type]
    _, test = load_data(cfg)
    metrics = {"name": cfg.name, **evaluate(student, test, teacher, timing=True)}
    if args.json:
        print(json.dumps(metrics))
    else:
        print(format_table([metrics]))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from mentor.report import write_report

    path = write_report(args.run_dir)
    print(f"wrote {path}")
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from mentor.recipes import RECIPES

    width = max(len(n) for n in RECIPES)
    for name, fn in RECIPES.items():
        description = fn().description
        print(f"{name.ljust(width)}  {description}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mentor.demo import demo

    rows = demo(out=Path(args.out), quick=args.quick, progress=not args.json)
    print(format_table(rows))
    print(f"report: {Path(args.out) / 'report.md'}")
    if args.json:
        print(json.dumps({"rows": rows}))
    return 0


_SELECT_COLUMNS = [("rank", "rank"), ("name", "candidate"), ("params", "params"), ("score", "score"),
                   ("semantic", "semantic"), ("relational", "relational")]


def _cmd_select(args: argparse.Namespace) -> int:
    import time

    from mentor.config import ConfigError, load_config
    from mentor.select import rank_candidates

    start = time.perf_counter()
    cfg = load_config(args.config)
    if cfg.teacher is None:
        raise ConfigError(f"{args.config!r} names no teacher: 'mentor select' scores candidates against the teacher "
                          "of CONFIG, so set 'teacher.run' or 'teacher.checkpoint' there")
    candidates = []
    for path in args.candidates:
        try:
            candidates.append(load_config(path))
        except ConfigError as err:
            raise ConfigError(f"--candidates {path}: {err}") from None
    names = [c.name for c in candidates]
    if len(set(names)) < len(names):  # configs without distinct names: label them by file instead
        names = [str(p) for p in args.candidates]
    rows = rank_candidates(cfg, candidates, num_batches=args.batches, batch_size=args.batch_size, names=names,
                           teacher_layer=args.teacher_layer, student_layer=args.student_layer)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({"rows": rows, "seconds": seconds}))
    else:
        print(format_table(rows, _SELECT_COLUMNS))
        print(f"{len(rows)} candidates scored in {seconds:.2f} s (higher score = predicted better student; "
              "0 is the maximum, reached by a copy of the teacher)")
    return 0


def _cmd_cache_build(args: argparse.Namespace) -> int:
    import os
    import subprocess
    import time

    import torch

    from mentor.cache import CacheSpec, build, finalize, info
    from mentor.config import CacheConfig, ConfigError, load_config
    from mentor.run import build_augment, load_data, load_teacher

    cfg = load_config(args.config, args.overrides)
    if cfg.teacher is None or (cfg.teacher.run is None and cfg.teacher.checkpoint is None):
        raise ConfigError(f"{args.config!r}: 'mentor cache build' runs the teacher network, so set 'teacher.run' or "
                          "'teacher.checkpoint' (with 'teacher.model')")
    cc = cfg.cache or CacheConfig()
    out = cc.dir or cfg.teacher.cache
    if out is None:
        raise ConfigError(f"{args.config!r}: where should the cache go? set 'cache.dir' or 'teacher.cache'")
    if cc.device not in ("auto", "cpu") and not cc.device.startswith("cuda"):
        raise ConfigError(f"cache.device = {cc.device!r}: expected 'auto', 'cpu' or 'cuda[:N]'")
    try:
        spec = CacheSpec(k=cc.k, values_dtype=cc.values_dtype, features=tuple(cc.features),
                         feature_inputs=cc.feature_inputs, outputs=tuple(cc.outputs), num_views=cc.num_views,
                         shard_size=cc.shard_size,
                         batch_size=cc.batch_size, seed=cc.seed)
    except ValueError as err:
        raise ConfigError(f"cache: {err}") from None
    if spec.num_views > 1 and not cc.augment:
        raise ConfigError(f"cache.num_views = {spec.num_views} needs 'cache.augment' (the views' augmentation)")
    augment = build_augment(cc.augment) if cc.augment else None
    teacher = load_teacher(cfg.teacher)
    train_data, _ = load_data(cfg)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if args.num_processes > 1 and world == 1:  # launch the builders here, each on its share of the shards
        start = time.perf_counter()
        threads = max(1, (os.cpu_count() or 1) // args.num_processes)
        procs = []
        for r in range(args.num_processes):
            env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(args.num_processes),
                   "OMP_NUM_THREADS": str(threads)}
            cmd = [sys.executable, "-m", "mentor", "cache", "build", args.config, *args.overrides, "--quiet"]
            if args.overwrite and r == 0:
                cmd.append("--overwrite")
            procs.append(subprocess.Popen(cmd, env=env))
            if args.overwrite and r == 0:
                procs[0].wait()  # the first clears the directory before the others start
        codes = [p.wait() for p in procs]
        if any(codes):
            print(f"mentor cache build: a builder failed (exit codes {codes}); rerun to finish the missing shards",
                  file=sys.stderr)
            return 1
        manifest = finalize(out)
        seconds = time.perf_counter() - start
    else:
        device = cc.device if cc.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        start = time.perf_counter()
        manifest = build(teacher, train_data.x, out, spec=spec,
                         teacher_spec=cfg.teacher.model_dump(exclude={"cache", "tail"}),
                         dataset_spec=cfg.data.model_dump(), augment=augment, rank=rank, world=world, device=device,
                         progress=not args.quiet, overwrite=args.overwrite)
        seconds = time.perf_counter() - start
    if manifest is None:
        if not args.quiet:
            print(f"process {rank} of {world}: its shards are done; the last builder writes the manifest")
        return 0
    summary = info(out)
    if not args.quiet:
        print(f"cache {out}: {summary['items']} items, {summary['shards']} shards, {summary['bytes']} bytes "
              f"({summary['bytes_per_item']:.1f} bytes/item), top-{summary['k']} of {summary['num_classes']} "
              f"classes, {seconds:.1f} s")
    return 0


def _cmd_cache_verify(args: argparse.Namespace) -> int:
    from mentor.cache import verify

    problems = verify(args.dir)
    if problems:
        print(f"cache {args.dir}: {len(problems)} problem(s):\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"cache {args.dir}: every shard matches its sha256")
    return 0


def _cmd_cache_info(args: argparse.Namespace) -> int:
    from mentor.cache import info

    summary = info(args.dir)
    if args.json:
        print(json.dumps(summary))
        return 0
    for key in ("path", "items", "shards", "bytes", "bytes_per_item", "logit_bytes_per_position", "k",
                "num_classes", "positions", "values_dtype", "indices_dtype"):
        value = summary[key]
        print(f"{key:26s} {value:.2f}" if isinstance(value, float) else f"{key:26s} {value}")
    print(f"{'features':26s} {summary['features'] or '-'}")
    print(f"{'views':26s} {summary['views']}")
    print(f"{'teacher':26s} {summary['teacher']['fingerprint']}")
    print(f"{'dataset':26s} {summary['dataset']['fingerprint']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mentor",
        description="Teacher-student training: a student model learns from one or more teachers.",
        epilog="Run 'mentor COMMAND --help' for a command's options. Start with 'mentor demo'.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a student from a YAML config",
                       description="Train a student from a YAML config. Keys can be overridden on the command line, "
                                   "e.g. 'mentor train cfg.yaml train.epochs=3 recipe.args.temperature=2'. The "
                                   "resolved config, metrics.jsonl, checkpoints, student.safetensors and report.md "
                                   "go to <train.out>/<name>/.")
    p.add_argument("config", help="path to a YAML config (see configs/ for examples)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, dotted keys")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    p.set_defaults(fn=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a finished run on the test split",
                       description="Evaluate a finished run's student on the test split: accuracy, agreement and "
                                   "KL with its teacher, ECE, parameters, latency.")
    p.add_argument("run_dir", help="a run directory (holds config.yaml and student.safetensors)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(fn=_cmd_eval)

    p = sub.add_parser("report", help="write report.md with plots for a run",
                       description="Write RUN_DIR/report.md with PNG plots (loss terms, accuracy curves, "
                                   "reliability diagram).")
    p.add_argument("run_dir", help="a run directory")
    p.set_defaults(fn=_cmd_report)

    p = sub.add_parser("recipes", help="list the recipes, one line each",
                       description="List the built-in recipes (methods) with one line each.")
    p.set_defaults(fn=_cmd_recipes)

    p = sub.add_parser("demo", help="teacher + three students on MNIST-1D, with a result table",
                       description="Train a CNN teacher on MNIST-1D, then MLP students: scratch (4000 labels), "
                                   "hinton_kd (same labels + teacher) and transfer_kd (teacher only, 50000 generated "
                                   "unlabelled samples); print one table and write report.md.")
    p.add_argument("--json", action="store_true", help="also print the table as one JSON object on the last line")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="a much smaller run, for smoke tests")
    p.set_defaults(fn=_cmd_demo)

    p = sub.add_parser("select", help="rank candidate students for a teacher without training (DisWOT)",
                       description="Rank candidate students for the teacher of CONFIG at initialisation, without "
                                   "training them (DisWOT, Dong et al. 2023, arXiv:2303.15678). On a few batches "
                                   "of CONFIG's training data, each untrained student's penultimate features are "
                                   "compared with the teacher's: 'relational' is minus the distance between their "
                                   "batch correlation matrices, 'semantic' minus the distance between their class "
                                   "correlation matrices of class-conditional activations (the true-class logit's "
                                   "gradient at the classifier, a Grad-CAM-like signal); 'score' is their sum. "
                                   "Higher is better; 0 is the maximum (a copy of the teacher). Takes seconds.",
                       epilog="example: mentor select configs/kd.yaml --candidates small.yaml wide.yaml deep.yaml")
    p.add_argument("config", help="the base YAML config; its teacher, data and seed are used")
    p.add_argument("--candidates", nargs="+", required=True, metavar="YAML",
                   help="one or more candidate configs; each one's 'student' (model, args) and 'seed' are scored")
    p.add_argument("--batches", type=int, default=4, help="batches to average over (default: 4)")
    p.add_argument("--batch-size", type=int, default=64, help="items per batch (default: 64)")
    p.add_argument("--teacher-layer", default="classifier",
                   help="teacher module whose input is the compared feature (default: classifier)")
    p.add_argument("--student-layer", default="classifier",
                   help="student module whose input is the compared feature (default: classifier)")
    p.add_argument("--json", action="store_true", help="print one JSON object (rows and seconds) instead of a table")
    p.set_defaults(fn=_cmd_select)

    p = sub.add_parser("cache", help="teacher outputs computed once: build, verify, info",
                       description="A teacher cache holds the teacher's top-k log-probabilities (and optionally "
                                   "features and augmented views) for every training item, so training reads them "
                                   "instead of running the teacher. Train on it with 'teacher.cache: DIR'.")
    cache_sub = p.add_subparsers(dest="cache_command", required=True, metavar="SUBCOMMAND")
    c = cache_sub.add_parser("build", help="run the teacher of CONFIG over its training data once",
                             description="Run the teacher of CONFIG ('teacher.run' or 'teacher.checkpoint') over "
                                         "the training data of CONFIG ('data') and write a cache to 'cache.dir' "
                                         "(default 'teacher.cache'), as the 'cache' section says (k, values_dtype, "
                                         "features, num_views, augment, shard_size). Shards are written atomically; "
                                         "an interrupted build resumes when rerun.",
                             epilog="example: mentor cache build configs/mnist1d_transfer_kd_cached.yaml cache.k=4")
    c.add_argument("config", help="a YAML run config")
    c.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, dotted keys")
    c.add_argument("--num-processes", type=int, default=1,
                   help="builder processes, each writing its own shards (default 1; under 'accelerate launch' the "
                        "launcher's processes are used instead)")
    c.add_argument("--overwrite", action="store_true", help="delete a different cache already in the directory")
    c.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    c.set_defaults(fn=_cmd_cache_build)
    c = cache_sub.add_parser("verify", help="check every shard's sha256 against the manifest",
                             description="Check every shard's size and sha256 against manifest.json; exit 1 and "
                                         "name the damaged shards if any.")
    c.add_argument("dir", help="a cache directory")
    c.set_defaults(fn=_cmd_cache_verify)
    c = cache_sub.add_parser("info", help="print what a cache holds",
                             description="Print a cache's item count, shards, bytes per item and per position, k, "
                                         "dtypes, features, views and fingerprints.")
    c.add_argument("dir", help="a cache directory")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(fn=_cmd_cache_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mentor`` command."""
    from mentor.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args))
    except (ConfigError, FileNotFoundError) as err:
        print(f"mentor {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"mentor {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mentor {args.command}: interrupted; resume with --resume where checkpoints were written",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
