"""Detection metrics for poisoned-sample scores (torch only).

``scores``: one float per sample, higher = more likely poisoned. ``truth``: a bool tensor,
True for poisoned samples. Every function returns plain Python floats/dicts (JSON-ready);
undefined values (no positives or no negatives) are ``nan``.

- :func:`roc_curve`: ROC points at every distinct score (ties are one step).
- :func:`auroc`: the area under the ROC curve, equal to the Mann-Whitney probability
  ``P(s_poison > s_clean) + 0.5 P(s_poison == s_clean)`` (ties count half).
- :func:`tpr_at_fpr`: the TPR at the most permissive threshold whose FPR does not exceed the
  target (no interpolation between thresholds, so the reported FPR is never above target).
- :func:`flag_metrics`: precision, recall, FPR of a boolean flag vector (a split rule).
- :func:`summary`: all of the above in one dict.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

DEFAULT_FPRS = (0.01, 0.05, 0.10)


def _prep(scores, truth):
    s = torch.as_tensor(scores).detach().cpu().to(torch.float64).flatten()
    t = torch.as_tensor(truth).detach().cpu().to(torch.bool).flatten()
    if s.shape != t.shape:
        raise ValueError(f"scores and truth differ in length: {s.numel()} vs {t.numel()}")
    if bool(torch.isnan(s).any()):
        raise ValueError("scores contain nan")
    return s, t


def roc_curve(scores, truth) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(fpr, tpr, thresholds)``: flagging ``scores >= thresholds[i]`` gives ``fpr[i]``,
    ``tpr[i]``. Starts at (0, 0) with threshold +inf; one point per distinct score."""
    s, t = _prep(scores, truth)
    npos, nneg = int(t.sum()), int((~t).sum())
    order = torch.argsort(s, descending=True, stable=True)
    s, t = s[order], t[order]
    tp = torch.cumsum(t.to(torch.float64), 0)
    fp = torch.cumsum((~t).to(torch.float64), 0)
    last = torch.ones(len(s), dtype=torch.bool)
    if len(s) > 1:
        last[:-1] = s[1:] != s[:-1]  # the last row of each run of equal scores
    tp, fp, thr = tp[last], fp[last], s[last]
    zero = torch.zeros(1, dtype=torch.float64)
    tp = torch.cat([zero, tp])
    fp = torch.cat([zero, fp])
    thr = torch.cat([torch.tensor([math.inf], dtype=torch.float64), thr])
    tpr = tp / npos if npos else torch.full_like(tp, math.nan)
    fpr = fp / nneg if nneg else torch.full_like(fp, math.nan)
    return fpr, tpr, thr


def auroc(scores, truth) -> float:
    """Area under the ROC curve (ties count half); ``nan`` without both classes."""
    s, t = _prep(scores, truth)
    npos, nneg = int(t.sum()), int((~t).sum())
    if npos == 0 or nneg == 0:
        return math.nan
    # average ranks (1-based) with ties sharing their mean rank
    order = torch.argsort(s, stable=True)
    ss = s[order]
    n = len(ss)
    new_run = torch.ones(n, dtype=torch.bool)
    new_run[1:] = ss[1:] != ss[:-1]
    run_id = torch.cumsum(new_run.to(torch.int64), 0) - 1
    pos = torch.arange(1, n + 1, dtype=torch.float64)
    nruns = int(run_id[-1]) + 1
    run_sum = torch.zeros(nruns, dtype=torch.float64).index_add_(0, run_id, pos)
    run_cnt = torch.zeros(nruns, dtype=torch.float64).index_add_(0, run_id, torch.ones(n, dtype=torch.float64))
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = (run_sum / run_cnt)[run_id]
    u = float(ranks[t].sum()) - npos * (npos + 1) / 2.0
    return u / (npos * nneg)


def tpr_at_fpr(scores, truth, fprs: Iterable[float] = DEFAULT_FPRS) -> dict:
    """``{"0.01": tpr, ...}``: the best TPR over thresholds whose FPR is <= each target."""
    fpr, tpr, _ = roc_curve(scores, truth)
    out = {}
    for target in fprs:
        if torch.isnan(fpr).any() or torch.isnan(tpr).any():
            out[f"{target:g}"] = math.nan
            continue
        ok = fpr <= target + 1e-12
        out[f"{target:g}"] = float(tpr[ok].max())
    return out


def flag_metrics(flagged, truth) -> dict:
    """Counts, precision, recall and FPR of a boolean flag vector against the truth."""
    f = torch.as_tensor(flagged).detach().cpu().to(torch.bool).flatten()
    t = torch.as_tensor(truth).detach().cpu().to(torch.bool).flatten()
    if f.shape != t.shape:
        raise ValueError(f"flags and truth differ in length: {f.numel()} vs {t.numel()}")
    tp = int((f & t).sum())
    fp = int((f & ~t).sum())
    fn = int((~f & t).sum())
    tn = int((~f & ~t).sum())
    return {"flagged": tp + fp, "true_positives": tp, "false_positives": fp,
            "precision": tp / (tp + fp) if tp + fp else math.nan,
            "recall": tp / (tp + fn) if tp + fn else math.nan,
            "fpr": fp / (fp + tn) if fp + tn else math.nan}


def summary(scores, truth, *, flagged: Optional[torch.Tensor] = None, fprs: Iterable[float] = DEFAULT_FPRS) -> dict:
    """AUROC, TPR at the given FPRs and, if ``flagged`` is given, the split rule's metrics."""
    s, t = _prep(scores, truth)
    out = {"n": int(len(s)), "num_poison": int(t.sum()), "auroc": auroc(s, t), "tpr_at_fpr": tpr_at_fpr(s, t, fprs)}
    if flagged is not None:
        out["split"] = flag_metrics(flagged, t)
    return out
