"""Small reference models, and building any ``torch.nn.Module`` from a name and keyword arguments.

The MNIST-1D reference models follow the shapes of the MNIST-1D paper (Greydanus & Kobak 2020,
https://arxiv.org/abs/2011.14439): an MLP, a 1-D CNN and a GRU. Inputs are ``[B, L]`` (or ``[B, 1, L]``) signals;
outputs are logits ``[B, num_classes]``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["MLP", "CNN1d", "GRUClassifier", "BUILTIN_MODELS", "build_model", "count_parameters", "tiny_llama"]


class MLP(nn.Module):
    """Fully connected classifier: ``in_features -> hidden... -> num_classes`` with ReLU.

    Args:
        in_features: Flattened input size.
        hidden: Widths of the hidden layers.
        num_classes: Output classes.
        dropout: Dropout before each hidden layer's output (0 disables it).
    """

    def __init__(
        self, in_features: int = 40, hidden: Sequence[int] = (100, 100), num_classes: int = 10, dropout: float = 0.0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, ...] -> [B, num_classes]``."""
        return self.classifier(self.features(x.flatten(1)))


class CNN1d(nn.Module):
    """1-D convolutional classifier: three strided convolutions, then a linear layer.

    Args:
        length: Input length ``L``.
        channels: Channels of each convolution.
        num_classes: Output classes.
        dropout: Dropout on the flattened features before the linear layer (0 disables it; Noisy Student's model
            noise).
    """

    def __init__(self, length: int = 40, channels: int = 25, num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        out_len = length
        for k in (5, 3, 3):
            out_len = (out_len + 2 - k) // 2 + 1
        self.classifier = nn.Linear(channels * out_len, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, L]`` or ``[B, 1, L]`` -> ``[B, num_classes]``."""
        h = x.reshape(x.shape[0], 1, -1)
        h = torch.relu(self.conv1(h))
        h = torch.relu(self.conv2(h))
        h = torch.relu(self.conv3(h))
        return self.classifier(self.dropout(h.flatten(1)))


class GRUClassifier(nn.Module):
    """GRU over the signal's steps; the last hidden state is classified.

    Args:
        hidden: GRU hidden size.
        num_classes: Output classes.
        input_size: Features per step (1 for a plain signal).
    """

    def __init__(self, hidden: int = 32, num_classes: int = 10, input_size: int = 1) -> None:
        super().__init__()
        self.input_size = input_size
        self.gru = nn.GRU(input_size, hidden, batch_first=True)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, L]`` -> ``[B, num_classes]``."""
        seq = x.reshape(x.shape[0], -1, self.input_size)
        _, h = self.gru(seq)
        return self.classifier(h[-1])


def tiny_llama(layers: int = 2, width: int = 128, vocab: int = 512, **kwargs: Any) -> nn.Module:
    """A Llama-style causal LM (:func:`mentor.lm.models.tiny_llama`, needs the ``lm`` extra) for configs.

    Unlike the function it wraps, its weights come from the global generator unless ``seed`` is given (so the
    run's seed picks the initialisation), and ``use_cache`` defaults to ``False`` (training forwards build no KV
    cache; :mod:`mentor.lm.generate` asks for one explicitly).
    """
    from mentor.lm.models import tiny_llama as build

    if "seed" not in kwargs:
        kwargs["seed"] = int(torch.randint(0, 2**31 - 1, ()))
    kwargs.setdefault("use_cache", False)
    return build(layers, width, vocab, **kwargs)


BUILTIN_MODELS: Mapping[str, Callable[..., nn.Module]] = {"mlp": MLP, "cnn": CNN1d, "gru": GRUClassifier,
                                                          "tiny_llama": tiny_llama}
"""Short model names accepted wherever a model is named."""


def _import_object(path: str) -> Any:
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(
            f"model {path!r} is neither a built-in name ({', '.join(BUILTIN_MODELS)}) nor a dotted path "
            "like 'package.module.Class' or 'package.module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model {path!r}: cannot import module {module_name!r} ({err})") from err
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise ValueError(f"model {path!r}: module {module_name!r} has no attribute {attr!r}") from err


def build_model(name: str, args: Mapping[str, Any] | None = None) -> nn.Module:
    """Build a model from a built-in short name or a dotted import path, with keyword arguments.

    Args:
        name: ``"mlp"``, ``"cnn"``, ``"gru"``, or a path such as ``"torch.nn.Linear"`` / ``"pkg.mod:make"``.
        args: Keyword arguments for the constructor.

    Returns:
        The model, on the CPU, in training mode.
    """
    factory = BUILTIN_MODELS.get(name) or _import_object(name)
    if not callable(factory):
        raise ValueError(f"model {name!r} is not callable")
    try:
        model = factory(**dict(args or {}))
    except TypeError as err:
        raise ValueError(f"model {name!r} does not accept arguments {dict(args or {})}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r} returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())
