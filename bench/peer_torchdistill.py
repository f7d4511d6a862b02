"""Peer baseline: Hinton knowledge distillation trained by torchdistill, for side-by-side runs with mentor.

Runs only in the benchmark venv made by ``bench/setup_peer_env.sh`` (``.venv-bench``: torch 2.14.1, torchvision
0.29.1, torchdistill 1.1.5, mentor editable); torchdistill cannot be imported in the main venv (see that script).

    .venv-bench/bin/python bench/peer_torchdistill.py          # smoke test on random data

**What is torchdistill's here.** The training is driven by torchdistill's own ``DistillationBox``
(``torchdistill.core.distillation.get_distillation_box``), built from a config dict exactly like its YAML configs:

* the loss: high-level ``WeightedSumLoss`` with one sub-term, torchdistill's mid-level ``KDLoss``
  (``torchdistill/losses/mid_level.py``), on the student's and the teacher's outputs (module path ``"."``);
* the teacher wrapper: ``requires_grad: False`` (frozen, forwarded under ``torch.no_grad``);
* the optimiser: registry key ``AdamW``; the LR schedule: registry key ``CosineAnnealingLR`` with
  ``T_max`` = total steps and ``scheduling_step: 1`` (stepped after every optimiser step, reaching 0 at the end, as
  mentor's ``schedule: cosine``);
* the data loader: built by torchdistill's ``build_data_loaders`` from an in-memory ``TensorDataset`` wrapped in its
  ``BaseDatasetWrapper``; only the batch order comes from here (a batch sampler registered with torchdistill's
  ``register_batch_sampler``) so that both libraries see the same batches;
* each step: ``box.pre_epoch_process`` / ``box.forward_process`` / ``box.post_forward_process`` (backward, optimiser
  and scheduler step) / ``box.post_epoch_process``, the loop of torchdistill's example scripts.

Only the outer ``for`` loop and the test-set accuracy (argmax over the student's logits) are plain PyTorch here.

**The alpha mapping.** mentor's ``hinton_kd`` weighs the KD term with ``alpha``::

    mentor:        (1 - alpha_kd) * CE + alpha_kd * T^2 * KL(p_t^T || p_s^T)
    torchdistill:  alpha * CE + beta * T^2 * KL        (KDLoss; beta defaults to 1 - alpha)

so this module sets torchdistill ``alpha = 1 - alpha_kd`` and ``beta = alpha_kd``. One corner differs: when
``alpha`` is 0 (``alpha_kd = 1``, pure distillation) ``KDLoss`` returns the bare KL *without* the ``T^2`` factor.
There the sub-term weight of ``WeightedSumLoss`` is set to ``T^2`` so that the loss is the same as mentor's in every
case (checked by the smoke test against ``mentor.losses``).

**Batch order.** Epoch ``e`` uses ``torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed *
order_seed_stride + e))`` cut into ``len(x_train) // batch_size`` batches (the last incomplete batch is dropped).
The default stride 1 gives the brief's "seed + epoch"; mentor's ``fit`` uses stride 1_000_003. Or pass the exact
batches with ``steps_per_epoch_batches``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import SequentialSampler, TensorDataset
from torchdistill.core.distillation import get_distillation_box
from torchdistill.datasets.registry import register_batch_sampler

__all__ = ["kd_criterion_config", "plan_batches", "run_torchdistill_kd"]

_BATCH_SAMPLER_KEY = "mentor_bench_planned_batches"


@register_batch_sampler(key=_BATCH_SAMPLER_KEY)
class PlannedBatchSampler:
    """A batch sampler that yields a fixed list of batches per epoch; ``set_epoch`` picks the epoch.

    torchdistill's ``build_data_loader`` builds it as ``cls(sampler, **kwargs)``; the sampler is ignored.
    """

    def __init__(self, sampler: object, plan: Sequence[Sequence[Tensor]]) -> None:
        del sampler
        self.plan = [[b.tolist() for b in epoch] for epoch in plan]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.plan[self.epoch])

    def __len__(self) -> int:
        return len(self.plan[self.epoch])


def plan_batches(n: int, *, epochs: int, batch_size: int, seed: int, order_seed_stride: int = 1) -> list[list[Tensor]]:
    """Per epoch, the index batches of a plain shuffled loop that drops the last incomplete batch."""
    steps = n // batch_size
    if steps == 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} training examples")
    plan = []
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * order_seed_stride + epoch))
        plan.append([perm[i * batch_size : (i + 1) * batch_size] for i in range(steps)])
    return plan


def _normalise_plan(batches: Sequence[Tensor]) -> list[list[Tensor]]:
    """``steps_per_epoch_batches`` -> per-epoch lists of 1-D index tensors.

    Accepts either one ``[steps, batch]`` tensor per epoch, or 1-D index tensors (one per step, the whole run, taken
    as one epoch; the schedule is step-wise, so epoch boundaries do not change the training).
    """
    if len(batches) == 0:
        raise ValueError("steps_per_epoch_batches is empty")
    if all(b.dim() == 2 for b in batches):
        return [list(epoch.long().unbind(0)) for epoch in batches]
    if all(b.dim() == 1 for b in batches):
        return [[b.long() for b in batches]]
    raise ValueError("steps_per_epoch_batches: give either 2-D [steps, batch] tensors (one per epoch) "
                     "or 1-D index tensors (one per step)")


def kd_criterion_config(*, temperature: float, alpha_kd: float) -> dict:
    """torchdistill ``criterion`` config for mentor's ``(1 - alpha_kd) * CE + alpha_kd * T^2 * KL``."""
    if not 0.0 <= alpha_kd <= 1.0:
        raise ValueError(f"alpha_kd must be in [0, 1], got {alpha_kd}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    td_alpha = 1.0 - alpha_kd
    # KDLoss drops the T^2 factor when its alpha is 0 (it returns the bare KL): restore it with the term weight.
    weight = temperature**2 if td_alpha == 0 else 1.0
    kd_kwargs = {"student_module_path": ".", "student_module_io": "output",
                 "teacher_module_path": ".", "teacher_module_io": "output",
                 "temperature": temperature, "alpha": td_alpha, "beta": alpha_kd, "reduction": "batchmean"}
    return {"key": "WeightedSumLoss",
            "kwargs": {"sub_terms": {"kd": {"criterion": {"key": "KDLoss", "kwargs": kd_kwargs}, "weight": weight}}}}


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / max(len(x), 1)


def run_torchdistill_kd(
    teacher: nn.Module,
    student: nn.Module,
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    *,
    steps_per_epoch_batches: list[Tensor] | None = None,
    epochs: int,
    batch_size: int,
    lr: float,
    temperature: float,
    alpha_kd: float,
    seed: int,
    weight_decay: float = 0.0,
    order_seed_stride: int = 1,
    verbose: bool = False,
) -> dict:
    """Train ``student`` (in place) by Hinton KD from ``teacher`` with torchdistill's ``DistillationBox``.

    Args:
        teacher: Trained teacher; put in eval mode and frozen for the run (its ``requires_grad`` flags are restored).
        student: Student to train, in place.
        x_train, y_train: Training inputs and integer labels.
        x_test, y_test: Test inputs and labels for the final accuracy.
        steps_per_epoch_batches: Explicit index batches instead of the seeded shuffle: one ``[steps, batch]``
            tensor per epoch, or 1-D index tensors, one per step for the whole run. ``epochs`` and
            ``batch_size`` then do not set the order.
        epochs: Number of epochs of the seeded shuffle.
        batch_size: Batch size of the seeded shuffle.
        lr: Peak learning rate of AdamW; cosine-annealed to 0 over all steps.
        temperature: KD temperature ``T``.
        alpha_kd: mentor's alpha, the weight of the KD term (torchdistill ``alpha = 1 - alpha_kd``).
        seed: Seeds the batch order and ``torch.manual_seed`` (dropout etc.).
        weight_decay: AdamW decoupled weight decay (mentor's default 0; torch's AdamW default would be 0.01).
        order_seed_stride: Generator seed of epoch ``e`` is ``seed * order_seed_stride + e`` (1_000_003: mentor's).
        verbose: Keep torchdistill's INFO logging.

    Returns:
        ``{"accuracy": test accuracy of the student, "steps": optimiser steps taken, "seconds": training time}``.
    """
    if steps_per_epoch_batches is not None:
        plan = _normalise_plan(steps_per_epoch_batches)
    else:
        plan = plan_batches(len(x_train), epochs=epochs, batch_size=batch_size, seed=seed,
                            order_seed_stride=order_seed_stride)
    total_steps = sum(len(epoch) for epoch in plan)
    device = next(student.parameters()).device
    torch.manual_seed(seed)

    td_logger = logging.getLogger("torchdistill")
    old_level = td_logger.level
    if not verbose:
        td_logger.setLevel(logging.WARNING)
    teacher_flags = [p.requires_grad for p in teacher.parameters()]
    student_flags = [p.requires_grad for p in student.parameters()]
    teacher.eval()
    train_config = {
        "num_epochs": len(plan),
        "train_data_loader": {
            "dataset_id": "train",
            "requires_supp": True,  # BaseDatasetWrapper: (sample, target, supp_dict) items
            "sampler": {"class_or_func": SequentialSampler, "kwargs": {}},
            "batch_sampler": {"key": _BATCH_SAMPLER_KEY, "kwargs": {"plan": plan}},
            "kwargs": {"num_workers": 0},
        },
        "teacher": {"requires_grad": False, "forward_proc": "forward_batch_only"},
        "student": {"requires_grad": True, "forward_proc": "forward_batch_only"},
        "optimizer": {"key": "AdamW", "kwargs": {"lr": lr, "weight_decay": weight_decay}},
        "scheduler": {"key": "CosineAnnealingLR", "kwargs": {"T_max": total_steps, "eta_min": 0.0},
                      "scheduling_step": 1},
        "criterion": kd_criterion_config(temperature=temperature, alpha_kd=alpha_kd),
    }
    try:
        box = get_distillation_box(teacher, student, {"train": TensorDataset(x_train, y_train)}, train_config,
                                   device, None, False, 1)
        steps = 0
        started = time.perf_counter()
        for epoch in range(box.num_epochs):
            box.pre_epoch_process(epoch=epoch)
            box.train_data_loader.batch_sampler.set_epoch(epoch)
            for sample_batch, targets, supp_dict in box.train_data_loader:
                sample_batch, targets = sample_batch.to(device), targets.to(device)
                loss = box.forward_process(sample_batch, targets, supp_dict)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite torchdistill KD loss at step {steps}: {loss.item()}")
                box.post_forward_process(loss=loss)
                steps += 1
            box.post_epoch_process()
        seconds = time.perf_counter() - started
        box.clean_modules()
    finally:
        td_logger.setLevel(old_level)
        for p, flag in zip(teacher.parameters(), teacher_flags, strict=True):
            p.requires_grad_(flag)
        for p, flag in zip(student.parameters(), student_flags, strict=True):
            p.requires_grad_(flag)
    if steps != total_steps:
        raise RuntimeError(f"torchdistill ran {steps} steps, expected {total_steps}")
    return {"accuracy": _accuracy(student, x_test.to(device), y_test.to(device)), "steps": steps,
            "seconds": seconds}


def _check_loss_against_mentor() -> None:
    """torchdistill's KDLoss via :func:`kd_criterion_config` equals mentor's hinton_kd loss for several alphas."""
    from torchdistill.losses.registry import get_high_level_loss

    from mentor import losses  # mentor is installed editable in .venv-bench

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=g, dtype=torch.float64), torch.randn(16, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (16,), generator=g)
    for alpha_kd in (0.0, 0.5, 0.9, 1.0):
        for temperature in (1.0, 4.0):
            crit = get_high_level_loss(kd_criterion_config(temperature=temperature, alpha_kd=alpha_kd))
            got = crit({"student": {".": {"output": s}}, "teacher": {".": {"output": t}}}, {}, y)
            want = ((1 - alpha_kd) * losses.cross_entropy(s, y)
                    + alpha_kd * losses.kl_div(s, t, temperature=temperature))
            assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), (alpha_kd, temperature, got, want)
    print("KDLoss mapping matches mentor.losses for alpha_kd in {0, 0.5, 0.9, 1} and T in {1, 4}")


def _smoke() -> None:
    import torchdistill

    _check_loss_against_mentor()
    torch.manual_seed(0)
    n_classes, dim = 4, 20
    w = torch.randn(dim, n_classes)
    x = torch.randn(1200, dim)
    y = (x @ w).argmax(-1)
    x_train, y_train, x_test, y_test = x[:1000], y[:1000], x[1000:], y[1000:]
    teacher = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, n_classes))
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(teacher(x_train), y_train).backward()
        opt.step()
    student = nn.Sequential(nn.Linear(dim, 16), nn.ReLU(), nn.Linear(16, n_classes))
    before = _accuracy(student, x_test, y_test)
    out = run_torchdistill_kd(teacher, student, x_train, y_train, x_test, y_test, epochs=3, batch_size=64, lr=1e-2,
                              temperature=4.0, alpha_kd=0.9, seed=0)
    print(f"torchdistill {torchdistill.__version__}, torch {torch.__version__}: teacher acc "
          f"{_accuracy(teacher, x_test, y_test):.3f}, student acc {before:.3f} -> {out['accuracy']:.3f}, "
          f"{out['steps']} steps in {out['seconds']:.2f} s")
    assert out["steps"] == 3 * (1000 // 64), out
    assert out["accuracy"] > before, (before, out)
    assert all(p.requires_grad for p in teacher.parameters())
    # Explicit batches: 1-D index tensors, one per step.
    batches = [torch.arange(i * 50, (i + 1) * 50) for i in range(5)]
    out2 = run_torchdistill_kd(teacher, student, x_train, y_train, x_test, y_test, steps_per_epoch_batches=batches,
                               epochs=1, batch_size=50, lr=1e-3, temperature=2.0, alpha_kd=1.0, seed=1)
    assert out2["steps"] == 5, out2
    _check_against_plain_loop(teacher, x_train, y_train)
    print("smoke test passed")


def _check_against_plain_loop(teacher: nn.Module, x_train: Tensor, y_train: Tensor) -> None:
    """The torchdistill run gives the same student as a plain AdamW + cosine loop over the same batches."""
    import copy

    from mentor import losses

    kw = {"epochs": 2, "batch_size": 100, "lr": 5e-3, "temperature": 4.0, "alpha_kd": 0.7, "seed": 3}
    torch.manual_seed(1)
    student = nn.Sequential(nn.Linear(x_train.shape[1], 16), nn.ReLU(), nn.Linear(16, 4))
    plain = copy.deepcopy(student)
    run_torchdistill_kd(teacher, student, x_train, y_train, x_train, y_train, **kw)
    plan = plan_batches(len(x_train), epochs=kw["epochs"], batch_size=kw["batch_size"], seed=kw["seed"])
    total = sum(len(e) for e in plan)
    opt = torch.optim.AdamW(plain.parameters(), lr=kw["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
    for epoch in plan:
        for idx in epoch:
            with torch.no_grad():
                t = teacher(x_train[idx])
            s = plain(x_train[idx])
            a, temp = kw["alpha_kd"], kw["temperature"]
            loss = (1 - a) * losses.cross_entropy(s, y_train[idx]) + a * losses.kl_div(s, t, temperature=temp)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    diff = max((p - q).abs().max().item() for p, q in zip(student.parameters(), plain.parameters(), strict=True))
    assert diff < 1e-4, diff
    print(f"torchdistill DistillationBox == plain AdamW+cosine loop over {total} steps (max |dW| = {diff:.1e})")


if __name__ == "__main__":
    _smoke()
