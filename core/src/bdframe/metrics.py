"""Clean accuracy, attack success rate and detection metrics.

ASR is measured on the attack's poisoned test set, which holds only the eligible test images
(for all-to-one attacks: those whose true label is not the target; for TaCT: source-class
images), all labelled with the target (see docs/attacks.md, "Conventions", ASR set).
"""

from __future__ import annotations

import torch

from bdframe.data import ImageSet
from bdframe.nn import predict


def accuracy(model, data: ImageSet, *, batch_size: int = 512, device="cpu") -> float:
    if len(data) == 0:
        return float("nan")
    pred = predict(model, data, batch_size=batch_size, device=device).argmax(1)
    return float((pred == data.labels).float().mean())


def detection(flagged_ids, poison_ids, all_ids) -> dict:
    """Recall, precision and FPR of a set of flagged ids against the ground-truth poison ids."""
    all_ids = torch.as_tensor(all_ids, dtype=torch.int64)
    flagged = torch.isin(all_ids, torch.as_tensor(flagged_ids, dtype=torch.int64))
    truth = torch.isin(all_ids, torch.as_tensor(poison_ids, dtype=torch.int64))
    tp = int((flagged & truth).sum())
    fp = int((flagged & ~truth).sum())
    fn = int((~flagged & truth).sum())
    tn = int((~flagged & ~truth).sum())
    return {"flagged": tp + fp, "true_positives": tp, "false_positives": fp,
            "recall": tp / (tp + fn) if tp + fn else float("nan"),
            "precision": tp / (tp + fp) if tp + fp else float("nan"),
            "fpr": fp / (fp + tn) if fp + tn else float("nan")}
