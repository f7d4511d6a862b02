"""Semi-supervised parts of the loop: labelled + unlabelled batches, and per-item weighting with explicit updates.

**Batches** (:class:`SemiData`). FixMatch-style training draws a labelled set and an unlabelled pool separately:
every micro-batch of every process holds ``B`` labelled items followed by ``mu * B`` unlabelled ones (Sohn et al.
2020, https://arxiv.org/abs/2001.07685). The two sets are concatenated into one :class:`~mentor.data.TensorData`
(labelled items ``0..L-1``, pool items ``L..L+U-1`` with label ``-1``), so that everything downstream (item
indices, views seeded by item index, weighting indices, checkpoints) works on one index space. An *epoch* is one
pass over the labelled set (drawn from ``(seed, epoch)``, as the loop draws a plain epoch); the pool is read as an
endless stream of permutations, permutation ``j`` drawn from ``(seed, j)`` with a generator of its own, and step
``s`` takes the stream's items ``s * G_u .. (s + 1) * G_u - 1`` (``G_u = mu * B * grad_accum * processes``). Both
are functions of the step, so a resumed run needs no sampler state.

**Weighting** (:class:`Weighings`). For the terms of a method with a :class:`~mentor.method.Weigh`, one fresh
weighting object each per run (``Weigh.make(num_classes, num_items)``). Once per optimiser step, after the teacher
has scored every micro-batch of the step and before any weight is computed, the teacher's probabilities of the
covered items of every micro-batch and process are gathered in global-batch order and passed to the weighting's
``update`` (and first to its alignment's, if any); then each micro-batch's weights come from the updated weighting.
This is the order of the papers (USB updates its thresholds with the batch, then masks the batch).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mentor.data import UNLABELLED, TensorData
from mentor.method import Method, Term

__all__ = ["SemiData", "combine", "Weighings", "covered_items"]

_POOL_STREAM = 500_000_009  # offset of the pool's generator seeds, far from the labelled epochs' ones


def combine(labelled: TensorData, unlabelled: TensorData) -> TensorData:
    """One dataset: the labelled items ``0..L-1``, then the pool's items with label :data:`UNLABELLED`."""
    if labelled.x.shape[1:] != unlabelled.x.shape[1:]:
        raise ValueError(f"the unlabelled pool's items have shape {tuple(unlabelled.x.shape[1:])} but the labelled "
                         f"items have {tuple(labelled.x.shape[1:])}: expected the same shape")
    x = torch.cat([labelled.x, unlabelled.x.to(labelled.x.dtype)])
    y = torch.cat([labelled.y, torch.full((len(unlabelled),), UNLABELLED, dtype=labelled.y.dtype)])
    return TensorData(x, y)


@dataclass(frozen=True)
class SemiData:
    """The step order of a labelled set plus an unlabelled pool (see the module docstring).

    Attributes:
        num_labelled: ``L``, the labelled items (indices ``0..L-1`` of the combined data).
        num_unlabelled: ``U``, the pool (indices ``L..L+U-1``).
        per_micro: ``B``, labelled items per micro-batch and process.
        mu: Unlabelled items per labelled item.
        splits: ``grad_accum * processes``: micro-batches of one optimiser step over all processes.
        seed: The run seed.
    """

    num_labelled: int
    num_unlabelled: int
    per_micro: int
    mu: int
    splits: int
    seed: int

    @property
    def labelled_per_step(self) -> int:
        return self.per_micro * self.splits

    @property
    def unlabelled_per_step(self) -> int:
        return self.mu * self.per_micro * self.splits

    @property
    def steps_per_epoch(self) -> int:
        return self.num_labelled // self.labelled_per_step

    def pool(self, start: int, count: int) -> Tensor:
        """Pool positions ``start .. start + count - 1`` of the endless stream of permutations (int64, in
        ``0..U-1``)."""
        u = self.num_unlabelled
        parts, pos = [], start
        while pos < start + count:
            j, offset = divmod(pos, u)
            perm = torch.randperm(u, generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + _POOL_STREAM + j))
            take = min(u - offset, start + count - pos)
            parts.append(perm[offset : offset + take])
            pos += take
        return torch.cat(parts)

    def epoch_order(self, epoch: int) -> Tensor:
        """The item indices of every step of ``epoch``, concatenated: ``[steps_per_epoch * G]`` with
        ``G = (1 + mu) * B * splits``. Within a step, micro-batch ``i`` (of ``splits``, in the loop's (micro-batch,
        process) order) is ``B`` labelled indices followed by ``mu * B`` pool indices."""
        steps, k, b = self.steps_per_epoch, self.splits, self.per_micro
        perm = torch.randperm(self.num_labelled, generator=torch.Generator().manual_seed(
            self.seed * 1_000_003 + epoch))
        lab = perm[: steps * k * b].view(steps, k, b)
        pool = self.pool(epoch * steps * self.unlabelled_per_step, steps * self.unlabelled_per_step)
        unl = (pool + self.num_labelled).view(steps, k, self.mu * b)
        return torch.cat([lab, unl], dim=2).reshape(-1)


def covered_items(term: Term, labels: Tensor) -> Tensor:
    """bool ``[B]``: the items ``term`` covers (``items``: all, labelled, unlabelled)."""
    if term.items == "labelled":
        return labels != UNLABELLED
    if term.items == "unlabelled":
        return labels == UNLABELLED
    return torch.ones_like(labels, dtype=torch.bool)


class _Runtime:
    """One weighted term's weighting object, its alignment, and the map from dataset index to weighting index."""

    def __init__(self, term: Term, labels: Tensor, num_classes: int, needs_state: bool) -> None:
        weigh = term.weigh
        assert weigh is not None
        covered = covered_items(term, labels)
        count = int(covered.sum())
        if count == 0:
            raise ValueError(f"term {term.name!r} is weighted over the {term.items} items, but the training data "
                             "has none")
        self.term = term
        self.key = weigh.source.split(".", 1)[1]
        self.weighting = weigh.make(num_classes, count)
        self.align = weigh.align(num_classes) if weigh.align is not None else None
        self.rank = (torch.cumsum(covered.long(), 0) - 1).masked_fill(~covered, -1)  # dataset index -> 0..count-1
        self.needs_state = needs_state


class Weighings:
    """The weighted terms of a method in one run (see the module docstring).

    Args:
        method: The method; its terms with their own :class:`~mentor.method.Weigh` get a weighting object each.
        labels: ``[N]`` labels of the whole training data (:data:`UNLABELLED` where missing).
        num_classes: ``C``.
        gather: Under several processes, a function that concatenates a tensor over processes in rank order
            (``accelerator.gather``); ``None`` in one process.
    """

    def __init__(self, method: Method, labels: Tensor, num_classes: int,
                 gather: Callable[[Tensor], Tensor] | None = None) -> None:
        readers: dict[str, set[str]] = {}
        for t in method.terms:
            owner = t.weighting if isinstance(t.weighting, str) else t.name if t.weighting is not None else None
            if owner is not None:
                readers.setdefault(owner, set()).update(
                    s.split(".", 1)[1] for s in (t.target, *t.extra.values()) if s.startswith("weighting."))
        self.runtimes = {t.name: _Runtime(t, labels, num_classes, bool(readers.get(t.name, set()) - {"weights",
                                                                                                      "mask"}))
                         for t in method.terms if t.weigh is not None}
        self.gather = gather

    def __bool__(self) -> bool:
        return bool(self.runtimes)

    @property
    def objects(self) -> dict[str, Any]:
        """The weighting object of each weighted term, by term name."""
        return {name: rt.weighting for name, rt in self.runtimes.items()}

    def step(self, batches: Sequence[tuple[Mapping[str, Tensor] | None, Tensor, Tensor]]
             ) -> list[dict[str, dict[str, Tensor]]]:
        """Update every weighting once with the step's micro-batches, then weigh each micro-batch.

        Args:
            batches: Per micro-batch of this process: ``(teacher outputs, labels [b], item indices [b])``.

        Returns:
            Per micro-batch, the ``weighting`` argument of :func:`mentor.method.compute_terms`.
        """
        out: list[dict[str, dict[str, Tensor]]] = [{} for _ in batches]
        for name, rt in self.runtimes.items():
            probs, covers = [], []
            for t_out, labels, _ in batches:
                if t_out is None or rt.key not in t_out:
                    raise KeyError(f"term {name!r} weighs by teacher output {rt.key!r}; the teacher gave "
                                   f"{sorted(t_out) if t_out is not None else 'nothing'}")
                probs.append(torch.softmax(t_out[rt.key].detach().float(), dim=-1))
                covers.append(covered_items(rt.term, labels).to(probs[-1].device))
            gather = self.gather
            all_probs = torch.cat([gather(p) for p in probs] if gather else probs)
            all_cover = torch.cat([gather(c) for c in covers] if gather else covers)
            index = [i.to(probs[0].device) for _, _, i in batches]
            all_index = torch.cat([gather(i) for i in index] if gather else index)
            selected = all_probs[all_cover]
            ranks = rt.rank.to(all_index.device)[all_index[all_cover]]
            if rt.align is not None:
                rt.align.update(selected)
                selected = rt.align(selected)
            rt.weighting.update(selected, ranks)
            state = rt.weighting.state_dict() if rt.needs_state else {}
            for m, (p, cover) in enumerate(zip(probs, covers, strict=True)):
                if rt.align is not None:
                    p = rt.align(p)
                w = rt.weighting(p)
                w = torch.where(cover, w, torch.zeros((), dtype=w.dtype, device=w.device))
                entry = {"weights": w, "mask": w > 0, **state}
                if rt.align is not None:
                    entry["aligned"] = p.clamp(min=torch.finfo(p.dtype).tiny).log()
                out[m][name] = entry
        return out

    def state_dict(self) -> dict[str, Tensor]:
        """Every weighting's (and alignment's) state: ``"<term>.<key>"`` and ``"<term>.align.<key>"``."""
        state: dict[str, Tensor] = {}
        for name, rt in self.runtimes.items():
            state.update({f"{name}.{k}": v for k, v in rt.weighting.state_dict().items()})
            if rt.align is not None:
                state.update({f"{name}.align.{k}": v for k, v in rt.align.state_dict().items()})
        return state

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        for name, rt in self.runtimes.items():
            own = {k[len(name) + 1:]: v for k, v in state.items()
                   if k.startswith(f"{name}.") and not k.startswith(f"{name}.align.")}
            rt.weighting.load_state_dict(own)
            if rt.align is not None:
                rt.align.load_state_dict({k[len(name) + 7:]: v for k, v in state.items()
                                          if k.startswith(f"{name}.align.")})
