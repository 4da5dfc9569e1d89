"""``scan``: SCAn, the statistical contamination analyzer (Tang et al. 2021; docs/scorers.md, scan).

Features are the model's penultimate features (optionally reduced by PCA to ``max_dim``).

1. Global model, fitted on the auxiliary set only: ``x = mu + u_class + e`` with between-class
   covariance ``S_u`` and within-class covariance ``S_e``, estimated by the reference EM (at most
   100 iterations, until the Frobenius changes of S_u and S_e sum to < 1e-5).
2. Local model, per class of the inspected set: a two-group split by the reference 2-means-like
   EM in the ``F = pinv(S_e)`` metric (random start, at most 100 steps), and the reference
   log-likelihood-ratio statistic of two identities against one.
   ``statistic = "reference"`` (default) reproduces the reference code, whose one-identity
   estimate is ``mu = S_e (N S_u + S_e)^-1 sum x``; the global model's own identity estimate
   (and the posterior mean under the model) is ``S_u (N S_u + S_e)^-1 sum x``, which
   ``statistic = "posterior"`` uses. On synthetic Gaussian classes the posterior form gives
   clean classes a statistic near 1 and separates a planted poison cluster far more reliably;
   the reference form is kept as default for parity with the published baselines.
3. ``J* = anomaly index of the statistics = |a - median| / (1.4826 MAD)`` over classes
   (``upper_only = true`` zeroes the classes below the median). A class is flagged if
   ``J* > threshold`` (e, backdoor-toolbox; BackdoorBench uses e^2). In a flagged class, the
   poisoned group is the one with fewer auxiliary samples.

Score (bdframe's design): ``score_mode = "graded"`` (default) gives ``J*_class`` to the members
of the class's candidate poison group (the group with fewer auxiliary samples) and 0 to everyone
else, so the split rule is ``score > threshold`` (:meth:`Scan.flag`); ``"binary"`` gives 1 to the
flagged samples and 0 otherwise.

Auxiliary (clean) data. SCAn needs a trusted clean set. Pass one as ``score(..., aux=clean_set)``
and the local model runs on the inspected set plus that set, as in the references. Without one,
the scorer takes an approximation from the inspected data: a class-balanced draw of
``aux_size`` samples (backdoor-toolbox's clean budget is 2000) chosen by per-id hash keys (so
the same samples are drawn whatever the row order). That draw is *not* clean: it carries
poison at the set's poison rate (in the target class, at the class's poison share), which
inflates S_e and weakens the test. The drawn samples are already in the inspected set, so the
local model runs on the inspected set alone, and the group with fewer drawn samples is the
candidate poison group; ties go to the smaller group.

All random starts are keyed by (seed, class, sample id), so the scorer is
permutation-equivariant. Set-level.
"""

from __future__ import annotations

import math

import attrs

from bdframe import hookimpl
from bdframe.config import in_range, one_of
from bdframe.interfaces import SampleScorer

EPS = 1e-5


@attrs.frozen
class ScanConfig:
    aux_size: int = attrs.field(default=2000, validator=in_range(2, None),
                                metadata={"help": "size of the class-balanced draw used as the clean set "
                                                  "(from the inspected set unless a trusted aux set is given)"})
    threshold: float = attrs.field(default=math.e, validator=in_range(0, None),
                                   metadata={"help": "flag a class when J* > threshold (e; BackdoorBench e^2)"})
    score_mode: str = attrs.field(default="graded", validator=one_of("graded", "binary"),
                                  metadata={"help": "graded: J* of the class for its candidate group; binary: 0/1"})
    upper_only: bool = attrs.field(default=False,
                                   metadata={"help": "J* = 0 for classes whose statistic is below the median"})
    max_dim: int = attrs.field(default=128, validator=in_range(0, None),
                               metadata={"help": "PCA to this many dimensions if the feature is larger (0: never)"})
    statistic: str = attrs.field(default="reference", validator=one_of("reference", "posterior"),
                                 metadata={"help": "one-identity estimate mu in the test: reference code "
                                                   "(Se (N Su + Se)^-1 sum x) or the posterior mean (Su (N Su + Se)^-1 sum x)"})


def _cov(x):
    import torch

    if len(x) < 2:
        return torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype)
    return torch.cov(x.T)


def _pinv(a):
    import torch

    return torch.linalg.pinv(a, hermitian=True)


class Scan(SampleScorer):
    name = "scan"
    Config = ScanConfig
    summary = "SCAn: per-class two-identity test with a global covariance model (needs clean data)"
    set_level = True

    # -- model pieces ----------------------------------------------------------------------------
    @staticmethod
    def global_model(x, labels):
        """``(S_u, S_e)`` fitted on features ``x`` (float64) with integer ``labels``."""
        import torch

        x = x - x.mean(0, keepdim=True)
        classes, inv = torch.unique(labels, return_inverse=True)
        n_l = torch.bincount(inv, minlength=len(classes)).to(x.dtype)
        sums = torch.zeros(len(classes), x.shape[1], dtype=x.dtype).index_add_(0, inv, x)
        u = (sums / n_l[:, None])[inv]
        su, se = _cov(u), _cov(x - u)
        for _ in range(100):
            f = _pinv(se)
            suf = su @ f
            g = -_pinv(n_l[:, None, None] * su + se) @ suf  # (L, M, M)
            u_m = -torch.einsum("ij,ljk,lk->li", se, g, sums)
            u = u_m[inv]
            new_su, new_se = _cov(u), _cov(x - u)
            dist = torch.linalg.norm(new_su - su) + torch.linalg.norm(new_se - se)
            su, se = new_su, new_se
            if float(dist) <= EPS:
                break
        return su, se

    @staticmethod
    def find_split(x, f, init):
        """Two-group EM of the reference: ``(group1 bool, u1, u2)``; ``init`` in [0,1) per row."""
        import torch

        n = len(x)
        if n == 1:
            return torch.zeros(1, dtype=torch.bool), x[0].clone(), x[0].clone()
        z = init >= 0.5
        if not bool(z.any()):
            z[0] = True
        if bool(z.all()):
            z[0] = False
        zf = init.to(x.dtype).clone()
        zf[0] = float(z[0])
        last = -torch.ones(n, dtype=x.dtype)
        u1 = u2 = x.mean(0)
        for _ in range(100):
            if not (torch.linalg.norm(zf - last) > EPS and torch.linalg.norm((1 - zf) - last) > EPS):
                break
            last = zf.clone()
            g1 = zf >= 0.5
            if not bool(g1.any()) or bool(g1.all()):
                break
            u1, u2 = x[g1].mean(0), x[~g1].mean(0)
            bias = u1 @ f @ u1 - u2 @ f @ u2
            delta = x @ (f @ (u1 - u2))
            zf = (bias - 2 * delta < 0).to(x.dtype)
        return zf >= 0.5, u1, u2

    @staticmethod
    def statistic(x, su, se, f, group1, u1, u2, *, mu_from: str = "reference"):
        """The reference log-likelihood-ratio statistic of one class (``mu_from``: see Config)."""
        n = len(x)
        g = -_pinv(n * su + se)
        mu = -((se if mu_from == "reference" else su) @ g @ x.sum(0))
        n1 = int(group1.sum())
        n2 = n - n1
        sc = n1 * (mu @ f @ mu - u1 @ f @ u1) + n2 * (mu @ f @ mu - u2 @ f @ u2)
        e2 = torch_where_rows(group1, mu - u1, mu - u2)
        sc = sc - 2 * ((x @ f) * e2).sum()
        return sc / n

    # -- the scorer ------------------------------------------------------------------------------
    def analyse(self, feats, labels, ids, seed: int, *, aux_feats=None, aux_labels=None):
        """Run SCAn on inspected features (and optional trusted aux features).

        Returns a dict with ``scores`` (per inspected row), ``flagged`` (bool), ``j_star`` and
        ``statistic`` (per class, by class index), ``aux_rows`` (inspected rows used as aux, if any).
        """
        import torch

        from bdframe.scoring import anomaly_index, balanced_draw, id_uniform

        c = self.config
        feats = feats.to(torch.float64)
        n = len(feats)
        trusted = aux_feats is not None
        if trusted:
            aux_feats = aux_feats.to(torch.float64)
            aux_labels = torch.as_tensor(aux_labels, dtype=torch.int64)
            aux_rows = None
        else:
            from bdframe.data import ImageSet

            dummy = ImageSet(torch.zeros(n, 1, 1, 1, dtype=torch.uint8), labels, ids)
            aux_rows = balanced_draw(dummy, c.aux_size, ("scan", int(seed), "aux"),
                                     num_classes=int(labels.max()) + 1 if n else 1)
            aux_feats, aux_labels = feats[aux_rows], labels[aux_rows]
        # local data: inspected (+ trusted aux), with an "is aux" flag per row
        all_feats = torch.cat([feats, aux_feats]) if trusted else feats
        all_labels = torch.cat([labels, aux_labels]) if trusted else labels
        is_aux = torch.zeros(len(all_feats), dtype=torch.bool)
        if trusted:
            is_aux[n:] = True
        else:
            is_aux[aux_rows] = True
        # PCA (fit on everything the analysis sees) when the feature is large
        if c.max_dim and all_feats.shape[1] > c.max_dim and len(all_feats) > 1:
            centre = all_feats.mean(0, keepdim=True)
            _, _, vh = torch.linalg.svd(all_feats - centre, full_matrices=False)
            proj = vh[: c.max_dim].T
            all_feats = (all_feats - centre) @ proj
            aux_feats = (aux_feats - centre) @ proj
        su, se = self.global_model(aux_feats, aux_labels)
        f = _pinv(se)
        x = all_feats - all_feats.mean(0, keepdim=True)
        classes = torch.unique(labels).tolist()
        stats = {}
        groups = {}
        for cls in classes:
            rows = torch.nonzero(all_labels == cls).flatten()
            # random start keyed by id; trusted aux rows get keys from a separate stream
            init = torch.empty(len(rows))
            insp = rows < n
            init[insp] = id_uniform(("scan", int(seed), "split", int(cls)), ids[rows[insp]], 1)[:, 0]
            if trusted and bool((~insp).any()):
                aux_pos = rows[~insp] - n
                init[~insp] = id_uniform(("scan", int(seed), "split-aux", int(cls)), aux_pos, 1)[:, 0]
            g1, u1, u2 = self.find_split(x[rows], f, init)
            stats[cls] = float(self.statistic(x[rows], su, se, f, g1, u1, u2, mu_from=c.statistic))
            groups[cls] = (rows, g1)
        stat_vec = torch.tensor([stats[k] for k in classes], dtype=torch.float64)
        j = anomaly_index(stat_vec) if len(classes) > 1 else torch.zeros(len(classes), dtype=torch.float64)
        if c.upper_only:
            j = torch.where(stat_vec >= stat_vec.median(), j, torch.zeros_like(j))
        scores = torch.zeros(n, dtype=torch.float64)
        flagged = torch.zeros(n, dtype=torch.bool)
        for i, cls in enumerate(classes):
            rows, g1 = groups[cls]
            aux_in_1 = int((is_aux[rows] & g1).sum())
            aux_in_0 = int((is_aux[rows] & ~g1).sum())
            if aux_in_1 != aux_in_0:
                cand = g1 if aux_in_1 < aux_in_0 else ~g1
            else:  # tie: the smaller group (the reference takes group 1)
                cand = g1 if int(g1.sum()) <= int((~g1).sum()) else ~g1
            insp = rows < n
            member_rows = rows[cand & insp]
            is_flagged = bool(j[i] > c.threshold)
            if is_flagged:
                flagged[member_rows] = True
            if c.score_mode == "graded":
                scores[member_rows] = j[i]
            elif is_flagged:
                scores[member_rows] = 1.0
        return {"scores": scores, "flagged": flagged, "classes": classes, "j_star": j.tolist(),
                "statistic": stat_vec.tolist(), "aux_rows": aux_rows}

    def score(self, model, data, ctx, *, aux=None):
        from bdframe.scoring import features

        # float64 features: the anomaly index divides by the spread of a handful of per-class
        # statistics, which multiplies float32 rounding (batch-size dependent) by up to J* itself
        feats = features(model, data, ctx, "scan", float64=True)
        aux_feats = aux_labels = None
        if aux is not None:
            aux_feats = features(model, aux, ctx, "scan aux", float64=True)
            aux_labels = aux.labels
        return self.analyse(feats, data.labels, data.ids, ctx.seed, aux_feats=aux_feats,
                            aux_labels=aux_labels)["scores"]

    def flag(self, scores, data=None):
        if self.config.score_mode == "graded":
            return scores > self.config.threshold
        return scores >= 0.5


def torch_where_rows(mask, a, b):
    """Row-wise choice between two vectors: ``a`` where ``mask`` else ``b`` -> (n, M)."""
    return mask[:, None].to(a.dtype) * a[None, :] + (~mask)[:, None].to(a.dtype) * b[None, :]


@hookimpl
def bdframe_register_scorers(registry):
    registry.add(Scan)
