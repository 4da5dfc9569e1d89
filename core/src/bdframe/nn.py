"""The model wrapper: normalisation inside the model, so attacks work in [0,1] pixel space."""

from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    """``Classifier(net, mean, std)``: ``forward(x)`` takes pixels in [0,1].

    ``features(x)`` returns the penultimate (pooled) feature that scorers such as spectral
    signatures, activation clustering and FCT use.
    """

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        c = len(mean)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(self.normalize(x))

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def head_parameter_names(model: nn.Module, features: torch.Tensor) -> list[str]:
    """Names of the parameters of ``model`` (a :class:`Classifier`) that its head uses: those
    that receive a gradient when ``features`` (a batch of penultimate features) go through
    ``model.head`` alone (frozen parameters, ``requires_grad = False``, are left out). Works for
    any network with ``forward_head``, timm's included."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with torch.enable_grad():
        out = model.head(features.detach().float())
        grads = torch.autograd.grad(out.float().sum(), [p for _, p in named], allow_unused=True)
    return [n for (n, _), g in zip(named, grads) if g is not None]


def device_problem(device: str) -> str | None:
    """Why this machine cannot run on ``device`` (None if it can)."""
    d = resolve_device(device)
    if d.type == "cuda":
        if not torch.cuda.is_available():
            return f"$.device: {device!r} requested but CUDA is not available; use device = \"auto\""
        if d.index is not None and d.index >= torch.cuda.device_count():
            return f"$.device: {device!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s)"
    if d.type == "mps" and not torch.backends.mps.is_available():
        return "$.device: 'mps' requested but MPS is not available; use device = \"auto\""
    return None


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda if available, else mps, else cpu."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)
