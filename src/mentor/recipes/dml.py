"""``dml``: Deep Mutual Learning, a cohort of peers trained together, each also learning from the others.

Zhang, Xiang, Hospedales & Lu 2018, "Deep Mutual Learning", https://arxiv.org/abs/1706.00384. With ``K`` peers,
peer ``k`` minimises

    L_k = CE(p_k, y) + 1 / (K - 1) * sum_{l != k} KL(p_l || p_k)

where ``p_l`` is peer ``l``'s prediction, treated as a constant (no gradient flows into peer ``l`` through
peer ``k``'s loss).

**One loop, one forward.** The student of a DML run is a :class:`Cohort`: one module holding the peers, whose
forward returns every peer's logits under the keys ``"peer0"``, ``"peer1"``, ... (and ``"logits"``, which is
peer 0's logits, so that evaluation, agreement and reports measure one deployable model, not an ensemble that costs
``K`` forwards). The KL terms read the other peers' outputs of the *same* forward through the ``"detached.<key>"``
term source (see :class:`mentor.method.Term`): the target is the tensor with its gradient stopped, so the summed
loss ``sum_k L_k`` gives every peer exactly the gradient of its own ``L_k``. All peers step together from one
optimiser (per-parameter state, so this equals one optimiser per peer with the same settings; only a global
gradient-norm clip is shared). The paper's Algorithm 1 updates the peers in turn and recomputes the predictions
between updates; the simultaneous update here is the variant that needs no second forward (as the paper's
multi-GPU variant).

**Export.** ``mentor train`` with ``recipe: {name: dml, args: {peers: 2}}`` builds the cohort from the
``student`` spec (peer ``i`` initialised from seed ``seed + i``, so peer 0 starts as a ``supervised`` run of the
same seed would) or from a list of model specs (``peers: [{model: cnn}, {model: mlp, args: {...}}]``). The run
directory holds ``student.safetensors`` (the whole cohort, for resume and ``mentor eval``), ``peer<i>.safetensors``
(each peer alone, loadable into its own architecture; a DML run used as ``teacher.run`` teaches with peer 0) and
``result.json`` with each peer's test metrics under ``"peers"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from mentor import losses
from mentor.method import Method, Term
from mentor.teachers import as_outputs

__all__ = ["Cohort", "dml", "peer_count"]


class Cohort(nn.Module):
    """Several peer models run on the same input.

    Args:
        peers: The peer models (at least 2), each mapping ``[B, ...]`` inputs to ``[B, C]`` logits (or a dict with
            ``"logits"``); all must have the same number of classes.

    Forward: ``x [B, ...] -> {"logits": [B, C] (peer 0), "peer0": [B, C], ..., "peer{K-1}": [B, C]}``.
    """

    def __init__(self, peers: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(peers) < 2:
            raise ValueError(f"a cohort needs at least 2 peers, got {len(peers)}")
        self.peers = nn.ModuleList(peers)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Every peer's logits under ``"peer<i>"``; ``"logits"`` is peer 0's."""
        out = {f"peer{i}": as_outputs(peer(x))["logits"] for i, peer in enumerate(self.peers)}
        out["logits"] = out["peer0"]
        return out


def peer_count(peers: int | Sequence[Mapping[str, Any]]) -> int:
    """The number of peers ``peers`` describes: a count, or a list of model specs (``{model: ..., args: ...}``)."""
    if isinstance(peers, bool) or not isinstance(peers, (int, list, tuple)):
        raise ValueError(f"peers must be a number of peers (>= 2) or a list of model specs, got {peers!r}")
    if isinstance(peers, int):
        count = peers
    else:
        for i, spec in enumerate(peers):
            if not isinstance(spec, Mapping) or "model" not in spec or set(spec) - {"model", "args"}:
                raise ValueError(f"peers[{i}] = {spec!r}: expected a model spec {{model: NAME, args: {{...}}}}")
        count = len(peers)
    if count < 2:
        raise ValueError(f"dml needs at least 2 peers, got {count}")
    return count


def dml(
    peers: int | list[dict[str, Any]] = 2,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    label_smoothing: float = 0.0,
) -> Method:
    """Deep Mutual Learning over ``K`` peers (the student must be a :class:`Cohort` of ``K`` peers).

    Terms: ``ce<k>`` (peer ``k``'s cross-entropy on the labels, weight 1) and ``kl<k>_<l>`` for every ordered pair
    ``l != k`` (``KL(p_l || p_k)`` with ``p_l`` detached, weight ``kl_weight / (K - 1)``).

    Args:
        peers: Number of peers (>= 2), or a list of model specs (``mentor train`` builds one peer from each).
        temperature: Softmax temperature of the KL terms (the paper uses 1; the KL is scaled by ``T^2``).
        kl_weight: Weight of the mimicry part (the paper's is 1).
        label_smoothing: Label smoothing of the cross-entropy terms.
    """
    k = peer_count(peers)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not kl_weight >= 0:
        raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
    terms: list[Term] = []
    for i in range(k):
        terms.append(Term(f"ce{i}", losses.cross_entropy, student=f"peer{i}", target="label", items="labelled",
                          kwargs={"label_smoothing": label_smoothing}))
        terms += [Term(f"kl{i}_{j}", losses.kl_div, student=f"peer{i}", target=f"detached.peer{j}",
                       weight=kl_weight / (k - 1), kwargs={"temperature": temperature})
                  for j in range(k) if j != i]
    return Method(
        name="dml",
        terms=tuple(terms),
        description="K peers trained together: CE + mean KL to the others' detached predictions (Zhang et al. 2018)",
    )
