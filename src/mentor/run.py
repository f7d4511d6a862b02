"""From a validated :class:`~mentor.config.RunConfig` to a finished run directory.

``runs/<name>/`` holds ``config.yaml`` (resolved), ``metrics.jsonl``, ``checkpoints/``, ``student.safetensors``,
``result.json`` and, after :func:`mentor.report.write_report`, ``report.md`` with ``plots/``. A born-again recipe
with ``generations: n`` writes one such folder per generation (``gen1`` ... ``genN``) and a ``result.json`` above
them that lists every generation; ``noisy_student`` does the same, with ``gen0`` first when it trains its own first
teacher, and ``pseudo_labels.safetensors`` in each generation. A ``dml`` run adds ``peer<i>.safetensors`` (each peer
alone), a routed multi-teacher run ``router.safetensors``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from mentor import atomic
from mentor.config import ConfigError, RunConfig, TeacherConfig, build_method, dump_config, load_config
from mentor.data import UNLABELLED, TensorData, check_data, mnist1d, mnist1d_transfer, stratified_split
from mentor.method import Method
from mentor.models import build_model
from mentor.teachers import Ensemble, Frozen, PseudoLabels, Router, Teacher
from mentor.train import FitResult, Optim, check_setup, fit, load_model_weights, save_model

__all__ = ["RunResult", "load_data", "load_unlabelled", "load_teacher", "run", "build_student",
           "cross_tokenizer_teacher"]


@dataclass
class RunResult:
    """The outcome of :func:`run`: one :class:`~mentor.train.FitResult` per generation (numbered from
    ``first_generation``: 0 where noisy_student trained its first teacher itself)."""

    config: RunConfig
    generations: list[FitResult]
    first_generation: int = 1

    @property
    def final(self) -> FitResult:
        return self.generations[-1]


def load_data(cfg: RunConfig) -> tuple[TensorData, TensorData]:
    """``(train, test)`` as the config's ``data`` section says."""
    d = cfg.data
    if d.name.startswith("lm_"):
        return _lm_data(cfg)
    test = mnist1d("test")
    if d.train == "labelled":
        return mnist1d("train", d.num_labelled), test
    if d.train == "semi":  # the stratified labelled subset; the pool comes from load_unlabelled
        return stratified_split(mnist1d("train"), d.num_labelled, d.split_seed)[0], test
    transfer = mnist1d_transfer(d.transfer_size, d.transfer_seed)
    if d.train == "transfer":
        return transfer, test
    labelled = mnist1d("train", d.num_labelled)
    return TensorData(torch.cat([labelled.x, transfer.x]), torch.cat([labelled.y, transfer.y])), test


def _lm_data(cfg: RunConfig) -> tuple[TensorData, TensorData]:
    """The language-model data of ``data.name`` ``lm_*`` (see :mod:`mentor.lm.loop`)."""
    from mentor.lm.loop import lm_corpus_data, lm_task_data

    d = cfg.data
    vocab = d.vocab_size or 512
    if d.name == "lm_stdlib":
        return lm_corpus_data(block_size=d.block_size or 128, vocab_size=vocab, num_train=d.num_train,
                              num_test=d.num_test)
    task_args: dict[str, Any] = {}
    if d.name == "lm_arithmetic":
        task_args = {k: v for k, v in (("max_operand", d.max_operand), ("ops", d.ops)) if v is not None}
    try:
        return lm_task_data(d.name.removeprefix("lm_"), num_train=d.num_train or 5000, num_test=d.num_test or 200,
                            seed=d.task_seed or 0, vocab_size=vocab, max_new_tokens=d.max_new_tokens or 8,
                            **task_args)
    except ValueError as err:
        raise ConfigError(f"data ({d.name}): {err}") from None


def load_unlabelled(cfg: RunConfig) -> TensorData | None:
    """The unlabelled pool of ``data.train = 'semi'`` (``None`` otherwise): the training items outside the
    stratified labelled subset (``unlabelled: rest``) or ``transfer_size`` generated items (``transfer``)."""
    d = cfg.data
    if d.train != "semi":
        return None
    if d.unlabelled == "transfer":
        return mnist1d_transfer(d.transfer_size, d.transfer_seed)
    return stratified_split(mnist1d("train"), d.num_labelled, d.split_seed)[1]


def build_student(cfg: RunConfig, seed: int | None = None, teacher: nn.Module | None = None) -> nn.Module:
    """The student of the config, initialised from ``seed`` (the config's seed by default).

    This is the architecture that the run trains, evaluates and exports (``student.safetensors``). For
    ``recipe.name: simkd`` it is the SimKD composite (:func:`mentor.recipes.simkd.simkd_student`: the student with
    its classifier replaced by a projector and the teacher's frozen classifier), built from ``teacher`` (default:
    the config's teacher, loaded) and two MNIST-1D test items for the feature widths. For ``recipe.name: dml`` it
    is the :class:`~mentor.recipes.dml.Cohort` of the peers (peer ``i`` initialised from ``seed + i``).
    """
    if cfg.recipe.name == "dml":
        return _dml_cohort(cfg, cfg.seed if seed is None else seed)
    simkd = cfg.recipe.name == "simkd"
    if simkd and teacher is None:
        if cfg.teacher is None:
            raise ConfigError("recipe 'simkd' reuses the teacher's classifier: set 'teacher.run' or "
                              "'teacher.checkpoint'")
        teacher = load_teacher(cfg.teacher)
    torch.manual_seed(cfg.seed if seed is None else seed)
    try:
        model = build_model(cfg.student.model, cfg.student.args)
    except ValueError as err:
        raise ConfigError(f"student.model: {err}") from None
    if cfg.student.quantize_bits is not None:
        from mentor.quant import quantize_weights

        quantize_weights(model, cfg.student.quantize_bits)
    if simkd:
        import inspect

        from mentor.recipes.simkd import simkd_student

        assert teacher is not None
        known = inspect.signature(simkd_student).parameters
        args = {k: v for k, v in cfg.recipe.args.items() if k in known and k not in ("student", "teacher", "example")}
        try:
            model = simkd_student(model, teacher, mnist1d("test").x[:2], **args)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"recipe simkd: {err}") from None
    return model


def _dml_cohort(cfg: RunConfig, seed: int) -> nn.Module:
    """The peers of a ``dml`` run: the student spec ``peers`` times, or one model per spec of the list ``peers``;
    peer ``i`` is initialised from ``seed + i``."""
    from mentor.recipes.dml import Cohort, peer_count

    peers = cfg.recipe.args.get("peers", 2)
    try:
        count = peer_count(peers)
    except ValueError as err:
        raise ConfigError(f"recipe dml: {err}") from None
    specs = [(cfg.student.model, cfg.student.args)] * count if isinstance(peers, int) else [
        (str(p["model"]), dict(p.get("args") or {})) for p in peers]
    models = []
    for i, (name, args) in enumerate(specs):
        torch.manual_seed(seed + i)
        try:
            model = build_model(name, args)
        except ValueError as err:
            raise ConfigError(f"recipe dml: peer {i}: {err}") from None
        if cfg.student.quantize_bits is not None and isinstance(peers, int):
            from mentor.quant import quantize_weights

            quantize_weights(model, cfg.student.quantize_bits)
        models.append(model)
    return Cohort(models)


def load_teacher(spec: TeacherConfig) -> nn.Module:
    """The teacher network a config names: a run directory, or a checkpoint plus a model spec."""
    if spec.run is None and spec.checkpoint is None:
        raise ConfigError(f"this needs the teacher network, but the config names only a teacher cache "
                          f"({spec.cache!r}): set 'teacher.run' or 'teacher.checkpoint'")
    if spec.run is not None:
        run_dir = Path(spec.run)
        cfg_path, weights = run_dir / "config.yaml", run_dir / "student.safetensors"
        if not cfg_path.is_file() or not weights.is_file():
            raise ConfigError(
                f"teacher.run = {spec.run!r} is not a finished run directory "
                "(expected config.yaml and student.safetensors in it)"
            )
        teacher_cfg = load_config(cfg_path)
        if teacher_cfg.recipe.name == "simkd":  # that run exported its SimKD composite: rebuild that architecture
            model = build_student(teacher_cfg)
            try:
                load_model_weights(model, weights)
            except ValueError as err:
                raise ConfigError(f"teacher: {err}") from None
            return model
        if teacher_cfg.recipe.name == "dml":  # a cohort: it teaches with peer 0, exported alone as peer0.safetensors
            cohort = build_student(teacher_cfg)
            model = cohort.get_submodule("peers.0")
            try:
                load_model_weights(model, run_dir / "peer0.safetensors")
            except (FileNotFoundError, ValueError) as err:
                raise ConfigError(f"teacher: {err}") from None
            return model
        model_name, args = teacher_cfg.student.model, teacher_cfg.student.args
        bits = teacher_cfg.student.quantize_bits  # a quantized run teaches with its quantized weights
    else:
        assert spec.checkpoint is not None and spec.model is not None
        weights, model_name, args = Path(spec.checkpoint), spec.model, spec.args
        bits = None
        if not weights.is_file():
            raise ConfigError(f"teacher.checkpoint = {spec.checkpoint!r} does not exist")
    try:
        model = build_model(model_name, args)
    except ValueError as err:
        raise ConfigError(f"teacher.model: {err}") from None
    if bits is not None:
        from mentor.quant import quantize_weights

        quantize_weights(model, bits)
    try:
        load_model_weights(model, weights)
    except ValueError as err:
        raise ConfigError(f"teacher: {err}") from None
    return model


def cached_teacher(
    cfg: RunConfig, teacher_model: nn.Module | None, method: Method, train_data: TensorData
) -> tuple[Teacher, Method]:
    """The config's teacher cache as a teacher, checked against the run, and the method on its sparse targets.

    The cache must hold the run's training items (dataset fingerprint) and, where the config also names the teacher
    network, come from that network (teacher fingerprint); a damaged shard fails its checksum here.
    """
    from mentor.cache import CacheError, TeacherCache, fingerprint_model, use_sparse_targets
    from mentor.teachers import Cached

    assert cfg.teacher is not None and cfg.teacher.cache is not None
    try:
        cache = TeacherCache(cfg.teacher.cache)
        if teacher_model is not None:
            cache.check_matches(teacher=fingerprint_model(teacher_model))
        augment = build_augment(cfg.cache.augment) if cfg.cache is not None and cfg.cache.augment else None
        method = use_sparse_targets(method, cfg.teacher.tail)
        dense = any(src == "teacher.logits" for t in method.terms for src in t.sources)
        teacher = Cached(cache, tail=cfg.teacher.tail, augment=augment, dense=dense)
        teacher.check_data(train_data.x)
    except (CacheError, ValueError) as err:
        raise ConfigError(f"teacher.cache = {cfg.teacher.cache!r}: {err}") from None
    return teacher, method


def cross_tokenizer_teacher(cfg: RunConfig, model: nn.Module) -> Teacher:
    """Recipe ``cross_tokenizer_kd``'s teacher (:class:`mentor.lm.cross.CrossTokenizer`): the network with its own
    tokenizer (``teacher.tokenizer``, else the built-in tokenizer of the teacher run's ``data.vocab_size``); the
    student's tokenizer is the data's (the built-in tokenizer of ``data.vocab_size``)."""
    from mentor.lm import data as lm_data
    from mentor.lm.cross import CrossTokenizer

    spec = cfg.teacher
    assert spec is not None
    source: int | str | None = spec.tokenizer
    if source is None:  # the config check asked for teacher.tokenizer unless teacher.run is set
        assert spec.run is not None
        teacher_cfg = load_config(Path(spec.run) / "config.yaml")
        if not teacher_cfg.data.name.startswith("lm_"):
            raise ConfigError(f"teacher.run = {spec.run!r} trained on data.name = {teacher_cfg.data.name!r}, not on "
                              "language-model data, so it names no tokenizer: set 'teacher.tokenizer'")
        source = teacher_cfg.data.vocab_size or 512
    teacher_tokenizer: Any
    if isinstance(source, int):
        teacher_tokenizer = lm_data.tokenizer(source)
    else:
        if not Path(source).is_dir():
            raise ConfigError(f"teacher.tokenizer = {source!r}: expected the folder of a saved Hugging Face "
                              "tokenizer (save_pretrained) or the size of the built-in tokenizer")
        from transformers import AutoTokenizer

        teacher_tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    student_tokenizer = lm_data.tokenizer(cfg.data.vocab_size or 512)
    try:
        return CrossTokenizer(model, teacher_tokenizer, student_tokenizer, num_classes=spec.num_classes)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"teacher.tokenizer = {source!r}: {err}") from None


def build_augment(name: str) -> Any:
    """The per-item seeded augmentation of ``cache.augment`` (a preset of :func:`mentor.views.preset`)."""
    from mentor import views

    if name not in views.PRESETS:
        raise ConfigError(f"cache.augment = {name!r}: expected one of {', '.join(views.PRESETS)}")
    return views.preset(name)


def _labels_only(method: Method) -> Method:
    terms = tuple(t for t in method.terms if not t.uses_teacher)
    if not terms:
        raise ConfigError(f"recipe {method.name!r} has no label terms to train its first generation without a teacher")
    return Method(method.name, terms, 1, method.description)


def is_main_process() -> bool:
    """Whether this is the process that writes run files: rank 0 under ``accelerate launch`` / ``torchrun``."""
    return int(os.environ.get("RANK", "0")) == 0


def run(cfg: RunConfig, *, resume: bool = False, report: bool = True) -> RunResult:
    """Run a validated config end to end (every generation), writing the run directory."""
    method = build_method(cfg.recipe)
    has_model = cfg.teacher is not None and (cfg.teacher.run is not None or cfg.teacher.checkpoint is not None)
    teacher_model = load_teacher(cfg.teacher) if has_model else None  # type: ignore[arg-type]
    t = cfg.train
    out = cfg.run_dir
    # Everything that can be wrong is checked before anything is written to the run directory.
    first_student = build_student(cfg, teacher=teacher_model)
    if t.mixed_precision == "fp16" and (t.cpu or not torch.cuda.is_available()):
        why = "train.cpu is true" if t.cpu else "no CUDA GPU is available"
        raise ConfigError(f"train.mixed_precision = 'fp16' needs a CUDA GPU, but {why}: expected 'bf16' or 'no'")
    noisy = cfg.recipe.name == "noisy_student"
    first_gen = 0 if noisy and teacher_model is None else 1  # gen0: noisy_student's supervised first teacher
    layered = method.generations > 1 or noisy  # one folder per generation
    first_ckpt = (out / f"gen{first_gen}" if layered else out) / "checkpoints" / "latest"
    if resume and not first_ckpt.is_file():
        raise FileNotFoundError(
            f"cannot resume: {str(first_ckpt)!r} does not exist (no earlier run of {cfg.name!r} wrote a checkpoint); "
            "run without --resume to start afresh"
        )
    train_data, test_data = load_data(cfg)
    if cfg.recipe.name == "seq_kd":  # the teacher's answers, generated once and cached (mentor.lm.loop)
        train_data = _seq_kd_data(cfg, teacher_model, train_data)
    pool = load_unlabelled(cfg)
    if noisy and pool is not None:  # Noisy Student trains on one set: the labelled items plus the pool (mu unused)
        train_data = TensorData(torch.cat([train_data.x, pool.x]),
                                torch.cat([train_data.y, torch.full_like(pool.y, UNLABELLED)]))
        pool = None
    per_step = t.batch_size * t.grad_accum
    if len(train_data) < per_step:
        raise ConfigError(
            f"train.batch_size = {t.batch_size} x train.grad_accum = {t.grad_accum} takes {per_step} items per step, "
            f"but the training data (data.train = {cfg.data.train!r}) has {len(train_data)}: expected at most "
            f"{len(train_data)} items per step"
        )
    cut = cfg.teacher.num_classes if cfg.teacher is not None else None
    teacher: Teacher | None = Frozen(teacher_model, num_classes=cut) if teacher_model is not None else None
    if cfg.recipe.name == "cross_tokenizer_kd" and teacher_model is not None:
        teacher = cross_tokenizer_teacher(cfg, teacher_model)
    eval_teacher: Teacher | None = None
    if cfg.teacher is not None and cfg.teacher.cache is not None:
        teacher, method = cached_teacher(cfg, teacher_model, method, train_data)
        eval_teacher = Frozen(teacher_model, num_classes=cut) if teacher_model is not None else None
    if cfg.teacher is not None and cfg.teacher.runs is not None:
        teacher = build_ensemble(cfg.teacher, train_data)
    if noisy and teacher_model is not None:
        teacher, eval_teacher = _noisy_teacher(cfg, teacher_model, train_data), Frozen(teacher_model)
    gen0_data = _labelled_items(train_data, per_step) if noisy and teacher_model is None else None
    if gen0_data is not None:
        from mentor.recipes import supervised

        check_setup(first_student, None, supervised(), gen0_data, "labelled train data (noisy_student's gen0)")
    first_method = method if (teacher is not None or method.teacher is not None or not method.needs_teacher
                              or gen0_data is not None) else (
        _labels_only(method))
    if gen0_data is None:
        own = method.teacher(first_student) if teacher is None and method.teacher is not None else None  # EMA, Self
        check_setup(first_student, teacher or own, first_method, train_data, "train data")
    check_data(test_data, "eval data")
    optim = Optim(**cfg.optim.model_dump())
    main = is_main_process()
    if main:
        atomic.write_text(out / "config.yaml", dump_config(cfg))
    results: list[FitResult] = []
    for gen in range(first_gen, method.generations + 1):
        gen_out = out / f"gen{gen}" if layered else out
        gen_method = method if (teacher is not None or method.teacher is not None or not method.needs_teacher
                                or gen == 0) else (
            _labels_only(method))
        gen_data, epochs, max_steps = train_data, t.epochs, t.max_steps
        if gen == 0:  # noisy_student's first teacher: supervised on the labelled items, as many steps as a generation
            from mentor.recipes import supervised

            assert gen0_data is not None
            gen_method, gen_data = supervised(), gen0_data
            steps = (len(train_data) // per_step) * t.epochs if t.max_steps is None else t.max_steps
            epochs, max_steps = -(-steps // (len(gen0_data) // per_step)), steps
        gen_seed = cfg.seed + gen - 1 if gen > 0 else cfg.seed + 1000  # gen0 apart from every student generation
        student = build_student(cfg, gen_seed, teacher=teacher_model)
        if layered and main:
            atomic.write_text(gen_out / "config.yaml", dump_config(cfg))
            if isinstance(teacher, PseudoLabels):  # the targets this generation trains on
                with atomic.replacing(gen_out / "pseudo_labels.safetensors") as tmp:
                    save_file({"log_probs": teacher.log_probs.contiguous()}, str(tmp))
        result = fit(
            student, gen_method, gen_data, teacher=teacher, eval_teacher=eval_teacher, eval_data=test_data,
            epochs=epochs,
            max_steps=max_steps, batch_size=t.batch_size, grad_accum=t.grad_accum, optim=optim,
            seed=gen_seed, out=gen_out, checkpoint_every=t.checkpoint_every,
            keep_checkpoints=t.keep_checkpoints, resume=resume and (gen_out / "checkpoints" / "latest").is_file(),
            mixed_precision=t.mixed_precision, cpu=t.cpu, log_every=t.log_every, eval_every=t.eval_every,
            progress=t.progress, trackers=t.trackers, run_config=cfg.model_dump(mode="json"),
            unlabelled=pool, mu=cfg.data.mu or 1, export=t.export,
        )
        results.append(result)
        if cfg.recipe.name == "dml":
            _export_peers(result, test_data, gen_out, main)
        router = getattr(teacher, "router", None)
        if router is not None and main:  # trained with the student, kept beside (not inside) its export
            save_model(router, gen_out / "router.safetensors")
        if report and main:
            from mentor.report import write_report

            write_report(gen_out)
        if gen < method.generations:
            prev = build_student(cfg, 0)
            prev.load_state_dict(result.student.state_dict())  # exactly generation gen's weights
            teacher, eval_teacher = Frozen(prev), None
            if noisy:
                teacher, eval_teacher = _noisy_teacher(cfg, prev, train_data), Frozen(prev)
    if layered and main:
        summary = [{"generation": first_gen + i, **r.metrics} for i, r in enumerate(results)]
        atomic.write_text(out / "result.json", json.dumps({"generations": summary}, indent=2))
    return RunResult(cfg, results, first_gen)


def summary_rows(result: RunResult) -> list[dict[str, Any]]:
    """One row per generation for printing."""
    return [{"generation": result.first_generation + i, **r.metrics} for i, r in enumerate(result.generations)]


def build_ensemble(spec: TeacherConfig, train_data: TensorData) -> Ensemble:
    """The teachers of ``teacher.runs``, combined as ``teacher.combine`` says (see :class:`mentor.teachers.Ensemble`);
    a router's input width is that of one training item."""
    assert spec.runs is not None
    members: list[Teacher] = [Frozen(load_teacher(TeacherConfig(run=r))) for r in spec.runs]
    by = {"mean": "fixed", "weights": "fixed"}.get(spec.combine, spec.combine)
    router = None
    if spec.combine == "router":
        router = Router(int(train_data.x[0].numel()), len(members), spec.router_hidden, spec.space)
    return Ensemble(members, spec.weights, combine=spec.space, by=by, router=router)


def _seq_kd_data(cfg: RunConfig, teacher_model: nn.Module | None, train_data: TensorData) -> TensorData:
    """Sequence-level KD's training data: the teacher's continuations of the training prompts (cached)."""
    from mentor.lm.loop import LMData, cached_teacher_sequences

    assert teacher_model is not None and isinstance(train_data, LMData)
    args = {k: cfg.recipe.args[k] for k in ("max_new_tokens", "temperature") if cfg.recipe.args.get(k) is not None}
    sampled = float(args.get("temperature", 0.0)) > 0  # greedy answers do not depend on the seed: shared by all
    data, _ = cached_teacher_sequences(teacher_model, train_data, seed=cfg.seed if sampled else 0, **args)
    return data


def _labelled_items(data: TensorData, per_step: int) -> TensorData:
    """The labelled items of ``data`` (noisy_student's first teacher trains on them)."""
    known = data.y != UNLABELLED
    if int(known.sum()) < per_step:
        raise ConfigError(f"recipe noisy_student without a teacher first trains one on the labelled items, but the "
                          f"training data has {int(known.sum())}, fewer than one step's {per_step}: set 'teacher' "
                          "or use more labelled items")
    return TensorData(data.x[known], data.y[known])


def _noisy_teacher(cfg: RunConfig, model: nn.Module, train_data: TensorData) -> PseudoLabels:
    """A noisy_student generation's teacher: ``model``'s pseudo-labels of the clean training items."""
    from mentor.recipes.noisy_student import pseudo_label_teacher

    args = {k: v for k, v in cfg.recipe.args.items() if k != "generations"}
    return pseudo_label_teacher(model, train_data.x, train_data.y, seed=cfg.seed, **args)


def _export_peers(result: FitResult, test_data: TensorData, out: Path, main: bool) -> None:
    """A DML run's peers: each saved alone (``peer<i>.safetensors``) and evaluated; ``result.json`` and the result's
    metrics gain ``"peers"`` (each peer's metrics) and ``"peer_mean_accuracy"``."""
    from mentor.eval import evaluate

    peers = list(result.student.peers)  # type: ignore[arg-type]
    rows = [evaluate(peer, test_data) for peer in peers]
    result.metrics["peers"] = rows
    result.metrics["peer_mean_accuracy"] = sum(r["accuracy"] for r in rows) / len(rows)
    if main:
        for i, peer in enumerate(peers):
            save_model(peer, out / f"peer{i}.safetensors")
        atomic.write_text(out / "result.json", json.dumps({"metrics": result.metrics, "steps": result.steps},
                                                          indent=2))
