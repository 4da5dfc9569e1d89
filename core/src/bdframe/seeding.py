"""Seed derivation. Every random choice in bdframe draws from a generator seeded by
``derive_seed(run_seed, <purpose>, ...)`` so that results do not depend on call order, and
per-sample randomness (scorers) is keyed by the sample id, not by its position."""

from __future__ import annotations

import hashlib
import random

_MASK = (1 << 63) - 1


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that depends only on ``parts`` (stable across processes and machines)."""
    h = hashlib.sha256("\x1f".join(repr(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & _MASK


def generator(*parts: object):
    """A CPU ``torch.Generator`` seeded with ``derive_seed(*parts)``."""
    import torch

    g = torch.Generator()
    g.manual_seed(derive_seed(*parts))
    return g


def seed_everything(seed: int) -> None:
    """Seed Python and torch global RNGs (used for weight initialisation)."""
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
