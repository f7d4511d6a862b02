"""Multi-codebook vector quantisation (MVQ) of teacher features, and a teacher that emits the codes.

MVQ-KD (Guo et al. 2022, "Predicting Multi-Codebook Vector Quantization Indexes for Knowledge Distillation",
https://arxiv.org/abs/2211.00508) compresses each teacher feature vector to ``M`` small integers: the vector is
approximated by a **sum** of one entry from each of ``M`` codebooks of ``K`` entries (additive, or "direct-sum",
quantisation), so with ``K = 256`` a vector costs ``M`` bytes (16 codebooks: 16 bytes, against ``4 * D`` bytes for
float32). The student then learns to predict the ``M`` indices with a cross-entropy per codebook
(:func:`mentor.losses.codebook_cross_entropy`), or to regress the decoded vector with an MSE.

:class:`MultiCodebookQuantizer` holds the codebooks ``[M, K, D]`` (float32) and the training mean ``[D]``
(features are quantised after centring):

* :meth:`~MultiCodebookQuantizer.fit` trains the codebooks: residual k-means (codebook ``m`` is a k-means of what
  codebooks ``0..m-1`` left over), then refinement passes. Each pass (a) re-fits each codebook in turn to what the
  others leave over, given the current indices (every entry becomes the mean of the residuals assigned to it;
  an unused entry is moved to the worst-reconstructed item), and (b) re-encodes each codebook in turn given the
  others (iterated conditional modes). Neither step can increase the training error, so it falls monotonically.
  Deterministic given the seed (on a fixed number of threads).
* :meth:`~MultiCodebookQuantizer.encode`: greedy residual encoding in codebook order, then ``refine_iters``
  sweeps of the same per-codebook re-encoding. Codes are ``uint8`` when ``K <= 256``, ``int16`` when
  ``K <= 32768``, else ``int32``.
* :meth:`~MultiCodebookQuantizer.decode`: the mean plus the sum of the chosen entries.
* :meth:`~MultiCodebookQuantizer.save` / :meth:`~MultiCodebookQuantizer.load`: one safetensors file (codebooks,
  mean) whose header metadata holds a small JSON record (format, version, sizes, training error), written
  atomically.

**Using the codes in a method.** :class:`QuantizedTeacher` wraps a teacher network: its forward returns the
teacher's ``"logits"`` and the ``"codes"`` of one tapped feature, and it passes three tensors through identity
submodules so that a :class:`mentor.method.Feature` can tap them: ``"feature"`` (the float32 feature),
``"decoded"`` (its MVQ reconstruction) and ``"code_onehot"`` (the codes one-hot, ``[B, M * K]``, which gives the
student's projector its output width). :func:`with_code_prediction` and :func:`with_decoded_regression` add the
corresponding feature and term to a method::

    quantizer = MultiCodebookQuantizer(dim=125, num_codebooks=16).fit(teacher_features, seed=0)
    teacher = teachers.Frozen(QuantizedTeacher(teacher_net, "classifier", quantizer, inputs=True))
    method = with_code_prediction(recipes.transfer_kd(temperature=4.0), "features", weight=1 / 16)
    train.fit(student, method, transfer_set, teacher=teacher, ...)

The codes come from the teacher's forward here; a teacher cache stores the same ``[N, M]`` array instead.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn

from mentor import atomic, losses
from mentor.method import Feature, Method, Term
from mentor.taps import Taps

__all__ = [
    "FORMAT",
    "MultiCodebookQuantizer",
    "QuantizedTeacher",
    "code_dtype",
    "with_code_prediction",
    "with_decoded_regression",
]

FORMAT = "mentor.mvq"
"""Value of the ``format`` field in a saved quantizer's metadata."""
_VERSION = 1
_CHUNK = 4096  # items per block in encode / fit: bounds the [chunk, K] distance matrix


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def code_dtype(codebook_size: int) -> torch.dtype:
    """The smallest integer dtype that holds indices ``0..codebook_size-1``: uint8, int16 or int32."""
    if codebook_size <= 256:
        return torch.uint8
    if codebook_size <= 2**15:
        return torch.int16
    return torch.int32


class MultiCodebookQuantizer(nn.Module):
    """``M`` codebooks of ``K`` float32 entries of width ``D``; a vector is coded as one index per codebook.

    Args:
        dim: Feature width ``D``.
        num_codebooks: ``M``, the number of indices (bytes, when ``K <= 256``) per vector.
        codebook_size: ``K``, entries per codebook (256: one byte per index).

    Raises:
        ValueError: A size is not a positive integer (naming it), or ``codebook_size < 2``.

    Attributes:
        codebooks: Buffer ``[M, K, D]`` (float32).
        mean: Buffer ``[D]``, the mean of the training features (float32).
        fitted: Whether the codebooks were trained (or loaded).
        history: Relative training error after the k-means initialisation and after each refinement pass.
    """

    codebooks: Tensor
    mean: Tensor

    def __init__(self, dim: int, num_codebooks: int = 16, codebook_size: int = 256) -> None:
        super().__init__()
        self.dim = _positive_int("dim", dim)
        self.num_codebooks = _positive_int("num_codebooks", num_codebooks)
        self.codebook_size = _positive_int("codebook_size", codebook_size)
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {codebook_size!r}")
        self.register_buffer("codebooks", torch.zeros(num_codebooks, codebook_size, dim))
        self.register_buffer("mean", torch.zeros(dim))
        self.fitted = False
        self.history: list[float] = []

    # -- construction ---------------------------------------------------------------------------------------------

    @classmethod
    def from_codebooks(cls, codebooks: Tensor, mean: Tensor | None = None) -> MultiCodebookQuantizer:
        """A fitted quantizer with the given codebooks ``[M, K, D]`` and mean ``[D]`` (default zero)."""
        if not isinstance(codebooks, Tensor) or codebooks.dim() != 3 or not codebooks.is_floating_point():
            raise ValueError(f"codebooks must be a floating-point tensor [M, K, D], got "
                             f"{getattr(codebooks, 'shape', type(codebooks).__name__)}")
        m, k, d = codebooks.shape
        q = cls(d, m, k)
        if mean is not None:
            if mean.shape != (d,):
                raise ValueError(f"mean must have shape ({d},) to match codebooks {tuple(codebooks.shape)}, got "
                                 f"{tuple(mean.shape)}")
            q.mean.copy_(mean)
        q.codebooks.copy_(codebooks)
        q.fitted = True
        return q

    @property
    def code_dtype(self) -> torch.dtype:
        """dtype of the codes: uint8 for ``K <= 256``, int16 for ``K <= 32768``, else int32."""
        return code_dtype(self.codebook_size)

    @property
    def bytes_per_vector(self) -> int:
        """Storage of one coded vector: ``M`` times the code dtype's size (``M`` bytes when ``K <= 256``)."""
        return self.num_codebooks * self.code_dtype.itemsize

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_codebooks={self.num_codebooks}, codebook_size={self.codebook_size}, "
                f"fitted={self.fitted}")

    # -- checks ---------------------------------------------------------------------------------------------------

    def _check_x(self, x: Tensor, name: str = "x") -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor [N, {self.dim}], got "
                             f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"{name} must have shape [N, {self.dim}] (last dimension = dim), got {tuple(x.shape)}")
        return x.reshape(-1, self.dim).to(device=self.codebooks.device, dtype=torch.float32)

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("the quantizer has no codebooks yet: call fit(features) or load(path) first")

    # -- core steps (all on centred float32 data) -----------------------------------------------------------------

    def _nearest(self, r: Tensor, m: int) -> Tensor:
        """Index of the entry of codebook ``m`` nearest to each row of ``r`` ``[n, D]`` -> ``[n]`` (int64)."""
        c = self.codebooks[m]
        out = torch.empty(r.shape[0], dtype=torch.int64, device=r.device)
        sq = (c * c).sum(dim=1)
        for start in range(0, r.shape[0], _CHUNK):
            block = r[start:start + _CHUNK]
            # ||r - c||^2 = ||r||^2 - 2 r.c + ||c||^2; ||r||^2 does not change the arg-min.
            out[start:start + _CHUNK] = torch.addmm(sq, block, c.t(), alpha=-2.0).argmin(dim=1)
        return out

    def _reconstruct(self, codes: Tensor) -> Tensor:
        """Sum of the chosen entries (without the mean): ``[n, M]`` int64 -> ``[n, D]``."""
        out = torch.zeros(codes.shape[0], self.dim, device=self.codebooks.device)
        for m in range(self.num_codebooks):
            out += self.codebooks[m].index_select(0, codes[:, m])
        return out

    def _icm(self, xc: Tensor, codes: Tensor, recon: Tensor) -> None:
        """One sweep: re-encode each codebook given the others (in place; never increases the error)."""
        for m in range(self.num_codebooks):
            chosen = self.codebooks[m].index_select(0, codes[:, m])
            target = xc - (recon - chosen)
            new = self._nearest(target, m)
            recon += self.codebooks[m].index_select(0, new) - chosen
            codes[:, m] = new

    def _greedy(self, xc: Tensor) -> tuple[Tensor, Tensor]:
        """Residual encoding in codebook order: codes ``[n, M]`` (int64) and the reconstruction ``[n, D]``."""
        codes = torch.empty(xc.shape[0], self.num_codebooks, dtype=torch.int64, device=xc.device)
        recon = torch.zeros_like(xc)
        for m in range(self.num_codebooks):
            codes[:, m] = self._nearest(xc - recon, m)
            recon += self.codebooks[m].index_select(0, codes[:, m])
        return codes, recon

    def _refit_codebook(self, xc: Tensor, codes: Tensor, recon: Tensor, m: int) -> None:
        """Codebook ``m`` := the least-squares fit to what the others leave over, given the codes (in place)."""
        k = self.codebook_size
        idx = codes[:, m]
        target = xc - (recon - self.codebooks[m].index_select(0, idx))
        sums = torch.zeros(k, self.dim, device=xc.device).index_add_(0, idx, target)
        counts = torch.bincount(idx, minlength=k)
        used = counts > 0
        new = self.codebooks[m].clone()
        new[used] = sums[used] / counts[used].unsqueeze(1).to(sums.dtype)
        empty = (~used).nonzero().flatten()
        if empty.numel():
            # An unused entry changes no error where it is; put it where the error is largest (distinct items),
            # so that the next re-encoding can use it.
            err = ((target - new.index_select(0, idx)) ** 2).sum(dim=1)
            worst = err.topk(min(empty.numel(), err.numel())).indices
            new[empty[: worst.numel()]] = target[worst]
        recon += new.index_select(0, idx) - self.codebooks[m].index_select(0, idx)
        self.codebooks[m] = new

    @staticmethod
    def _kmeans(r: Tensor, k: int, iters: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Lloyd's k-means of ``r`` ``[n, D]``: centres ``[k, D]`` and assignments ``[n]``; empty clusters move to
        the points farthest from their centres."""
        n = r.shape[0]
        centres = r[torch.randperm(n, generator=generator)[:k]].clone()
        if n < k:  # fewer points than entries: repeat points (their duplicates stay unused, then get re-seeded)
            centres = r[torch.arange(k) % n].clone()
        assign = torch.zeros(n, dtype=torch.int64, device=r.device)
        for _ in range(max(iters, 1)):
            sq = (centres * centres).sum(dim=1)
            for start in range(0, n, _CHUNK):
                assign[start:start + _CHUNK] = torch.addmm(sq, r[start:start + _CHUNK], centres.t(),
                                                           alpha=-2.0).argmin(dim=1)
            sums = torch.zeros_like(centres).index_add_(0, assign, r)
            counts = torch.bincount(assign, minlength=k)
            used = counts > 0
            centres[used] = sums[used] / counts[used].unsqueeze(1).to(r.dtype)
            empty = (~used).nonzero().flatten()
            if empty.numel():
                err = ((r - centres.index_select(0, assign)) ** 2).sum(dim=1)
                worst = err.topk(min(empty.numel(), n)).indices
                centres[empty[: worst.numel()]] = r[worst]
        sq = (centres * centres).sum(dim=1)
        for start in range(0, n, _CHUNK):
            assign[start:start + _CHUNK] = torch.addmm(sq, r[start:start + _CHUNK], centres.t(),
                                                       alpha=-2.0).argmin(dim=1)
        return centres, assign

    # -- public API -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def fit(
        self,
        features: Tensor,
        *,
        iters: int = 10,
        kmeans_iters: int = 10,
        seed: int = 0,
        progress: bool = False,
    ) -> MultiCodebookQuantizer:
        """Train the codebooks on ``features``.

        Residual k-means gives the initial codebooks and codes; then ``iters`` refinement passes each re-fit every
        codebook to what the others leave over and re-encode every codebook given the others (see the module
        notes). The training error never increases from pass to pass; :attr:`history` records it.

        Args:
            features: Teacher features ``[N, D]`` (any leading shape ``[..., D]`` is flattened), ``N >= 2``.
            iters: Refinement passes (>= 0).
            kmeans_iters: Lloyd iterations of each codebook's k-means initialisation (>= 1).
            seed: Seed of the k-means initialisation; the same seed and data give the same codebooks.
            progress: Show a progress bar over the codebooks and the passes.

        Returns:
            ``self``, fitted.

        Raises:
            ValueError: Bad ``features`` (not ``[N, D]`` floating point, fewer than 2 items, non-finite values) or a
                bad ``iters`` / ``kmeans_iters`` / ``seed``, naming the argument.
        """
        x = self._check_x(features, "features")
        if x.shape[0] < 2:
            raise ValueError(f"features must hold at least 2 vectors, got {x.shape[0]}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("features contain NaN or infinite values")
        _non_negative_int("iters", iters)
        _positive_int("kmeans_iters", kmeans_iters)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        from tqdm.auto import tqdm

        generator = torch.Generator().manual_seed(seed)
        self.mean.copy_(x.mean(dim=0))
        xc = x - self.mean
        total = float((xc * xc).sum()) or 1.0
        bar = tqdm(total=self.num_codebooks + iters, desc="mvq fit", disable=not progress, leave=False)
        codes = torch.empty(x.shape[0], self.num_codebooks, dtype=torch.int64, device=x.device)
        recon = torch.zeros_like(xc)
        for m in range(self.num_codebooks):
            centres, assign = self._kmeans(xc - recon, self.codebook_size, kmeans_iters, generator)
            self.codebooks[m] = centres
            codes[:, m] = assign
            recon += centres.index_select(0, assign)
            bar.update(1)
        self.history = [float(((xc - recon) ** 2).sum()) / total]
        for _ in range(iters):
            for m in range(self.num_codebooks):
                self._refit_codebook(xc, codes, recon, m)
            self._icm(xc, codes, recon)
            recon = self._reconstruct(codes)  # re-summed: no drift from the in-place updates
            self.history.append(float(((xc - recon) ** 2).sum()) / total)
            bar.update(1)
            bar.set_postfix(rel_error=f"{self.history[-1]:.4f}")
        bar.close()
        self.fitted = True
        return self

    @torch.no_grad()
    def encode(self, x: Tensor, *, refine_iters: int = 3) -> Tensor:
        """Codes of ``x``: greedy residual encoding, then ``refine_iters`` per-codebook re-encoding sweeps.

        Args:
            x: ``[N, D]`` (or ``[..., D]``), any floating dtype.
            refine_iters: Re-encoding sweeps after the greedy pass (>= 0); each never increases the error.

        Returns:
            ``[N, M]`` (or ``[..., M]``) codes of dtype :attr:`code_dtype` (uint8 for ``K <= 256``), on the
            quantizer's device.
        """
        self._check_fitted()
        _non_negative_int("refine_iters", refine_iters)
        lead = x.shape[:-1] if isinstance(x, Tensor) else ()
        xc = self._check_x(x) - self.mean
        codes, recon = self._greedy(xc)
        for _ in range(refine_iters):
            self._icm(xc, codes, recon)
        return codes.to(self.code_dtype).reshape(*lead, self.num_codebooks)

    def _check_codes(self, codes: Tensor) -> Tensor:
        if not isinstance(codes, Tensor) or codes.is_floating_point() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor [N, {self.num_codebooks}], got "
                             f"{getattr(codes, 'dtype', type(codes).__name__)}")
        if codes.dim() < 1 or codes.shape[-1] != self.num_codebooks:
            raise ValueError(f"codes must have shape [N, {self.num_codebooks}] (last dimension = num_codebooks), "
                             f"got {tuple(codes.shape)}")
        # int64 before any indexing: a uint8 tensor used as an index would be read as a boolean mask.
        flat = codes.reshape(-1, self.num_codebooks).to(device=self.codebooks.device, dtype=torch.int64)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in 0..{self.codebook_size - 1} (codebook_size {self.codebook_size}), "
                             f"got values in {int(flat.min())}..{int(flat.max())}")
        return flat

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Vectors from codes: ``mean + sum_m codebooks[m, codes[:, m]]``.

        Args:
            codes: ``[N, M]`` (or ``[..., M]``) integer codes, any integer dtype.

        Returns:
            ``[N, D]`` (or ``[..., D]``) float32.
        """
        self._check_fitted()
        flat = self._check_codes(codes)
        return (self._reconstruct(flat) + self.mean).reshape(*codes.shape[:-1], self.dim)

    def onehot(self, codes: Tensor) -> Tensor:
        """Codes as one-hot rows: ``[N, M]`` -> ``[N, M * K]`` float32 (codebook-major)."""
        flat = self._check_codes(codes)
        offsets = torch.arange(self.num_codebooks, device=flat.device) * self.codebook_size
        out = torch.zeros(flat.shape[0], self.num_codebooks * self.codebook_size, device=flat.device)
        out.scatter_(1, flat + offsets, 1.0)
        return out.reshape(*codes.shape[:-1], -1)

    def expected_decode(self, logits: Tensor) -> Tensor:
        """The vector a code predictor expects: ``mean + sum_m sum_k softmax(logits)[m, k] * codebooks[m, k]``.

        Args:
            logits: ``[N, M, K]`` or flat ``[N, M * K]`` (codebook-major) student logits.

        Returns:
            ``[N, D]``, differentiable in ``logits``.
        """
        self._check_fitted()
        m, k = self.num_codebooks, self.codebook_size
        if logits.shape[-1] == m * k and (logits.dim() < 2 or logits.shape[-2:] != (m, k)):
            logits = logits.reshape(*logits.shape[:-1], m, k)
        if logits.dim() < 2 or logits.shape[-2:] != (m, k):
            raise ValueError(f"logits must have shape [N, {m}, {k}] or [N, {m * k}], got {tuple(logits.shape)}")
        probs = torch.softmax(logits.float(), dim=-1)
        return torch.einsum("...mk,mkd->...d", probs, self.codebooks) + self.mean

    @torch.no_grad()
    def relative_error(self, x: Tensor, *, refine_iters: int = 3) -> float:
        """``||x - decode(encode(x))||^2 / ||x - mean(x)||^2`` summed over items (``mean(x)``: the mean of the
        given ``x``, so 1.0 is the error of coding every vector as the mean)."""
        flat = self._check_x(x)
        rec = self.decode(self.encode(flat, refine_iters=refine_iters))
        denom = float(((flat - flat.mean(dim=0)) ** 2).sum())
        return float(((flat - rec) ** 2).sum()) / (denom if denom > 0 else 1.0)

    # -- files ----------------------------------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """The JSON record saved with the codebooks."""
        return {"format": FORMAT, "version": _VERSION, "dim": self.dim, "num_codebooks": self.num_codebooks,
                "codebook_size": self.codebook_size, "code_dtype": str(self.code_dtype).removeprefix("torch."),
                "bytes_per_vector": self.bytes_per_vector,
                "train_relative_error": self.history[-1] if self.history else None}

    def save(self, path: str | Path) -> None:
        """Write the codebooks and mean to one safetensors file, the :meth:`metadata` JSON in its header, atomically.

        Raises:
            RuntimeError: The quantizer is not fitted.
        """
        self._check_fitted()
        tensors = {"codebooks": self.codebooks.detach().float().cpu().contiguous(),
                   "mean": self.mean.detach().float().cpu().contiguous()}
        atomic.write_bytes(path, safetensors_save(tensors, metadata={FORMAT: json.dumps(self.metadata())}))

    @classmethod
    def load(cls, path: str | Path) -> MultiCodebookQuantizer:
        """Read a quantizer written by :meth:`save`.

        Raises:
            ValueError: The file is not a mentor MVQ file, or its tensors do not match its metadata.
        """
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise
        except Exception as err:
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
        if FORMAT not in header:
            raise ValueError(f"{path}: not a mentor MVQ file (no {FORMAT!r} metadata in its header)")
        meta = json.loads(header[FORMAT])
        if meta.get("format") != FORMAT or meta.get("version") != _VERSION:
            raise ValueError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}, expected "
                             f"{FORMAT!r} version {_VERSION}")
        shape = (meta["num_codebooks"], meta["codebook_size"], meta["dim"])
        if set(tensors) != {"codebooks", "mean"} or tuple(tensors["codebooks"].shape) != shape \
                or tuple(tensors["mean"].shape) != (meta["dim"],):
            raise ValueError(f"{path}: tensors {({k: tuple(v.shape) for k, v in tensors.items()})} do not match "
                             f"the metadata (codebooks {shape}, mean ({meta['dim']},))")
        q = cls.from_codebooks(tensors["codebooks"].float(), tensors["mean"].float())
        if meta.get("train_relative_error") is not None:
            q.history = [float(meta["train_relative_error"])]
        return q


# ------------------------------------------------------------------------------------------------- the teacher


class QuantizedTeacher(nn.Module):
    """A teacher network whose forward also returns the MVQ codes of one of its features.

    ``forward(x)`` runs ``teacher`` and returns ``{"logits": [B, C], "codes": [B, M]}`` (codes in the quantizer's
    code dtype). On the way it calls three identity submodules, which :class:`mentor.method.Feature` can tap:
    ``"feature"`` (the teacher's feature flattened to ``[B, D]``, float32), ``"decoded"`` (its reconstruction from
    the codes, ``[B, D]``) and ``"code_onehot"`` (``[B, M * K]``). Wrap it in :class:`mentor.teachers.Frozen`.

    Args:
        teacher: The teacher network (its output: logits, or a dict with ``"logits"``).
        layer: Module path of the feature in ``teacher`` (as in ``named_modules()``).
        quantizer: A fitted quantizer of width ``D`` = the flattened feature size.
        inputs: Quantise the module's input instead of its output (``"classifier"`` with ``inputs=True`` is the
            penultimate feature of most classifiers).
        refine_iters: Re-encoding sweeps of :meth:`MultiCodebookQuantizer.encode`.
    """

    def __init__(self, teacher: nn.Module, layer: str, quantizer: MultiCodebookQuantizer, *, inputs: bool = False,
                 refine_iters: int = 3) -> None:
        super().__init__()
        if not quantizer.fitted:
            raise ValueError("quantizer must be fitted (call fit or load) before it codes a teacher's features")
        self.teacher = teacher
        self.quantizer = quantizer
        self.refine_iters = _non_negative_int("refine_iters", refine_iters)
        self.layer = layer
        self._taps = Taps(teacher, [layer], inputs=inputs)
        self.feature = nn.Identity()
        self.decoded = nn.Identity()
        self.code_onehot = nn.Identity()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``[B, ...]`` -> ``{"logits": [B, C], "codes": [B, M]}``."""
        with self._taps:
            out = self.teacher(x)
            feat = self._taps.pop()[self.layer]
        logits = out if isinstance(out, Tensor) else out["logits"]
        flat = self.feature(feat.reshape(feat.shape[0], -1).float())
        codes = self.quantizer.encode(flat, refine_iters=self.refine_iters)
        self.decoded(self.quantizer.decode(codes))
        self.code_onehot(self.quantizer.onehot(codes))
        return {"logits": logits, "codes": codes}


# ------------------------------------------------------------------------------------------ method builders


def _extend(method: Method, feature: Feature, term: Term) -> Method:
    return dataclasses.replace(method, name=f"{method.name}+{term.name}", terms=(*method.terms, term),
                               features=(*method.features, feature))


def with_code_prediction(
    method: Method,
    student_layer: str,
    *,
    weight: float = 1.0,
    name: str = "mvq_ce",
    projector: str = "linear",
    inputs: bool = False,
    code_shape: tuple[int, int] | None = None,
) -> Method:
    """``method`` plus a term that trains the student to predict the teacher's MVQ codes.

    Adds ``Feature(name, student=student_layer, teacher="code_onehot", projector=projector)``: the projector maps the
    student feature to ``M * K`` logits (its width comes from the one-hot the :class:`QuantizedTeacher` emits), and
    ``Term(name, losses.codebook_cross_entropy, student="feat.<name>", target="teacher.codes")``: the sum over
    codebooks of the cross-entropy, averaged over items. The teacher must be ``Frozen(QuantizedTeacher(...))``.

    Args:
        method: The method to extend (for example ``recipes.transfer_kd(...)``).
        student_layer: Module path of the student feature.
        weight: Weight of the term (a constant or a schedule); ``1 / M`` makes it a mean over codebooks.
        name: Feature and term name.
        projector: Projector kind (``"linear"`` or ``"mlp"``).
        inputs: Tap the student module's input instead of its output.
        code_shape: ``(M, K)`` for a teacher whose codes come without a network to tap (a teacher cache built with
            ``outputs=("codes",)``): the projector then maps to ``M * K`` logits directly.
    """
    if code_shape is not None:
        m, k = code_shape
        feature = Feature(name, student=student_layer, teacher=None, projector=projector, inputs=inputs,
                          shape=(m * k,))
    else:
        feature = Feature(name, student=student_layer, teacher="code_onehot", projector=projector, inputs=inputs)
    term = Term(name, losses.codebook_cross_entropy, student=f"feat.{name}", target="teacher.codes", weight=weight)
    return _extend(method, feature, term)


def with_decoded_regression(
    method: Method,
    student_layer: str,
    *,
    weight: float = 1.0,
    name: str = "mvq_mse",
    projector: str = "linear",
    teacher: str = "decoded",
    inputs: bool = False,
) -> Method:
    """``method`` plus a FitNets-style hint: the projected student feature regresses the teacher's MVQ-decoded
    feature (``teacher="decoded"``) or, for comparison, the full float32 feature (``teacher="feature"``), with
    :func:`mentor.losses.hint_mse`. The teacher must be ``Frozen(QuantizedTeacher(...))``.

    Args:
        method: The method to extend.
        student_layer: Module path of the student feature.
        weight: Weight of the term.
        name: Feature and term name.
        projector: Projector kind.
        teacher: ``"decoded"`` or ``"feature"``.
        inputs: Tap the student module's input instead of its output.
    """
    if teacher not in ("decoded", "feature"):
        raise ValueError(f"teacher must be 'decoded' or 'feature', got {teacher!r}")
    feature = Feature(name, student=student_layer, teacher=teacher, projector=projector, inputs=inputs)
    term = Term(name, losses.hint_mse, student=f"feat.{name}", target=f"teacher.feat.{name}", weight=weight)
    return _extend(method, feature, term)

