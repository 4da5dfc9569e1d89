"""Clean accuracy, attack success rate and detection metrics.

ASR is measured on the attack's poisoned test set, which holds only the eligible test images
(for all-to-one attacks: those whose true label is not the target; for TaCT: source-class
images), all labelled with the target (see docs/attacks.md, "Conventions", ASR set).
"""

from __future__ import annotations

import torch

from bdframe.data import ImageSet
from bdframe.detection import flag_metrics
from bdframe.interfaces import ScoreContext
from bdframe.scoring import logits


def accuracy(model, data: ImageSet, *, batch_size: int = 512, device="cpu") -> float:
    if len(data) == 0:
        return float("nan")
    ctx = ScoreContext(device=device, batch_size=batch_size, progress=False)
    pred = logits(model, data, ctx, desc="accuracy").argmax(1)
    return float((pred == data.labels).float().mean())


def detection(flagged_ids, poison_ids, all_ids) -> dict:
    """Recall, precision and FPR of a set of flagged ids against the ground-truth poison ids:
    :func:`bdframe.detection.flag_metrics` over ``all_ids``."""
    all_ids = torch.as_tensor(all_ids, dtype=torch.int64)
    m = flag_metrics(torch.isin(all_ids, torch.as_tensor(flagged_ids, dtype=torch.int64)),
                     torch.isin(all_ids, torch.as_tensor(poison_ids, dtype=torch.int64)))
    # in the order metrics.json has always listed them
    return {k: m[k] for k in ("flagged", "true_positives", "false_positives", "recall", "precision", "fpr")}
