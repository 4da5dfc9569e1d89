"""``meca``: MeCa (Mellivora Capensis), backdoor defense by iterative backdoor enhancement,
detection and clean training from scratch (Pu et al. 2024; see docs/meca.md).

Pipeline, every piece taken from the registry through the defense context. The paper's pipeline
is every step below with ``PAPER_SETTINGS``; bdframe's defaults differ where CIFAR-10 measurements
showed the paper's choices cost accuracy (docs/meca.md): no enhancement (``iterations = 0``),
label-aware detection on the warm-up model (``class_stat = "gap-separation-floor"``, one class,
its feature clusters, ``split_side = "auto-moved"``), a clean training that unlearns the
far core of the flagged group (``clean_unlearn = 2``, ``clean_unlearn_core``, ``core_side =
"far"``), and the clean model's second look at the picked class (``recheck_below = 0.5``)
followed by a short relabel-and-relearn.

1. **Warm-up** (reconstructed): the ``standard`` stage on all of D for ``warmup_epochs`` (10) epochs, so
   the backdoor is learned. Option: ``warmup_model``, a model already trained on D (the
   ``model.pt`` of a plain run), is loaded instead, so a user who has trained the model once does
   not pay for a second training of it.
2. **Backdoor enhancement** (Algorithms 1 and 2), for k = 1..K (``iterations``; the paper's 10,
   reconstructed; bdframe's default 0):
   score D with the ``adv-kl`` scorer (``iteration = k``: fresh masks each iteration), take
   ``D_c`` = the ``ceil(alpha_k N)`` least consistent samples (highest KL), with
   ``alpha_k = min(alpha_step * k, alpha_max)`` (0.05 k, capped at 0.5; reconstructed), and train one epoch
   of the ``mixed`` stage learning ``D_u`` = D \\ D_c and unlearning ``D_c`` (Eq. 11, lambda =
   0.05; SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 128, constant lr: reconstructed). D_c is
   recomputed every iteration, never accumulated. Option (bdframe's, off by default):
   ``protect_confident`` keeps samples the current model fits above that probability out of D_c.
   With ``iterations = 0`` there is no enhancement and detection reads the warm-up model.
3. **Detection**: the enhanced model in eval mode without augmentation; the paper's
   rule (``detection = "argmax"``), ``argmax != label`` -> clean, otherwise poisoned (the enhanced-model score ``p_e(y|x)``
   is saved too). Options: the confidence rule (a threshold on ``logit(p_e)`` chosen from the
   data) and the label-aware rule (inside the classes whose high-confidence share is a Grubbs
   outlier, in the enhanced model or, with ``class_test``, in the warm-up model as well
   (``"both"``) or instead (``"warmup"``): Otsu's split, the samples fitted more
   confidently than a typical sample of the other classes, or, with ``inside = "clusters"``, the
   activation-clustering split of the class's warm-up features with the more confidently fitted
   cluster flagged, or with ``split_side`` the cluster whose runner-up classes vary more, when
   they vary much more), neither needing a poison rate.
   With ``class_stat = "spread"`` a class is picked instead when the upper tail of its samples'
   margins lies far from their median compared with the other classes (a confidently fitted
   group inside the class, whatever the class's difficulty); with ``class_stat = "gap"`` when
   the two groups its warm-up features split into (the split of ``inside = "clusters"``) are
   fitted far more unequally than the groups of the other classes (the relabelled images that
   carry the trigger against the class's own); with ``class_stat = "gap-separation"`` also when
   those two groups lie much further apart in feature space, for their spread, than other
   classes' (a clean-label attack's triggered images against the class's own, both fitted well);
   with ``class_stat = "gap-separation-floor"`` also when far more of its samples than of
   other classes' have runner-up classes spread evenly over every other class (relabelled images
   drawn from all classes, which the model still half-recognises: a warp or a blend it fits no
   more confidently than the class itself).
4. **Clean training**: a fresh model (``ctx.new_model()``) trained from scratch on the detected
   clean set with the recipe's ``[train]`` stage (the paper's). Option (bdframe's, on by default):
   ``clean_unlearn`` trains it with the ``mixed`` stage instead, unlearning the detected
   poisoned set (bounded ascent) so that poison detection missed does not reinstall the backdoor.
   Option (bdframe's): ``clean_stage = "semi"`` trains it by semi-supervised learning instead,
   the ``mixmatch`` stage with the kept set as labelled and the flagged set as *unlabelled* data
   (its labels unused), so the images detection discards still teach the clean model, and the
   poisoned ones among them carry no label that could teach the trigger.
   Option (bdframe's): ``clean_stage = "repair"`` makes no new model: the warm-up model, which
   has learned all of D, is repaired by alternating passes as in DBR's backdoor removal, with
   the enhanced model's ``p_e(y|x)`` in the place of DBR's sensitivity score. The flagged samples
   it fits most confidently (``repair_poison``, 5% of D) are unlearned by gradient ascent, each
   class's samples it fits least (``repair_clean``, 20% of the class) are relearned, one pass of
   each per round at a small fixed learning rate, until the fit of the unlearned set levels off.
   The model keeps what it learned from all of D instead of being retrained on the kept set.
   ``repair_model`` repairs another model trained on D (a plain run's ``model.pt``) instead of
   the warm-up model: detection reads MeCa's own warm-up, the repair acts on the deployed model.
5. **Relabel and relearn** (optional, ``relearn = true``; off in the paper's main tables):
   detected poisoned samples get the clean model's argmax as label (Eq. 12) and the clean model
   is fine-tuned on the merged set with the ``relearn`` stage (20 epochs, lr 0.01, reconstructed).
   Option (bdframe's, on by default): ``recheck_below``, the clean model's second look. Where
   the label-aware rule picked a class, the kept samples of that class to which the clean model
   gives their label a probability below the cut (0.5) are flagged too: the poison the split
   inside the class left there, which the clean model, having never learned the trigger, calls
   by the class it was drawn from; with ``recheck_moved = true`` (the default) only those it does
   call by another class, so a hard image of the class it merely doubts stays a kept sample.
   ``recheck_cut = "class"`` lowers the cut for a class the
   clean model fits less well than the others, in proportion to the class's median fit, so a hard
   class's clean images are not flagged for being hard. The enlarged flagged set is then
   relabelled and relearned as above, for ``recheck_epochs`` (3) unless ``relearn = true`` sets
   ``relearn_epochs``. With ``recheck_rounds`` above 1 the look and the relearning repeat: each
   later round looks at the picked class's samples still kept with the model the round before
   relearned (it has relearned the flagged poison under its own classes, so more of the poison
   left in the class now looks like the class it was drawn from), relabels everything flagged
   so far with that model and fine-tunes it again.
   No class picked: no second look and, without ``relearn``, no relearning.
   Options (bdframe's, on by default): ``relearn_settings = "train"`` fine-tunes with the
   recipe's ``[train]`` batch size, optimiser, momentum, weight decay, label smoothing and
   augmentation, those the clean model was trained with (``"meca"``: MeCa's own stages'
   settings); ``relearn_balance`` weighs every class the same in the relearning's loss, since
   detection and the second look leave the picked class with fewer samples than the others.

Precision: ``amp`` sets steps 1, 2 and 5 (training and consistency scoring) to bfloat16 autocast
or float32; ``"auto"`` takes the recipe's ``[train]`` setting. Detection is always float32 and
step 4 is the recipe's ``[train]``.

The defense sees only the untrusted ImageSet (images, labels, ids): no poison ids, poison
ratio, trigger or target class. Ground truth is used only by the runner, after the defense.

Resume: each stage has its own ``ctx.stage(name)`` (per-epoch resume inside a stage) and each
finished step its own ``ctx.checkpoint(name)`` (warm-up model, enhanced model after each
iteration with the iteration records, detected split, clean model, relearned model); on resume
finished steps are loaded instead of redone and their history records are replayed.

Files written to the run directory: ``meca_trend.png`` (ACC/ASR of the model after warm-up and
after each iteration, drawn with matplotlib, the core's ``plots`` extra; without it the picture is
skipped and ``defense_metrics.plot`` is null), ``meca_scores.pt`` (ids, per-iteration consistency scores and forget
sets, enhanced-model probabilities, detected flags, and with ``class_test`` ``"both"`` or
``"warmup"`` the warm-up model's probabilities and margins; for offline ROC analysis), and with
``save_models``: ``meca_warmup_model.pt``, ``meca_enhanced_model.pt`` and ``meca_clean_model.pt``
(before relearning), as state dicts.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any

import attrs

from bdframe import hookimpl, steps
from bdframe.config import in_range, one_of
from bdframe.interfaces import Defense, DefenseResult

# which of a picked class's two feature groups is flagged (split_side), and auto's cut in nats
SPLIT_SIDES = ("confident", "runner-up", "auto", "auto-floor", "auto-moved")
CLASS_STATS = ("share", "spread", "gap", "gap-separation", "gap-separation-floor")
SPLIT_SIDE_CUT = 0.8
# split_side = "auto-floor": the difference of the two groups' runner-up floors (shares of the
# group) above which the group with the higher floor is flagged
SPLIT_FLOOR_CUT = 0.2
# split_side = "auto-moved": a group more than this share of which the model calls by another
# class than the label (the other group at most this share) is flagged before auto-floor decides
SPLIT_MOVED_SHARE = 0.5


# The paper's pipeline as options of this defense: where bdframe's defaults differ from it, the
# paper's values (docs/meca.md, "The paper's pipeline"; examples/meca-paper-quickstart.toml).
PAPER_SETTINGS = {"iterations": 10, "detection": "argmax", "class_test": "enhanced", "class_stat": "share",
                  "spread_max_classes": 0, "inside": "otsu", "split_side": "confident", "clean_unlearn": 0.0,
                  "clean_unlearn_core": False, "core_side": "confident", "recheck_below": 0.0,
                  "relabel": "all", "relearn_settings": "meca", "relearn_balance": False}


@attrs.frozen
class MeCaConfig:
    # -- warm-up ---------------------------------------------------------------------------------
    warmup_epochs: int = attrs.field(default=10, validator=in_range(0, None), metadata={
        "help": "[R] epochs of standard training on all of D before the enhancement"})
    warmup_lr: float = attrs.field(default=0.1, validator=in_range(0, None, lo_open=True), metadata={
        "help": "[R] warm-up learning rate (SGD, cosine schedule over the warm-up)"})
    warmup_model: str = attrs.field(default="", metadata={
        "help": "model.pt of a model already trained on the same data (e.g. a plain run of the same recipe; it "
                "must fit [model]) to start the enhancement from instead of training the warm-up; "
                "warmup_epochs and warmup_lr are then unused. Empty: train the warm-up"})
    # -- enhancement (Algorithm 2) ---------------------------------------------------------------
    iterations: int = attrs.field(default=0, validator=in_range(0, None), metadata={
        "help": "[R] K, number of score/partition/mixed-step iterations (the paper's pipeline: 10); 0: no "
                "enhancement, detection reads the warm-up model (bdframe's default: on CIFAR-10 five iterations gave "
                "the same detection at more time, and at 10,000 images weakened a blended backdoor)"})
    alpha_step: float = attrs.field(default=0.05, validator=in_range(0, 1, lo_open=True), metadata={
        "help": "[R] partition rate growth: alpha_k = min(alpha_step * k, alpha_max)"})
    alpha_max: float = attrs.field(default=0.5, validator=in_range(0, 1, lo_open=True), metadata={
        "help": "[R] cap of the partition rate (more than half of D is assumed clean)"})
    lam: float = attrs.field(default=0.05, validator=in_range(0, None), metadata={
        "help": "[S] lambda, weight of the unlearning term of the mixed step (Eq. 11)"})
    unlearn_norm: str = attrs.field(default="subset", validator=one_of("subset", "batch"), metadata={
        "help": "[R] mixed step normalisation: subset (mean per subset, as in MeCa's objective) or batch (per-sample weights)"})
    unlearn_ceiling: float = attrs.field(default=0.0, validator=in_range(0, None), metadata={
        "help": "[R] cap on each unlearned sample's CE in the mixed step (no gradient above it); 0: unbounded"})
    protect_confident: float = attrs.field(default=0.0, validator=in_range(0, 1, hi_open=True), metadata={
        "help": "samples the current model fits with p(y|x) above this are never put in the unlearned set D_c "
                "(so a backdoor the model has learned is not unlearned whatever its consistency score); "
                "0: off, the paper's partition"})
    forget_skip: float = attrs.field(default=0.0, validator=in_range(0, 0.5, hi_open=True), metadata={
        "help": "share of D whose least consistent samples are passed over before D_c starts (they stay in the "
                "learned set): a full-image blended trigger makes poisoned samples the least consistent, the "
                "opposite of a patch; 0: off, the paper's partition"})
    epochs_per_iteration: int = attrs.field(default=1, validator=in_range(1, None), metadata={
        "help": "[R] mixed-step epochs per iteration"})
    enhance_lr: float = attrs.field(default=0.01, validator=in_range(0, None, lo_open=True), metadata={
        "help": "[R] learning rate of the mixed step"})
    enhance_schedule: str = attrs.field(
        default="constant", validator=one_of("cosine", "multistep", "linear", "onecycle", "constant"),
        metadata={"help": "[R] lr schedule within each iteration's mixed step"})
    momentum: float = attrs.field(default=0.9, validator=in_range(0, 1, hi_open=True), metadata={
        "help": "[R] SGD momentum of MeCa's own stages (warm-up, mixed step, relearning)"})
    weight_decay: float = attrs.field(default=5e-4, validator=in_range(0, None), metadata={
        "help": "[R] weight decay of MeCa's own stages"})
    batch_size: int = attrs.field(default=128, validator=in_range(1, None), metadata={
        "help": "[R] batch size of MeCa's own stages"})
    augment: bool = attrs.field(default=True, metadata={
        "help": "[R] crop(4)+flip augmentation in MeCa's own training stages (scoring never augments)"})
    amp: str = attrs.field(default="auto", validator=one_of("auto", "on", "off"), metadata={
        "help": "precision of MeCa's own stages (warm-up, the enhancement's mixed steps and consistency scoring, "
                "relearning): auto follows the recipe's [train] amp; on: bfloat16 autocast (on a CPU fast only "
                "where it computes bfloat16 natively); off: float32. Detection always runs in float32 and the "
                "clean model is trained by the recipe's [train] stage"})
    # -- consistency scorer (Algorithm 1, Eq. 3) --------------------------------------------------
    epsilon: float = attrs.field(default=8 / 255, validator=in_range(0, 1), metadata={
        "help": "[R] L-inf bound of the single-step perturbation, [0,1] pixel units"})
    patch_size: int = attrs.field(default=2, validator=in_range(1, None), metadata={
        "help": "[S] mask patch size"})
    mask_mode: str = attrs.field(default="grid", validator=one_of("grid", "single"), metadata={
        "help": "[R] grid: random cells with keep_prob; single: one random patch"})
    keep_prob: float = attrs.field(default=0.5, validator=in_range(0, 1), metadata={
        "help": "[R] grid mask: probability that a cell is perturbed"})
    grad_loss: str = attrs.field(default="ce_label", validator=one_of("ce_label", "ce_pred", "kl_random_start"),
                                 metadata={"help": "[R] loss whose input-gradient sign gives the perturbation"})
    score_batch_size: int = attrs.field(default=256, validator=in_range(1, None), metadata={
        "help": "batch size of scoring and detection passes"})
    # -- detection ------------------------------------------------------------------------------
    detection: str = attrs.field(default="label-aware", validator=one_of("argmax", "confidence", "label-aware"), metadata={
        "help": "argmax: the paper's rule (argmax of the enhanced model = label -> poisoned; it flags most clean "
                "samples too at CPU scale); confidence: "
                "logit(p_e(y|x)) above a threshold chosen from the data; label-aware (the default): flag inside the "
                "class that stands out in class_stat (split as inside says), else the confidence rule"})
    threshold: str = attrs.field(default="mad", validator=one_of("mad", "otsu"), metadata={
        "help": "confidence rule (and label-aware when no class stands out): mad (logit(p_e) above median + "
                "outlier_k robust SDs) or otsu (Otsu's split of logit(p_e))"})
    outlier_k: float = attrs.field(default=3.0, validator=in_range(0, None, lo_open=True), metadata={
        "help": "threshold = mad: how many robust standard deviations above the median a flagged sample lies"})
    confidence_high: float = attrs.field(default=0.99, validator=in_range(0, 1, lo_open=True, hi_open=True),
                                         metadata={"help": "label-aware: p_e above this counts as fitted with high confidence"})
    class_alpha: float = attrs.field(default=0.05, validator=in_range(0, 1, lo_open=True, hi_open=True), metadata={
        "help": "label-aware: significance of the one-sided Grubbs outlier test (applied sequentially) on the "
                "classes' high-confidence shares"})
    class_test: str = attrs.field(default="warmup", validator=one_of("enhanced", "both", "warmup"), metadata={
        "help": "label-aware: which models' statistic must single a class out: enhanced (the "
                "enhanced model's), both (the warm-up model's too: a class the enhancement merely leaves "
                "easy is not picked) or warmup (the warm-up model's alone, the default; the split inside the "
                "class uses the enhanced model either way). The paper's pipeline has no class test"})
    class_stat: str = attrs.field(default="gap-separation-floor", validator=one_of(*CLASS_STATS),
                                  metadata={
        "help": "label-aware: the statistic a class must stand out in: share (its share of samples fitted "
                "above confidence_high; Grubbs's test at class_alpha), spread (how far the spread_quantile of "
                "its samples' margins lies above their median, a robust z-score above spread_k: reads a "
                "confidently fitted group inside a class, not how easy the class is) or gap (2-means on the "
                "warm-up model's features of the class, as inside = clusters splits it; how far apart the two "
                "groups' mean margins lie, a robust z-score above spread_k) or gap-separation (the gap, or the "
                "separation of the same two groups in feature space, whichever z-score is larger: also picks the "
                "target class of a clean-label attack, whose two groups are both fitted well) or gap-separation-floor "
                "(also the runner-up floor: the share of the class whose most likely other classes are spread "
                "over every other class, as relabelled images drawn from all classes are; sees a warp or a "
                "blend the model fits no more confidently than the class; the default)"})
    spread_quantile: float = attrs.field(default=0.9, validator=in_range(0.5, 1, lo_open=True, hi_open=True),
                                         metadata={"help": "label-aware, class_stat = spread: the upper quantile of "
                                                           "a class's margins compared with their median"})
    spread_k: float = attrs.field(default=3.0, validator=in_range(0, None, lo_open=True), metadata={
        "help": "label-aware, class_stat other than share: a class is picked when its statistic lies more than "
                "this many robust standard deviations (1.4826 MAD of the classes' values, at least a tenth of "
                "their median; for the runner-up floor at least 0.05) above the median of the classes. 3, the "
                "default, allows for the many z-scores compared (one per class and statistic): at 2 a clean "
                "class of clean data stood out by chance on 5 of 12 seeds of the synthetic quickstart data. "
                "With many more classes than CIFAR-10's ten, consider a higher cut"})
    spread_max_classes: int = attrs.field(default=1, validator=in_range(0, None), metadata={
        "help": "label-aware, class_stat other than share: pick at most this many classes, those with the largest "
                "z-scores (1, the default, suits an all-to-one attack, which has one target class); 0: every class "
                "above spread_k"})
    inside: str = attrs.field(default="clusters", validator=one_of("otsu", "reference", "clusters"), metadata={
        "help": "label-aware: how a class that stands out is split: otsu (Otsu's split of the class's "
                "logit(p_e)), reference (flag its samples fitted more confidently than the "
                "reference_quantile of the samples of the classes that do not stand out) or clusters (2-means "
                "on the warm-up model's penultimate features of the class, PCA-reduced to cluster_components "
                "dimensions; the default: which of the two clusters is flagged is split_side's choice)"})
    split_side: str = attrs.field(default="auto-moved", validator=one_of(*SPLIT_SIDES), metadata={
        "help": "label-aware, inside = clusters: which of a picked class's two feature groups is flagged: "
                "confident (the one the enhanced model fits more confidently: a trigger learned more easily than "
                "the class), runner-up (the one whose most likely other classes vary more: relabelled images "
                "come from many classes), auto (runner-up where the two groups' runner-up entropies differ by "
                "more than split_side_cut nats, else confident), auto-floor (the group with the higher "
                "runner-up floor, the share of it whose most likely other classes are spread over every other "
                "class, where the two groups' floors differ by more than 0.2; else as auto) or auto-moved (the "
                "group more than half of which the model calls by another class, where the other group's share "
                "is at most half: relabelled images whose trigger is not learned; else as auto-floor; the "
                "default)"})
    split_side_cut: float = attrs.field(default=SPLIT_SIDE_CUT, validator=in_range(0, None), metadata={
        "help": "split_side = auto, auto-floor or auto-moved: the difference of runner-up entropies (nats) above which the runner-up "
                "rule decides"})
    cluster_components: int = attrs.field(default=10, validator=in_range(1, None), metadata={
        "help": "label-aware, inside = clusters or class_stat = gap, gap-separation or gap-separation-floor: principal components of the class's "
                "features kept before 2-means"})
    reference_quantile: float = attrs.field(default=0.5, validator=in_range(0, 1, lo_open=True, hi_open=True),
                                            metadata={"help": "label-aware, inside = reference: the quantile of "
                                                              "the ordinary classes' logit(p_e) above which a "
                                                              "sample of a class that stands out is flagged"})
    # -- clean training ---------------------------------------------------------------------------
    clean_unlearn: float = attrs.field(default=2.0, validator=in_range(0, None), metadata={
        "help": "weight of an unlearning term on the detected poisoned set during clean training: the clean "
                "model learns the kept set and unlearns the flagged one (the mixed stage, per-sample weights: "
                "a flagged sample weighs clean_unlearn times a kept one), so poisoned samples that detection "
                "missed do not reinstall the backdoor (default 2; used with clean_stage = train only); 0: the paper's "
                "clean training on the kept set alone"})
    clean_unlearn_below: float = attrs.field(default=0.1, validator=in_range(0, 1, lo_open=True, hi_open=True),
                                             metadata={"help": "clean_unlearn > 0: a flagged sample is unlearned "
                                                               "only while the model gives its label a "
                                                               "probability above this (bounded ascent)"})
    clean_unlearn_core: bool = attrs.field(default=True, metadata={
        "help": "clean_unlearn > 0 with inside = clusters: unlearn only the core of each picked class's flagged "
                "group, the half of it that a second 2-means split of the group's features finds the enhanced "
                "model fits more confidently; the rest of the group is left out of the clean training (neither "
                "learned nor unlearned), since unlearning a clean sample of the class costs far more accuracy "
                "than leaving it out; the suspected set reported is still the whole flagged set (default true; "
                "false: the paper's clean training, with clean_unlearn = 0)"})
    core_side: str = attrs.field(default="far", validator=one_of("confident", "far"), metadata={
        "help": "clean_unlearn_core: which half of the flagged group is its core: confident (the half the "
                "enhanced model fits more confidently) or far (the half lying farther from the rest of the class: "
                "fewer unflagged samples of the class among each sample's 20 nearest neighbours in the warm-up "
                "model's features; the clean samples swept into the group border the rest of the class however "
                "confidently they are fitted; the default)"})
    clean_stage: str = attrs.field(default="train", validator=one_of("train", "semi", "repair"), metadata={
        "help": "how the clean model is made: train (trained from scratch by the recipe's [train] stage on the "
                "kept set alone, the paper's), semi (from scratch by the mixmatch stage: the kept set labelled, the "
                "flagged set as unlabelled data whose labels are not used, so the images detection discards still "
                "teach it) or repair (no new model: the warm-up model, trained on all the data, is repaired by "
                "alternating an unlearning pass over the flagged samples the enhanced model fits most confidently "
                "with a learning pass over each class's samples it fits least; see the repair_* settings)"})
    repair_poison: float = attrs.field(default=0.05, validator=in_range(0, 1, lo_open=True, hi_open=True), metadata={
        "help": "clean_stage = repair: at most this share of D is unlearned, the flagged samples with the highest "
                "p_e(y|x) (all flagged samples when fewer)"})
    repair_clean: float = attrs.field(default=0.2, validator=in_range(0, 1, lo_open=True, hi_open=True), metadata={
        "help": "clean_stage = repair: the share of each class that is relearned, its samples with the lowest "
                "p_e(y|x) (the least likely to carry a backdoor the enhancement has strengthened)"})
    repair_model: str = attrs.field(default="", metadata={
        "help": "clean_stage = repair: model.pt of a model trained on the same data (e.g. a plain run of the same "
                "recipe; it must fit [model]) to repair instead of the warm-up model, so that detection can come "
                "from MeCa's own shorter warm-up while the model repaired is the fully trained one. Empty: repair "
                "the warm-up model"})
    repair_rounds: int = attrs.field(default=60, validator=in_range(0, None), metadata={
        "help": "clean_stage = repair: the most rounds (one unlearning pass, one learning pass each)"})
    repair_lr: float = attrs.field(default=5e-4, validator=in_range(0, None, lo_open=True), metadata={
        "help": "clean_stage = repair: learning rate of both passes (SGD, momentum 0.9, weight decay 5e-4, constant)"})
    repair_plateau_rounds: int = attrs.field(default=5, validator=in_range(0, None), metadata={
        "help": "clean_stage = repair: stop once the model's accuracy on the unlearned set has levelled off over "
                "this many rounds (its lowest value moved by less than 5% of its whole fall); 0: all rounds"})
    repair_plateau_fall: float = attrs.field(default=0.05, validator=in_range(0, 1, hi_open=True), metadata={
        "help": "clean_stage = repair: the least fall of that accuracy (0.05: five points) before the repair may "
                "stop; a smaller dip is taken for noise"})
    evaluate_each_round: bool = attrs.field(default=False, metadata={
        "help": "clean_stage = repair: clean ACC and ASR after every round (reporting only; one test pass per round)"})
    semi: dict[str, Any] = attrs.field(factory=dict, metadata={
        "help": "clean_stage = semi: parameters of the mixmatch stage, a table (e.g. {epochs = 60}; an epoch "
                "is one pass over the kept set); the stage's own defaults otherwise"})
    # -- relabel and relearn ------------------------------------------------------------------
    relearn: bool = attrs.field(default=False, metadata={
        "help": "[S, optional] relabel detected poisoned samples with the clean model and fine-tune on all"})
    relearn_epochs: int = attrs.field(default=20, validator=in_range(0, None), metadata={
        "help": "[R] relearning epochs"})
    relearn_lr: float = attrs.field(default=0.01, validator=in_range(0, None, lo_open=True), metadata={
        "help": "[R] relearning learning rate (cosine schedule)"})
    # -- second look by the clean model --------------------------------------------------------
    recheck_below: float = attrs.field(default=0.5, validator=in_range(0, 1, hi_open=True), metadata={
        "help": "clean_stage = train, label-aware detection: after the clean training, the kept samples of each "
                "picked class to which the clean model gives their label a probability below this are flagged "
                "too, and the whole flagged set is relabelled with the clean model's prediction and relearned "
                "(recheck_epochs; relearn_epochs with relearn = true); 0: no second look"})
    recheck_moved: bool = attrs.field(default=True, metadata={
        "help": "true: the second look flags only the samples below the cut that the clean model calls by another "
                "class (another class more likely than the label), a doubted image it still calls by its label "
                "stays a kept sample; false: every sample below the cut"})
    recheck_cut: str = attrs.field(default="fixed", validator=one_of("fixed", "class"), metadata={
        "help": "the second look's cut: fixed: recheck_below for every picked class; class: recheck_below scaled "
                "down for a class the clean model fits less well than the others (times the class's median "
                "p(label) over the other classes' median, at most 1), so a hard class's clean images are not "
                "flagged for being hard"})
    relabel: str = attrs.field(default="changed", validator=one_of("all", "changed"), metadata={
        "help": "relabel-and-relearn: changed: only the flagged samples whose label the clean model changes are "
                "relearned, with its label, the rest left out (a suspect it still calls by its given label may "
                "carry a trigger it has partly learned); all: every flagged sample, relabelled (the paper's)"})
    relearn_settings: str = attrs.field(default="train", validator=one_of("train", "meca"), metadata={
        "help": "the relearning's batch size, optimiser, momentum, weight decay, label smoothing, crop and flip: "
                "train: the recipe's [train] stage's, those the clean model was trained with (the epochs, "
                "relearn_lr and a cosine schedule stay the relearning's); meca: MeCa's own stages' (batch_size, "
                "momentum, weight_decay, augment)"})
    relearn_balance: bool = attrs.field(default=True, metadata={
        "help": "relabel-and-relearn weighs every class the same (the relearn stage's class_balance): detection "
                "and the second look leave the picked class with fewer samples than the others, and an "
                "unweighted relearning teaches the model that class is rarer; false: every sample the same"})
    recheck_epochs: int = attrs.field(default=3, validator=in_range(1, None), metadata={
        "help": "recheck_below > 0 and relearn = false: epochs of the relabel-and-relearn after the second look "
                "(the relearn stage at relearn_lr)"})
    recheck_rounds: int = attrs.field(default=1, validator=in_range(1, None), metadata={
        "help": "recheck_below > 0: rounds of the second look and relabel-and-relearn; each round after the "
                "first looks at the picked class's samples still kept with the model the round before "
                "relearned, relabels everything flagged so far with it and fine-tunes it again"})
    # -- reporting ---------------------------------------------------------------------------
    evaluate_iterations: bool = attrs.field(default=True, metadata={
        "help": "evaluate clean ACC and ASR after every enhancement iteration (the trend); false: only the "
                "warm-up and the final enhanced model (saves about a fifth of the enhancement's time)"})
    evaluate_each_epoch: bool = attrs.field(default=True, metadata={
        "help": "log clean ACC and ASR after every epoch of warm-up, clean training and relearning"})
    save_models: bool = attrs.field(default=True, metadata={
        "help": "save the warm-up, enhanced and clean (before relearning) models in the run directory"})


# -------------------------------------------------------------------------------------------------
# Algorithm 1 helpers (pure functions, unit-tested)
# -------------------------------------------------------------------------------------------------

def alpha_at(k: int, step: float, cap: float) -> float:
    """Partition rate of iteration k (1-based): ``min(step * k, cap)``."""
    return min(step * k, cap)


def forget_count(alpha: float, n: int) -> int:
    """``ceil(alpha * n)`` (robust to float noise such as 0.05 * 3 = 0.15000000000000002)."""
    return min(n, max(0, math.ceil(alpha * n * (1 - 1e-12))))


def partition(scores, ids, alpha: float, eligible=None, skip: float = 0.0):
    """Algorithm 1's split: ``(forget_pos, learn_pos)`` row positions, each sorted.

    ``scores`` are consistency scores (higher = more consistent = more likely poisoned, i.e.
    ``-KL``); D_c (forget) is the ``ceil(alpha N)`` rows with the *lowest* scores (highest KL),
    ties broken by id so the split depends on the samples, not on the row order. Two options
    that are not the paper's: ``eligible`` (a bool mask) restricts D_c to those rows, and
    ``skip`` passes over the ``ceil(skip N)`` least consistent eligible rows before D_c starts.
    Rows not in D_c are in the learned set; D_c is smaller when too few rows are left.
    """
    import torch

    scores = torch.as_tensor(scores, dtype=torch.float64).cpu()
    ids = torch.as_tensor(ids, dtype=torch.int64).cpu()
    if scores.shape != ids.shape:
        raise ValueError("scores and ids must have the same length")
    if not bool(torch.isfinite(scores).all()):
        raise FloatingPointError("consistency scores contain nan or inf")
    n = len(scores)
    k = forget_count(alpha, n)
    by_id = torch.argsort(ids, stable=True)
    order = by_id[torch.argsort(scores[by_id], stable=True)]
    if eligible is not None:
        eligible = torch.as_tensor(eligible, dtype=torch.bool).cpu()
        if eligible.shape != scores.shape:
            raise ValueError("eligible must have one flag per score")
        order = order[eligible[order]]
    start = forget_count(skip, n) if skip > 0 else 0
    forget = order[start:start + k]
    learn = torch.ones(n, dtype=torch.bool)
    learn[forget] = False
    return torch.sort(forget).values, torch.nonzero(learn).flatten()


def repair_split(prob, labels, ids, flagged, *, poison_share: float, clean_share: float):
    """The two sets of the repair (``clean_stage = "repair"``): ``(forget_pos, learn_pos)`` row
    positions, each sorted and disjoint. ``forget``: the ``ceil(poison_share N)`` flagged rows the
    enhanced model fits most confidently (highest ``p_e(y|x)``; all flagged rows when fewer): the
    enhancement strengthens the backdoor, so the poison sits at the top. ``learn``: in every class
    (given label), the ``ceil(clean_share n_c)`` rows of the class outside ``forget`` with the
    lowest ``p_e``, so the relearned set covers the classes as the data does. Ties are broken by
    id, so the split depends on the samples, not on the row order."""
    import torch

    prob = torch.as_tensor(prob, dtype=torch.float64).cpu()
    labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
    ids = torch.as_tensor(ids, dtype=torch.int64).cpu()
    flagged = torch.as_tensor(flagged, dtype=torch.bool).cpu()
    if not (prob.shape == labels.shape == ids.shape == flagged.shape):
        raise ValueError("prob, labels, ids and flagged must have one entry per sample")
    if not bool(torch.isfinite(prob).all()):
        raise FloatingPointError("p_e contains nan or inf")
    n = len(prob)
    by_id = torch.argsort(ids, stable=True)
    ascending = by_id[torch.argsort(prob[by_id], stable=True)]  # lowest p_e first, ties by id
    descending = by_id[torch.argsort(-prob[by_id], stable=True)]  # highest first, ties by id
    forget = descending[flagged[descending]][:forget_count(poison_share, n)]
    out = torch.zeros(n, dtype=torch.bool)
    out[forget] = True
    learn = []
    for c in torch.unique(labels).tolist():
        in_class = ascending[(labels[ascending] == c) & ~out[ascending]]
        learn.append(in_class[:forget_count(clean_share, int((labels == c).sum()))])
    learn = torch.cat(learn) if learn else torch.empty(0, dtype=torch.int64)
    return torch.sort(forget).values, torch.sort(learn).values


def detect(logits, labels):
    """Detection rule: ``argmax != label`` -> clean (False), otherwise poisoned (True); and the
    enhanced-model score ``p_e(y|x)`` in [0,1]."""
    import torch

    logits = logits.float()
    poisoned = logits.argmax(1) == labels
    prob = torch.softmax(logits, 1).gather(1, labels.view(-1, 1)).squeeze(1)
    return poisoned, prob


def otsu_threshold(values) -> float | None:
    """Otsu's threshold on one-dimensional values, computed exactly (no histogram bins).

    Candidate cuts lie halfway between consecutive distinct sorted values; the cut that maximises
    the between-group variance ``w0 * w1 * (mean1 - mean0)^2`` wins, the lowest on a tie. The
    result depends only on the multiset of values (not their order) and is ``None`` when there
    are fewer than two distinct values (nothing to separate).
    """
    import torch

    v = torch.sort(torch.as_tensor(values, dtype=torch.float64).flatten().cpu()).values
    n = len(v)
    if n < 2 or float(v[0]) == float(v[-1]):
        return None
    csum = torch.cumsum(v, 0)
    k = torch.arange(1, n, dtype=torch.float64)  # size of the lower group for a cut after position k-1
    distinct = v[1:] > v[:-1]
    m0 = csum[:-1] / k
    m1 = (csum[-1] - csum[:-1]) / (n - k)
    between = (k / n) * (1 - k / n) * (m1 - m0) ** 2
    between = torch.where(distinct, between, torch.full_like(between, -1.0))
    i = int(torch.argmax(between))  # first maximum
    return float((v[i] + v[i + 1]) / 2)


def confidence_scores(prob):
    """``logit(p_e(y|x))`` in float64, with p clamped to [1e-12, 1 - 1e-12] so it stays finite."""
    import torch

    p = torch.as_tensor(prob, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    return torch.log(p) - torch.log1p(-p)


def outlier_threshold(values, k: float = 3.0) -> float | None:
    """``median + k * 1.4826 * MAD``: the upper-outlier cut of a robust z-score (None when the
    MAD is 0, i.e. at least half the values are equal)."""
    import torch

    v = torch.as_tensor(values, dtype=torch.float64).flatten().cpu()
    if len(v) == 0:
        return None
    med, mad = median_mad(v)
    return None if mad <= 0 else med + k * mad


def median_mad(v) -> tuple[float, float]:
    """The median of non-empty float64 values and their MAD scaled to a normal standard
    deviation (``1.4826 * median |v - median|``)."""
    med = v.median()
    return float(med), 1.4826 * float((v - med).abs().median())


def flag_confident(prob, rows=None, *, threshold: str = "mad", k: float = 3.0):
    """The confidence rule: flag the samples whose ``logit(p_e)`` is above a threshold chosen
    from the values in ``rows`` (a bool mask; all rows by default): Otsu's split of the values
    (``"otsu"``) or their robust upper-outlier cut ``median + k * 1.4826 MAD`` (``"mad"``).
    Needs no poison rate. Returns a bool mask over all rows (False outside ``rows``; nothing
    flagged when the values cannot be split)."""
    import torch

    s = confidence_scores(prob)
    rows = torch.ones(len(s), dtype=torch.bool) if rows is None else torch.as_tensor(rows, dtype=torch.bool)
    thr = otsu_threshold(s[rows]) if threshold == "otsu" else outlier_threshold(s[rows], k)
    if thr is None:
        return torch.zeros(len(s), dtype=torch.bool)
    return rows & (s > thr)


def student_t_quantile(q: float, df: int) -> float:
    """Quantile of Student's t distribution with ``df`` degrees of freedom, for q in [0.5, 1).

    The CDF is 1/2 plus the integral of the density from 0 (composite Simpson rule on the
    substitution t = tan(theta), which maps [0, inf) to [0, pi/2) and keeps the integrand
    bounded), inverted by bisection; accurate to about 1e-9 for the q and df used here."""
    import torch

    if not 0.5 <= q < 1 or df < 1:
        raise ValueError(f"student_t_quantile needs 0.5 <= q < 1 and df >= 1 (got q={q}, df={df})")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    n_steps = 2000  # even: composite Simpson weights 1, 4, 2, 4, ..., 4, 1
    weights = torch.full((n_steps + 1,), 2.0, dtype=torch.float64)
    weights[1::2] = 4.0
    weights[0] = weights[-1] = 1.0

    def cdf(x: float) -> float:
        # density(t) dt = density(tan th) / cos^2 th d th, th from 0 to atan(x)
        th = torch.linspace(0.0, math.atan(x), n_steps + 1, dtype=torch.float64)
        t = torch.tan(th)
        f = torch.exp(log_c - (df + 1) / 2 * torch.log1p(t * t / df)) / torch.cos(th) ** 2
        return 0.5 + float((weights * f).sum()) * (math.atan(x) / n_steps) / 3

    lo, hi = 0.0, 1.0
    while cdf(hi) < q:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return (lo + hi) / 2


def upper_outliers(values, alpha: float = 0.05) -> list[int]:
    """Positions of the upper outliers among ``values`` by Grubbs's test applied sequentially,
    one-sided: the largest remaining value's deviation from the mean of the remaining values,
    in their standard deviations (``G``), is compared with Grubbs's critical value for
    significance ``alpha``; while it exceeds it, the value is an outlier and is removed and the
    test repeats on the rest; the first value that does not stand out ends the search (a
    cluster of ordinary values never makes a later value significant). At most
    ``(n - 1) // 2`` outliers (a majority is never an outlier); none when the remaining values
    are all equal. Depends only on the multiset of values (ties taken lowest position first)."""
    import torch

    v = torch.as_tensor(values, dtype=torch.float64).flatten().cpu()
    n = len(v)
    remaining = list(range(n))
    found = []
    for _ in range((n - 1) // 2):
        x = v[remaining]
        m = len(remaining)
        sd = float(x.std())
        if m < 3 or not sd > 0:
            break
        j = int(torch.argmax(x))  # first maximum: remaining is in position order, so ties go lowest first
        g = (float(x[j]) - float(x.mean())) / sd
        t = student_t_quantile(1 - alpha / m, m - 2)
        if not g > (m - 1) * t / math.sqrt((m - 2 + t * t) * m):
            break
        found.append(remaining.pop(j))
    return sorted(found)


def class_shares(prob, labels, *, high: float = 0.99):
    """``(classes, share)``: the labels present and, per class, the share of its samples fitted
    with ``p_e(y|x) > high``."""
    import torch

    labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
    confident = torch.as_tensor(prob, dtype=torch.float64).cpu() > high
    classes, group = torch.unique(labels, return_inverse=True)
    sizes = torch.bincount(group, minlength=len(classes)).double()
    return classes, torch.bincount(group, weights=confident.double(), minlength=len(classes)) / sizes


def suspicious_classes(prob, labels, *, high: float = 0.99, alpha: float = 0.05) -> list[int]:
    """Classes whose share of samples fitted with ``p_e(y|x) > high`` is an upper outlier among
    the classes' shares (:func:`upper_outliers`, significance ``alpha``). A poisoned target class
    is fitted with high confidence far more often than the others, because the enhanced model
    keeps the backdoor and forgets part of the clean data; with no such class (clean data,
    all-to-all attacks) nothing stands out. The answer does not depend on the sample order or
    on which integers name the classes (only on the grouping)."""
    classes, share = class_shares(prob, labels, high=high)
    return [int(classes[i]) for i in upper_outliers(share, alpha)]


def margins(logits, labels):
    """Each sample's margin under a model: the logit of its label minus the largest other logit
    (float64). Positive when the model predicts the label; unlike ``p(y|x)`` it does not
    saturate at 1 for samples fitted with near certainty."""
    import torch

    z = torch.as_tensor(logits).double().cpu()
    labels = torch.as_tensor(labels, dtype=torch.int64).cpu().view(-1, 1)
    if z.ndim != 2 or len(z) != len(labels):
        raise ValueError("margins needs logits of shape (N, classes) and one label per row")
    own = z.gather(1, labels).squeeze(1)
    others = z.scatter(1, labels, float("-inf")).max(1).values
    return own - others


def class_spreads(margin, labels, *, q: float = 0.9):
    """``(classes, spread)``: the labels present and, per class, how far the ``q`` quantile of its
    samples' margins lies above their median.

    A class is hard or easy as a whole, which moves its median and its upper quantile together;
    an all-to-one backdoor adds a group of samples the model fits far more confidently than the
    class's own clean samples (the trigger is easier to learn than the class), which stretches
    the class's upper tail away from its median. The spread reads that stretch, not how easy
    the class is."""
    import torch

    if not 0.5 < q < 1:
        raise ValueError(f"q must lie in (0.5, 1), got {q}")
    margin = torch.as_tensor(margin, dtype=torch.float64).flatten().cpu()
    labels = torch.as_tensor(labels, dtype=torch.int64).flatten().cpu()
    if len(margin) != len(labels):
        raise ValueError("class_spreads needs one margin per label")
    classes = torch.unique(labels)
    spread = torch.stack([torch.quantile(margin[labels == c], q) - torch.quantile(margin[labels == c], 0.5)
                          for c in classes]) if len(classes) else torch.empty(0, dtype=torch.float64)
    return classes, spread


def spread_z(margin, labels, *, q: float = 0.9):
    """``(classes, z)``: the labels present and each class's spread (:func:`class_spreads`) as a
    robust z-score among the classes, ``(spread - median) / scale``, where the scale is
    ``1.4826 MAD`` of the spreads but at least a tenth of the median spread (so that classes
    whose spreads are all nearly equal do not turn noise into large scores). ``z`` is None with
    fewer than three classes (nothing to compare a class with) or when the scale is 0."""
    classes, spread = class_spreads(margin, labels, q=q)
    return classes, robust_class_z(spread)


def robust_class_z(stat, floor: float = 0.0):
    """The classes' statistic ``stat`` (float64, one value per class) as robust z-scores,
    ``(stat - median) / scale`` with the scale ``1.4826 MAD`` but at least a tenth of the
    median and at least ``floor``; None with fewer than three classes or a scale of 0."""
    import torch

    if len(stat) < 3:
        return None
    med, mad = median_mad(stat)
    scale = max(mad, 0.1 * abs(med), floor)
    if not scale > 0:
        return None
    return (stat - med) / torch.tensor(scale, dtype=torch.float64)


def _two_clusters(feats, ids, seed_parts: tuple, n_components: int, *, with_points: bool = False):
    """The order-independent 2-means of activation clustering on ``feats`` PCA-reduced to
    ``n_components``: a 0/1 assignment per row, or None when the rows cannot be split (fewer
    than two, all features equal, or 2-means puts every row in one cluster). With
    ``with_points`` a pair ``(assign, z)``, ``z`` the PCA-reduced rows (None, None when they
    cannot be split)."""
    import torch

    from bdframe.scoring import pca_project, two_means

    z = pca_project(feats, n_components) if len(feats) >= 2 else None
    assign = None
    if z is not None:
        assign, _ = two_means(z, torch.as_tensor(ids, dtype=torch.int64), seed_parts)
        if bool((assign == assign[0]).all()):
            assign = None
    if with_points:
        return (assign, z) if assign is not None else (None, None)
    return assign


def _separation(z, assign) -> float:
    """How far apart two clusters of the rows ``z`` lie for their spread: the rows projected on
    the line through the two cluster means, the squared distance between the means over the
    pooled within-cluster variance along that line (Fisher's criterion). One Gaussian blob cut
    in two by 2-means gives about 7.0 whatever its scale (means at +-0.80 sd, within variance
    0.36 sd^2); two separate groups give more. Sums run in sorted order, so the value does not
    depend on the order of the rows."""
    import torch

    means = [torch.stack([z[assign == k][:, j].sort().values.sum() for j in range(z.shape[1])])
             / int((assign == k).sum()) for k in (0, 1)]
    d = means[1] - means[0]
    norm = float(d.norm())
    if norm == 0.0:
        return 0.0
    p = z @ (d / norm)
    within = sum(float(((p[assign == k] - float(means[k] @ (d / norm))) ** 2).sort().values.sum()) for k in (0, 1))
    within /= len(p)
    return norm ** 2 / within if within > 0 else float("inf")


def _cluster_means(signal, assign) -> list[float]:
    """Each cluster's mean ``signal``, summed in sorted order (independent of the rows' order)."""
    import torch

    signal = torch.as_tensor(signal, dtype=torch.float64)
    return [float(signal[assign == k].sort().values.sum()) / int((assign == k).sum()) for k in (0, 1)]


def cluster_gaps(feats, margin, labels, ids, seed_parts: tuple, *, n_components: int = 10, separation: bool = False):
    """``(classes, gap)``: the labels present and, per class, how far apart the mean margins of
    the two groups its features split into lie (:func:`cluster_split`'s 2-means with the same
    keys, so a picked class is split into the same two groups). With ``separation`` a triple
    ``(classes, gap, separation)``, the last the two groups' :func:`_separation` in the class's
    PCA-reduced features (0 for a class that cannot be split): a clean-label attack's target
    class is its own images and its triggered images, which the trigger sets apart in feature
    space although the model fits both groups well (no gap); a clean class's two groups are one
    blob cut in two.

    An all-to-one backdoor makes its target class two groups: the class's own images and the
    relabelled images from every other class, which the model fits through the trigger, far more
    confidently than the class's own (the trigger is easier to learn than the class). Features
    separate the two groups and their mean margins differ widely. A clean class's two groups
    (e.g. two kinds of ship) are fitted about equally well. Unlike the spread of
    :func:`class_spreads`, which reads the top tenth of the margins, the gap compares whole
    groups, so it does not move much when the model fits more clean samples confidently late in
    training. A class that cannot be split has gap 0."""
    import torch

    feats = torch.as_tensor(feats, dtype=torch.float64).cpu()
    margin = torch.as_tensor(margin, dtype=torch.float64).flatten().cpu()
    labels = torch.as_tensor(labels, dtype=torch.int64).flatten().cpu()
    ids = torch.as_tensor(ids, dtype=torch.int64).flatten().cpu()
    if not len(feats) == len(margin) == len(labels) == len(ids):
        raise ValueError("cluster_gaps needs one feature row, margin and id per label")
    classes = torch.unique(labels)
    gaps, seps = [], []
    for c in classes:
        rows = labels == c
        assign, z = _two_clusters(feats[rows], ids[rows], seed_parts, n_components, with_points=True)
        if assign is None:
            gaps.append(0.0)
            seps.append(0.0)
            continue
        means = _cluster_means(margin[rows], assign)
        gaps.append(abs(means[0] - means[1]))
        seps.append(_separation(z, assign) if separation else 0.0)
    gaps = torch.tensor(gaps, dtype=torch.float64)
    return (classes, gaps, torch.tensor(seps, dtype=torch.float64)) if separation else (classes, gaps)


def gap_z(feats, margin, labels, ids, seed_parts: tuple, *, n_components: int = 10):
    """``(classes, z)``: each class's :func:`cluster_gaps` as a robust z-score among the classes
    (:func:`robust_class_z`; None with fewer than three classes or no spread of the gaps). The
    scale is also at least a tenth of the median over the classes of their margins' standard
    deviation: where every class's two groups are fitted alike, all gaps are near 0 and their MAD
    is rounding-sized, and a gap is then measured against how widely margins vary inside a class
    rather than against that noise."""
    classes, gap = cluster_gaps(feats, margin, labels, ids, seed_parts, n_components=n_components)
    return classes, robust_class_z(gap, floor=gap_floor(margin, labels, classes))


def gap_separation_z(feats, margin, labels, ids, seed_parts: tuple, *, n_components: int = 10):
    """``(classes, z, parts)``: per class the larger of its gap's z-score (:func:`gap_z`) and
    its separation's (:func:`cluster_gaps` with ``separation``, as a :func:`robust_class_z`
    among the classes), from one 2-means per class; ``parts`` holds the two z-score tensors
    (``"gap"``, ``"separation"``; either None with fewer than three classes or no spread). A
    dirty-label target class stands out by its gap, a clean-label one by its separation. ``z``
    is None when both are."""
    import torch

    classes, gap, sep = cluster_gaps(feats, margin, labels, ids, seed_parts, n_components=n_components,
                                     separation=True)
    parts = {"gap": robust_class_z(gap, floor=gap_floor(margin, labels, classes)), "separation": robust_class_z(sep)}
    known = [v for v in parts.values() if v is not None]
    z = None if not known else known[0] if len(known) == 1 else torch.maximum(*known)
    return classes, z, parts


def gap_floor(margin, labels, classes) -> float:
    """The least scale of the gaps' z-scores (:func:`gap_z`): a tenth of the median over
    ``classes`` of the standard deviation of their samples' margins (0 with no classes)."""
    import torch

    margin = torch.as_tensor(margin, dtype=torch.float64).flatten().cpu()
    labels = torch.as_tensor(labels, dtype=torch.int64).flatten().cpu()
    if not len(classes):
        return 0.0
    return 0.1 * float(torch.stack([margin[labels == c].std(correction=0) for c in classes]).median())


def spread_classes(margin, labels, *, q: float = 0.9, k: float = 2.0, limit: int = 0) -> list[int]:
    """Classes whose spread's robust z-score (:func:`spread_z`) is above ``k``; with ``limit`` > 0
    only the ``limit`` largest of them (exactly equal z-scores: the smaller label first). The test is one pass, not repeated on the
    rest: a single target class stands out against nine ordinary ones, and a second pass over a
    narrowed set would pick ordinary classes one after another. Nothing is picked when
    :func:`spread_z` gives no scores. The answer does not depend on the sample order or on which
    integers name the classes, except for the tie-break between exactly equal z-scores."""
    return classes_above(*spread_z(margin, labels, q=q), k=k, limit=limit)


def classes_above(classes, z, *, k: float, limit: int = 0) -> list[int]:
    """The classes whose z-score is above ``k`` (none when ``z`` is None), with ``limit`` > 0 the
    ``limit`` largest of them (equal z-scores: the smaller label first); sorted."""
    if z is None:
        return []
    above = [(float(zc), i) for i, zc in enumerate(z) if float(zc) > k]
    if limit > 0:
        above = sorted(above, key=lambda t: (-t[0], t[1]))[:limit]
    return sorted(int(classes[i]) for _, i in above)


def _runner_up_counts(prob, label: int):
    """How many rows of ``prob`` have each class as their most likely class other than
    ``label`` (ties: the smaller class index), float64, one count per column."""
    import torch

    q = torch.as_tensor(prob, dtype=torch.float64).cpu().clone()
    q[:, int(label)] = -1.0
    return torch.bincount(q.argmax(1), minlength=q.shape[1]).double()


def _floor(counts, label: int) -> float:
    """``C - 1`` times the smallest share, among the classes other than ``label``, of the
    runner-up ``counts`` (0 with no rows or a single class)."""
    import torch

    others = torch.cat([counts[:int(label)], counts[int(label) + 1:]])
    total = float(counts.sum())
    return float(others.min()) / total * len(others) if len(others) and total > 0 else 0.0


def runner_up_entropy(prob, label: int) -> float:
    """Entropy (nats) of the histogram of each row's most likely class other than ``label``
    (ties: the smaller class index) over the rows of ``prob`` (0 with no rows). Summed in sorted
    order, so it depends neither on the rows' order nor on which integers name the classes."""
    if not len(prob):
        return 0.0
    hist = _runner_up_counts(prob, label)
    hist = hist[hist > 0] / hist.sum()
    return float(-(hist * hist.log()).sort().values.sum())


def runner_up_floor(prob, labels):
    """``(classes, floor)``: the labels present and, per class ``c``, ``C - 1`` times the
    smallest share, over the other classes ``j`` of ``prob``'s ``C`` columns, of ``c``'s samples
    whose most likely class other than ``c`` is ``j`` (ties: the smaller index). It is the
    largest share of the class whose runner-up classes could be spread evenly over all the others.

    An all-to-one dirty-label backdoor relabels images drawn from every other class. A model that
    has learned the trigger calls them the target, but what it would call them next is still
    mostly the class they were drawn from, so every other class is the runner-up of some of the
    target class's samples, the far ones included, and the floor rises towards the poison's
    share of the class. A clean class's runner-ups gather on the few classes that resemble it
    (an automobile's is a truck, rarely a frog), and its floor is near 0. It reads neither the
    features nor how confidently anything is fitted, so it also sees a trigger the model fits no
    more confidently than the class (a warp, a blend applied in pieces). It does not see a
    source-specific attack (one source class), a clean-label one, or a trigger that pulls every
    poisoned image towards the same second class. Counts are integers, so the value depends
    neither on the order of the samples nor on which integers name the classes."""
    import torch

    prob = torch.as_tensor(prob, dtype=torch.float64).cpu()
    labels = torch.as_tensor(labels, dtype=torch.int64).flatten().cpu()
    if prob.ndim != 2 or len(prob) != len(labels):
        raise ValueError("runner_up_floor needs one row of probabilities per label (a 2-D tensor)")
    classes = torch.unique(labels)
    floors = [_floor(_runner_up_counts(prob[labels == c], int(c)), int(c)) for c in classes]
    return classes, torch.tensor(floors, dtype=torch.float64)


# The least scale of the floor's z-score (share of a class): a class must have at least
# spread_k times this share more of its samples with evenly spread runner-ups than the median class.
FLOOR_SCALE = 0.05


def floor_z(prob, labels, *, min_scale: float = FLOOR_SCALE):
    """``(classes, z)``: each class's :func:`runner_up_floor` as a robust z-score among the
    classes (:func:`robust_class_z` with a scale of at least ``min_scale``: the clean classes'
    floors are all near 0, so their MAD is a few samples' worth, and a class a few percent
    above them is not evidence)."""
    classes, floor = runner_up_floor(prob, labels)
    return classes, robust_class_z(floor, floor=min_scale)


def called_by_another_class(class_prob, label: int):
    """Per row of ``class_prob``, whether some class other than ``label`` is strictly more likely
    than ``label`` (a tie with the label is not). Independent of the rows' order and of which
    integers name the other classes."""
    import torch

    class_prob = torch.as_tensor(class_prob, dtype=torch.float64)
    other = torch.cat([class_prob[:, :label], class_prob[:, label + 1:]], 1)
    return other.max(1).values > class_prob[:, label]


def split_side(assign, signal, class_prob, label: int, *, side: str = "confident", cut: float = SPLIT_SIDE_CUT):
    """Which of a class's two feature groups (``assign`` 0/1 over its rows) is the poison:
    0, 1, or None when the rule cannot tell (equal values).

    - ``"confident"``: the group with the higher mean ``signal`` (``logit(p(y|x))``): a
      dirty-label trigger is usually learned more easily than the class itself;
    - ``"runner-up"``: the group whose runner-up classes are more varied (higher
      :func:`runner_up_entropy` of ``class_prob``, the rows' ``p(.|x)``, with the class's
      ``label`` left out): relabelled
      images of every other class would be called many different things without the trigger,
      while a class's own images resemble a few neighbouring classes (an automobile's runner-up
      is a truck). It needs no assumption about how easily the trigger is learned, so it holds
      for a faint blend or a warp the model fits less confidently than the class, but it is
      wrong where the poison comes from few classes (a source-specific attack) or where the
      trigger itself pulls every poisoned image towards one other class;
    - ``"auto"``: ``runner-up`` when the two groups' runner-up entropies differ by more than
      ``cut`` nats, else ``confident``: a large difference is the many-sources signature, a
      small one is not evidence either way;
    - ``"auto-floor"``: the group with the higher :func:`runner_up_floor` where the two groups'
      floors differ by more than :data:`SPLIT_FLOOR_CUT`, else ``auto``: a group whose
      runner-ups cover every other class is the many-sources signature even where the other
      group's runner-ups vary too (a class that resembles many others), which the entropies
      cannot tell apart;
    - ``"auto-moved"``: the group of which the model calls more than :data:`SPLIT_MOVED_SHARE`
      by a class other than ``label`` (another class strictly more likely), where the other group's share
      is at most that; else ``auto-floor``. A group of the class that the model mostly calls
      something else is mislabelled images: relabelled poison whose trigger the model has not
      learned (yet), which it still calls by the class the images were drawn from and fits
      less confidently than the class's own images, so the confidence points at the class's
      own group and, where the poison comes from one class, neither runner-up rule tells.
    """
    import torch

    if side not in SPLIT_SIDES:
        raise ValueError(f"side must be one of {', '.join(SPLIT_SIDES)}, got {side!r}")
    if side != "confident":
        class_prob = torch.as_tensor(class_prob, dtype=torch.float64).cpu()
    if side == "auto-moved":
        moved = called_by_another_class(class_prob, label)
        share = [float(moved[assign == k].double().mean()) if bool((assign == k).any()) else 0.0 for k in (0, 1)]
        above = [v > SPLIT_MOVED_SHARE for v in share]
        if above[0] != above[1]:
            return 0 if above[0] else 1
        side = "auto-floor"
    if side == "auto-floor":
        floor = [_floor(_runner_up_counts(class_prob[assign == k], label), label) for k in (0, 1)]
        if abs(floor[0] - floor[1]) > SPLIT_FLOOR_CUT:
            return 0 if floor[0] > floor[1] else 1
    if side != "confident":
        ent = [runner_up_entropy(class_prob[assign == k], label) for k in (0, 1)]
        if side == "runner-up" or abs(ent[0] - ent[1]) > cut:
            return None if ent[0] == ent[1] else 0 if ent[0] > ent[1] else 1
    mean = _cluster_means(signal, assign)
    return None if mean[0] == mean[1] else 0 if mean[0] > mean[1] else 1


def cluster_split(feats, signal, ids, seed_parts: tuple, *, n_components: int = 10, side: str = "confident",
                  class_prob=None, label: int | None = None, cut: float = SPLIT_SIDE_CUT):
    """Split one class in two in feature space and flag the group the model fits more confidently
    (``side = "confident"``) or the one :func:`split_side` chooses by another rule
    (``class_prob``: the class's rows of ``p(.|x)`` over all classes, ``label``: the class's column).

    The class's features are centred, projected onto their top ``n_components`` principal
    directions and split by the order-independent 2-means of activation clustering; the cluster
    whose mean ``signal`` (MeCa: the enhanced model's ``logit(p_e)``, finite because p is
    clamped) is higher is flagged. The mean rather than the median: when most of both clusters
    are fitted near certainty the medians sit on the same ceiling and their order is noise,
    while the mean still weighs the clean cluster's less confidently fitted tail. Unlike
    activation clustering's relative-size rule the decision does not look at the clusters'
    sizes, so a poisoned group that is half its class (a clean-label attack) is found as well as
    a small one. Equal means, a single cluster or features that are all equal flag nothing.
    Returns a bool tensor over the class's samples."""
    import torch

    if side != "confident" and (class_prob is None or label is None or len(class_prob) != len(feats)):
        raise ValueError(f"side = {side!r} needs the class's rows of class_prob and its label")
    flags = torch.zeros(len(feats), dtype=torch.bool)
    assign = _two_clusters(feats, ids, seed_parts, n_components)
    if assign is None:
        return flags
    k = split_side(assign, signal, class_prob, label, side=side, cut=cut)
    return flags if k is None else assign == k


def _neighbours_inside(z, inside, rows, ids, k: int = 20):
    """For each of ``rows`` (indices into ``z``), the share of its ``k`` nearest other rows of
    ``z`` (Euclidean, ties broken by the smaller id) that lie ``inside`` (a bool mask over ``z``).
    Distances are computed pair by pair, so neither they nor the neighbours depend on the order
    of the rows."""
    import torch

    k = min(int(k), len(z) - 1)
    out = torch.zeros(len(rows), dtype=torch.float64)
    if k <= 0:
        return out
    order = torch.argsort(torch.as_tensor(ids, dtype=torch.int64))  # candidates in id order
    zs, ins = z[order], inside[order]
    where = torch.empty(len(z), dtype=torch.int64)
    where[order] = torch.arange(len(z))
    for start in range(0, len(rows), 512):
        chunk = rows[start:start + 512]
        d = torch.cdist(z[chunk], zs, compute_mode="donot_use_mm_for_euclid_dist")
        d[torch.arange(len(chunk)), where[chunk]] = float("inf")  # not its own neighbour
        nearest = torch.sort(d, dim=1, stable=True).indices[:, :k]
        out[start:start + len(chunk)] = ins[nearest].to(torch.float64).mean(1)
    return out


def cluster_cores(features, prob, labels, ids, flags, classes, *, seed: int = 0, n_components: int = 10,
                  side: str = "confident"):
    """The core of each picked class's flagged group: the flagged samples of each class in
    ``classes`` split once more by 2-means (the same keys as :func:`cluster_split`, on the group's
    own principal components), and one half kept. The trigger's samples are the tightest part of
    the group; the clean samples of the class that the first split swept in lie at its edge and
    fall into the other half. Which half is the core (``side``):

    - ``"confident"``: the half the model fits more confidently (higher mean ``logit(prob)``);
    - ``"far"``: the half lying farther from the rest of the class: the lower mean share of each
      sample's 20 nearest neighbours (in the class's PCA-reduced features, the space of the
      first split) that are unflagged samples of the class. The swept-in clean samples border
      the class's other clean samples whatever the model's confidence in them; the trigger's
      samples do not.

    Flagged samples outside ``classes`` (the confidence rule's) are their own core; a group that
    cannot be split, or whose halves tie, is its own core. Returns a bool tensor, a subset of
    ``flags``; independent of the sample order and of the integers naming the classes."""
    import torch

    from bdframe.scoring import pca_project

    if side not in ("confident", "far"):
        raise ValueError(f"side must be 'confident' or 'far', got {side!r}")
    labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
    flags = torch.as_tensor(flags, dtype=torch.bool).cpu()
    ids = torch.as_tensor(ids, dtype=torch.int64).cpu()
    core = flags.clone()
    z = confidence_scores(prob)
    for c in sorted({int(k) for k in classes}):
        rows = torch.nonzero(flags & (labels == c)).flatten()
        assign = _two_clusters(features[rows], ids[rows], ("meca-clusters", int(seed)), n_components)
        if assign is None:
            continue
        if side == "confident":
            signal = z[rows]
        else:  # each flagged sample's share of unflagged neighbours, negated: higher = farther from the rest
            members = torch.nonzero(labels == c).flatten()
            zc = pca_project(features[members], n_components)
            at = torch.searchsorted(members, rows)
            signal = -_neighbours_inside(zc, ~flags[members], at, ids[members])
        mean = _cluster_means(signal, assign)
        if mean[0] != mean[1]:
            core[rows] = assign == (0 if mean[0] > mean[1] else 1)
    return core


def second_look_cuts(prob, labels, classes, *, below: float = 0.5, cut: str = "fixed") -> dict:
    """The second look's cut for each class of ``classes``: ``{class: cut}`` (see
    :func:`second_look`, which flags below these)."""
    import torch

    if cut not in ("fixed", "class"):
        raise ValueError(f"second_look: cut must be 'fixed' or 'class', not {cut!r}")
    prob = torch.as_tensor(prob, dtype=torch.float64).cpu()
    labels = torch.as_tensor(labels, dtype=torch.int64).flatten().cpu()
    if prob.ndim != 2 or len(prob) != len(labels):
        raise ValueError("second_look needs one row of probabilities per label (a 2-D tensor)")
    picked = sorted({int(k) for k in classes})
    cuts = {k: float(below) for k in picked}
    inside = torch.isin(labels, torch.as_tensor(picked, dtype=torch.int64))
    if cut == "fixed" or not bool((~inside).any()):
        return cuts
    own = prob[torch.arange(len(prob)), labels]
    rest = float(own[~inside].median())
    for k in picked:
        rows = labels == k
        if bool(rows.any()) and rest > 0:
            cuts[k] = float(below) * min(1.0, float(own[rows].median()) / rest)
    return cuts


def second_look(prob, labels, classes, *, below: float = 0.5, cut: str = "fixed", moved: bool = False):
    """The second look at the kept samples: a bool mask over the rows of ``prob`` (a model's
    ``p(.|x)``, one row per sample) flagging the rows labelled with one of ``classes`` whose
    label gets a probability below the class's cut.

    MeCa's clean model was trained without the flagged group of each picked class and unlearned
    its core, so it has not learned the trigger. The poison the split inside the class left out
    is images drawn from other classes: the clean model calls them by the class they were drawn
    from, while it fits the class's own training images. With ``below = 0.5`` a sample is
    flagged when the clean model gives its label less than even odds.

    ``cut = "fixed"``: the cut is ``below`` for every class. ``cut = "class"``: the cut is
    ``below`` scaled by how well the model fits the class, ``below * min(1, m_k / m_rest)``,
    where ``m_k`` is the median probability the rows of class ``k`` get for their label and
    ``m_rest`` the same median over the rows of the classes not in ``classes``. A class the
    model fits as well as the others keeps ``below``; in a hard class, whose clean images get
    lower probabilities, the cut falls in proportion, so an image is not flagged only for
    belonging to a hard class. With no row outside ``classes`` the cut is ``below``.

    ``moved = True``: only the rows below the cut that the model gives another class a higher
    probability than their label are flagged, the images it calls by another class. A row it
    doubts but still calls by its label (a hard image of the class) is not.

    Rows of other classes are never flagged; the mask does not depend on the order of the rows
    or on which integers name the classes."""
    return _below_cuts(prob, labels, second_look_cuts(prob, labels, classes, below=below, cut=cut), moved=moved)


def _below_cuts(prob, labels, cuts: dict, *, moved: bool = False):
    """The rows of a class in ``cuts`` whose label's probability is below that class's cut (with
    ``moved``, only those another class is likelier for): :func:`second_look` on given cuts."""
    import torch

    prob = torch.as_tensor(prob, dtype=torch.float64).cpu()
    labels = torch.as_tensor(labels, dtype=torch.int64).flatten().cpu()
    flags = torch.zeros(len(labels), dtype=torch.bool)
    if not len(labels):
        return flags
    own = prob[torch.arange(len(prob)), labels]
    for k, c in cuts.items():
        flags |= (labels == k) & (own < c)
    if moved:
        others = prob.clone()
        others[torch.arange(len(prob)), labels] = -1.0
        flags &= others.max(1).values > own
    return flags


def flag_label_aware(prob, labels, *, high: float = 0.99, alpha: float = 0.05, threshold: str = "mad", k: float = 3.0,
                     inside: str = "otsu", quantile: float = 0.5, confirm=None, pick: str = "both", classes=None,
                     features=None, ids=None, seed: int = 0, n_components: int = 10, side: str = "confident",
                     side_cut: float = SPLIT_SIDE_CUT, class_prob=None):
    """Label-aware detection: find the classes that stand out (:func:`suspicious_classes`) and
    flag part of each of them; when no class stands out, the confidence rule over all samples
    with ``threshold``. Returns ``(flags, classes)``.

    ``confirm``: another model's ``p(y|x)`` for the same samples (MeCa: the warm-up model's);
    with ``pick = "both"`` a class is then picked only when it stands out in both, so a class
    that one model happens to fit easily is not taken for a target class; with
    ``pick = "confirm"`` the classes are those that stand out in ``confirm`` alone. The split
    inside a picked class (and the fallback) always uses ``prob``. ``classes``: the classes picked
    by another test (e.g. :func:`spread_classes`); the share test is then skipped and ``confirm``
    and ``pick`` are ignored.

    How a class that stands out is split (``inside``):

    - ``"otsu"``: Otsu's threshold on the class's ``logit(p_e)`` (inside a target class the
      poison is a large group, not a tail, so an outlier cut would miss it);
    - ``"reference"``: flag the class's samples whose ``logit(p_e)`` is above the ``quantile``
      of the samples of the classes that do *not* stand out, i.e. those the enhanced model fits
      more confidently than a typical sample of an ordinary class. The poison is fitted near
      certainty, so this finds nearly all of it, at the cost of the clean samples of the class
      that are fitted as well as a typical clean sample elsewhere.
    - ``"clusters"``: :func:`cluster_split` of the class's ``features`` (one row per sample, e.g.
      the warm-up model's penultimate features; ``ids`` key the 2-means with ``seed``), the
      cluster with the higher mean ``logit(p_e)`` flagged, or with ``side`` ``"runner-up"``,
      ``"auto"``, ``"auto-floor"`` or ``"auto-moved"`` the one :func:`split_side` chooses (``side_cut``: its cut; ``class_prob``: every
      sample's ``p_e(.|x)`` over all classes, one row per sample, columns the class labels).
    """
    import torch

    if inside not in ("otsu", "reference", "clusters"):
        raise ValueError(f"inside must be 'otsu', 'reference' or 'clusters', got {inside!r}")
    if inside == "clusters" and (features is None or ids is None or len(features) != len(labels)
                                 or len(ids) != len(labels)):
        raise ValueError("inside = 'clusters' needs one feature row and one id per sample")
    if side != "confident" and (inside != "clusters" or class_prob is None or len(class_prob) != len(labels)):
        raise ValueError(f"side = {side!r} needs inside = 'clusters' and one row of class_prob per sample")
    if pick not in ("both", "confirm"):
        raise ValueError(f"pick must be 'both' or 'confirm', got {pick!r}")
    labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
    given = classes is not None
    if given:
        classes = sorted({int(c) for c in classes})
    else:
        classes = suspicious_classes(prob, labels, high=high, alpha=alpha)
    if confirm is not None and not given:
        if len(confirm) != len(labels):
            raise ValueError("confirm must hold one probability per sample")
        other = suspicious_classes(confirm, labels, high=high, alpha=alpha)
        classes = [c for c in classes if c in set(other)] if pick == "both" else other
    if not classes:
        return flag_confident(prob, threshold=threshold, k=k), []
    if inside == "reference":
        z = confidence_scores(prob)
        standing_out = torch.isin(labels, torch.tensor(classes, dtype=torch.int64))
        if bool(standing_out.all()):
            raise ValueError("inside = 'reference' needs at least one class that is not picked")
        cut = float(torch.quantile(z[~standing_out], quantile))
        return standing_out & (z > cut), classes
    flags = torch.zeros(len(labels), dtype=torch.bool)
    z = confidence_scores(prob) if inside == "clusters" else None
    for c in classes:
        if inside == "clusters":
            rows = torch.nonzero(labels == c).flatten()
            # keyed by the seed and the sample ids alone, so renaming the classes changes nothing
            flags[rows] = cluster_split(features[rows], z[rows], torch.as_tensor(ids)[rows],
                                        ("meca-clusters", int(seed)), n_components=n_components, side=side,
                                        class_prob=None if class_prob is None else torch.as_tensor(class_prob)[rows],
                                        label=int(c), cut=side_cut)
        else:
            flags |= flag_confident(prob, labels == c, threshold="otsu")
    return flags, classes


class MeCa(Defense):
    name = "meca"
    Config = MeCaConfig
    summary = "MeCa: iterative backdoor enhancement (adv-KL consistency + mixed step), detection, clean retraining"

    @classmethod
    def check_components(cls, config, registry):
        """The ``semi`` table against the mixmatch stage, and the options it cannot be combined with."""
        from bdframe.recipe import table_problems

        # split_side and core_side (bdframe's defaults) are simply unused where their rule is off;
        # the cores need the clusters they are cut from
        if cls.cores(config) and (config.inside != "clusters" or config.detection != "label-aware"):
            return [("clean_unlearn_core", 'needs detection = "label-aware" and inside = "clusters" while '
                                           'clean_unlearn > 0: set it to false to unlearn the whole flagged set, '
                                           'or clean_unlearn = 0 for the paper\'s clean training')]
        if not config.split_side.startswith("auto") and config.split_side_cut != SPLIT_SIDE_CUT:
            return [("split_side_cut", 'is used only with split_side = "auto", "auto-floor" or "auto-moved"')]
        if config.repair_model and config.clean_stage != "repair":
            return [("repair_model", 'is used only with clean_stage = "repair"')]
        if config.clean_stage == "repair":
            problems = [(field, why) for field, bad, why in (
                ("semi", bool(config.semi), 'is used only with clean_stage = "semi"'),
                ("relearn", config.relearn,
                 'must be false with clean_stage = "repair": the repaired model keeps the given labels'))
                if bad]
            for stage in steps.REPAIR_STAGES:
                if not registry.has("trainer", stage):
                    problems.append(("clean_stage", registry.unknown_message("trainer", stage)))
            return problems
        if config.clean_stage != "semi":
            return [("semi", 'is used only with clean_stage = "semi"')] if config.semi else []
        return table_problems(registry, "trainer", "mixmatch", "semi", dict(config.semi), owned=("credible_share",))

    @staticmethod
    def unlearns(config) -> bool:
        """Whether the clean training unlearns flagged samples: ``clean_unlearn > 0`` with
        ``clean_stage = "train"`` (the semi-supervised stage uses the flagged set as unlabelled
        data and the repair unlearns by itself, so ``clean_unlearn`` is unused there)."""
        return config.clean_unlearn > 0 and config.clean_stage == "train"

    @staticmethod
    def rechecks(config) -> bool:
        """Whether the clean model takes a second look at the picked classes' kept samples
        (``recheck_below > 0`` with label-aware detection and ``clean_stage = "train"``;
        unused otherwise)."""
        return config.recheck_below > 0 and config.detection == "label-aware" and config.clean_stage == "train"

    @classmethod
    def cores(cls, config) -> bool:
        """Whether the clean training unlearns only the cores of the flagged groups."""
        return cls.unlearns(config) and config.clean_unlearn_core

    # -- plumbing ---------------------------------------------------------------------------------
    def _optim(self, amp: str) -> dict:
        c = self.config
        return {"batch_size": c.batch_size, "momentum": c.momentum, "weight_decay": c.weight_decay,
                "crop_padding": 4 if c.augment else 0, "flip": c.augment, "amp": amp}

    def warmup_trainer(self, ctx, epochs: int | None = None, amp: str | None = None):
        """The warm-up stage (step 1): the ``standard`` trainer with ``warmup_epochs`` (or
        ``epochs``) and ``warmup_lr`` and MeCa's own optimiser settings and precision (``amp``:
        the :meth:`_amp` setting when already resolved)."""
        c = self.config
        return ctx.component("trainer", "standard", epochs=c.warmup_epochs if epochs is None else epochs,
                             lr=c.warmup_lr, **self._optim(self._amp(ctx) if amp is None else amp))

    def _amp(self, ctx) -> str:
        """The ``amp`` setting of MeCa's own stages: the defense's, or with ``auto`` the recipe's
        ``[train]`` stage's (``auto`` where that stage has none)."""
        if self.config.amp != "auto":
            return self.config.amp
        return getattr(ctx.component("trainer").config, "amp", "auto")

    @staticmethod
    def _score_autocast(amp: str, device):
        """The autocast context of consistency scoring: bfloat16 where ``amp`` gives bfloat16 on
        this device, else float32. Never float16: only the sign of each input-gradient entry is
        used, and float16 gradients underflow to zero (a zero sign) where bfloat16's do not."""
        import torch

        from bdframe.training import amp_dtype

        device = torch.device(device)
        on = amp_dtype(amp, device) == torch.bfloat16
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)

    def _score_ctx(self, ctx, what: str):
        from bdframe.interfaces import ScoreContext
        from bdframe.seeding import derive_seed

        return ScoreContext(seed=derive_seed(ctx.seed, "meca", what), device=ctx.device,
                            batch_size=self.config.score_batch_size, progress=ctx.progress)

    def _clean_trainer(self, ctx):
        """The clean-training stage: the recipe's ``[train]`` stage, or with ``clean_unlearn`` the
        ``mixed`` stage with the ``[train]`` stage's optimisation settings (learn the kept set,
        unlearn the flagged set with per-sample weight ``clean_unlearn``, each flagged sample's CE
        capped at ``-ln(clean_unlearn_below)``; ``steps.unlearning_trainer``)."""
        c = self.config
        if not self.unlearns(c):
            return ctx.component("trainer")
        return steps.unlearning_trainer(ctx, c.clean_unlearn, c.clean_unlearn_below, "meca", "clean_unlearn")

    def _repair_model(self, fresh):
        """The state dict of ``repair_model`` (CPU tensors), checked against the recipe's model by
        loading it into a copy of ``fresh`` before any training (``steps.load_saved``: a missing
        file or one that does not fit is a user error naming the field). The copy draws no random
        numbers, so the warm-up starts as it does without this option."""
        import copy

        return steps.load_saved(copy.deepcopy(fresh), self.config.repair_model, "$.defense.repair_model")

    def relearn_stage(self, ctx, amp: str | None = None):
        """The ``relearn`` stage of step 5: ``relearn_epochs`` with ``relearn = true``, else
        ``recheck_epochs``, at ``relearn_lr`` under a cosine schedule, every class weighed the
        same with ``relearn_balance``. Its other optimisation settings are the recipe's
        ``[train]`` stage's (``relearn_settings = "train"``: the clean model is fine-tuned as it
        was trained, with the same batch size, momentum, weight decay, label smoothing and
        augmentation) or MeCa's own (``"meca"``)."""
        c = self.config
        amp = self._amp(ctx) if amp is None else amp
        settings = (self._optim(amp) if c.relearn_settings == "meca"
                    else steps.fine_tuning_settings(ctx, "meca", "relearn_settings", amp=amp))
        return ctx.component("trainer", "relearn", epochs=c.relearn_epochs if c.relearn else c.recheck_epochs,
                             lr=c.relearn_lr, class_balance=c.relearn_balance, **settings)

    def relabel_and_relearn(self, ctx, data, det, clean_model, relearner, recheck_classes) -> dict:
        """Step 5 on ``clean_model`` (in place): with ``recheck_classes``, first the second look
        (:meth:`_second_look`) at the kept samples of those classes; then every flagged sample
        (detection's and the second look's) gets the clean model's argmax as its label, and the
        model is fine-tuned by ``relearner`` on the kept samples the second look left alone and
        the relabelled ones (the paper's relabel-and-relearn on the enlarged flagged set). With
        ``recheck_rounds`` above 1 (and ``recheck_classes``) the look, the relabelling and the
        fine-tuning repeat, each round with the model the round before relearned, at the samples
        still kept. Returns the step's record: the model's state, its evaluation, the counts
        (those of the last round; ``rounds``: each round's), the rechecked ids and the seconds."""
        import torch

        t0 = time.perf_counter()
        rechecked, cuts, rounds = data.ids[:0].cpu().clone(), {}, []
        for r in range(self.config.recheck_rounds if recheck_classes else 1):
            if recheck_classes:
                kept = data.subset(data.contains(det["kept_ids"]) & ~data.contains(rechecked))
                more, cuts = self._second_look(ctx, clean_model, kept, recheck_classes)
                rechecked = torch.cat([rechecked, more])
                ctx.log({"stage": "meca-recheck", "round": r + 1, "classes": list(recheck_classes),
                         "below": self.config.recheck_below, "cut": self.config.recheck_cut,
                         "cuts": {str(k): v for k, v in cuts.items()}, "moved": self.config.recheck_moved,
                         "flagged": len(more)})
            # the first round keeps the stage name it had before rounds existed (same seed, same run)
            counts = self._relabel_and_fit(ctx, data, det, clean_model, relearner, rechecked,
                                           "meca-relearn" if r == 0 else f"meca-relearn-{r + 1}")
            rounds.append({"round": r + 1, "rechecked": len(rechecked), **counts})
        last = rounds[-1]
        return {"model": steps.cpu_state(clean_model), "eval": last["eval"], "relabelled": last["relabelled"],
                "label_changed": last["label_changed"], "rechecked_ids": rechecked, "cuts": cuts,
                "rounds": rounds, "seconds": time.perf_counter() - t0}

    def _relabel_and_fit(self, ctx, data, det, model, relearner, rechecked, stage: str) -> dict:
        """One relabel-and-relearn: detection's flagged samples and ``rechecked`` get ``model``'s
        argmax as their label (with ``relabel = "changed"`` only those whose label it changes are
        kept), and ``model`` is fine-tuned in place on them and the kept samples not in
        ``rechecked``. Returns the counts and the evaluation."""
        import torch

        from bdframe import scoring
        from bdframe.data import ImageSet

        relabel_set = data.subset(data.contains(torch.cat([det["flagged_ids"].cpu(), rechecked])))
        learn_set = data.subset(data.contains(det["kept_ids"]) & ~data.contains(rechecked))
        if len(relabel_set):
            new = scoring.logits(model, relabel_set, self._score_ctx(ctx, "relabel"),
                                 desc="meca relabel").argmax(1).cpu()
        else:
            new = torch.empty(0, dtype=torch.int64)
        label_changes = new != relabel_set.labels.cpu()
        changed = int(label_changes.sum())
        relabelled = relabel_set.with_labels(new)
        if self.config.relabel == "changed":
            relabelled = relabelled.subset(label_changes)
        merged = ImageSet.concat(learn_set, relabelled)
        st = ctx.stage(stage, evaluate_each_epoch=self.config.evaluate_each_epoch, lr_setting="[defense] relearn_lr")
        relearner.fit(model, merged, st)
        ev = ctx.evaluate(model)
        ctx.log({"stage": stage, "train_size": len(merged), "relabelled": len(new), "label_changed": changed, **ev})
        return {"eval": ev, "relabelled": len(new), "label_changed": changed, "train_size": len(merged)}

    def _second_look(self, ctx, clean_model, kept, classes):
        """The ids of the samples of ``kept`` that :func:`second_look` flags, read in the clean
        model (eval mode, no augmentation), and each class's cut."""
        import torch

        from bdframe import scoring

        inside = torch.isin(kept.labels.cpu(), torch.as_tensor(sorted(int(k) for k in classes), dtype=torch.int64))
        if not bool(inside.any()):
            return kept.ids[:0].cpu().clone(), {}
        # the class-relative cut compares the picked classes' fit with the other kept samples'
        part = kept if self.config.recheck_cut == "class" else kept.subset(inside)
        prob = torch.softmax(scoring.logits(clean_model, part, self._score_ctx(ctx, "recheck"),
                                            desc="meca second look").double(), 1).cpu()
        cuts = second_look_cuts(prob, part.labels, classes, below=self.config.recheck_below, cut=self.config.recheck_cut)
        flags = _below_cuts(prob, part.labels, cuts, moved=self.config.recheck_moved)
        return part.ids[flags].cpu().clone(), cuts

    def _repair(self, ctx, data, det, prob, model, start: dict):
        """``clean_stage = "repair"``: the warm-up model or ``repair_model`` (``model``, trained on all of D) repaired
        in place by alternating passes (``steps.repair``): unlearn the flagged samples the
        enhanced model fits most confidently, relearn each class's samples it fits least
        (:func:`repair_split`), until the fit of the unlearned set levels off. Every round is a
        checkpoint. ``prob`` is the enhanced model's ``p_e(y|x)`` in ``data``'s row order. Returns
        ``(done, repaired, unlearned_ids)``: ``done`` as a clean-training step's (``eval``,
        ``seconds``), ``repaired`` the figures for ``metrics.json``."""
        import torch

        c = self.config
        flagged = torch.zeros(len(data), dtype=torch.bool)
        flagged[data.positions(det["ids"])] = det["poisoned"].cpu()
        forget_pos, learn_pos = repair_split(prob, data.labels, data.ids, flagged,
                                             poison_share=c.repair_poison, clean_share=c.repair_clean)
        forget, learn = data.subset(forget_pos), data.subset(learn_pos)
        ctx.log({"stage": "meca-repair-split", "unlearned": len(forget), "relearned": len(learn)})
        out = steps.repair(ctx, "meca-repair", model, forget, learn, start=start, lr=c.repair_lr,
                           rounds=c.repair_rounds if len(forget) else 0, batch_size=c.batch_size,
                           lr_setting="[defense] repair_lr", plateau_rounds=c.repair_plateau_rounds, plateau_fall=c.repair_plateau_fall,
                           evaluate_each_round=c.evaluate_each_round)
        final = out["trend"][-1]
        ev = {k: v for k, v in final.items() if k not in ("round", "fit_poisoned", "fit_clean")}
        repaired = {"unlearned": len(forget), "relearned": len(learn), "rounds": out["rounds"],
                    "stopped": out["stopped"], "trend": out["trend"], "model": c.repair_model or "warm-up"}
        return {"eval": ev, "seconds": out["seconds"] + out["fit_seconds"]}, repaired, forget.ids.clone()

    # -- the pipeline -----------------------------------------------------------------------------
    def run(self, data, ctx):
        """Warm-up, iterative enhancement, detection, clean training and optional relearning.

        Each finished step is a ``ctx.checkpoint``: on ``--resume`` it is loaded (its history
        records replayed) instead of being redone; a step cut short resumes from its last epoch.
        """
        import torch

        from bdframe import scoring
        from bdframe.runs import save_atomic

        c = self.config
        t_run = time.perf_counter()
        out_dir = Path(ctx.artifacts) if ctx.artifacts else None
        n = len(data)
        if n == 0:
            raise ValueError("meca: the training set is empty")
        seconds: dict = {}
        resumed: list[str] = []
        # every component up front, so a missing plugin or a rejected parameter fails before training
        amp = self._amp(ctx)
        warmup_trainer = self.warmup_trainer(ctx, amp=amp)
        mixed = ctx.component("trainer", "mixed", epochs=c.epochs_per_iteration, lr=c.enhance_lr,
                              schedule=c.enhance_schedule, lam=c.lam, normalize=c.unlearn_norm,
                              forget_ceiling=c.unlearn_ceiling, **self._optim(amp))
        scorer_params = {"epsilon": c.epsilon, "patch_size": c.patch_size, "mask_mode": c.mask_mode,
                         "keep_prob": c.keep_prob, "grad_loss": c.grad_loss}
        ctx.component("scorer", "adv-kl", **scorer_params)
        semi, repairing = c.clean_stage == "semi", c.clean_stage == "repair"
        if repairing:
            clean_trainer = None
            for stage in steps.REPAIR_STAGES:  # fail before training when a stage is missing
                ctx.component("trainer", stage)
        else:
            clean_trainer = ctx.component("trainer", "mixmatch", **dict(c.semi)) if semi else self._clean_trainer(ctx)
        rechecks = self.rechecks(c)
        relearner = self.relearn_stage(ctx, amp) if c.relearn or rechecks else None

        # 1. warm-up ------------------------------------------------------------------------
        model = ctx.new_model()
        repair_state = self._repair_model(model) if repairing and c.repair_model else None
        step = ctx.checkpoint("meca-warmup")
        done = step.load()
        if done is None and c.warmup_model:
            # a model trained on D before (a plain run's model.pt) takes the warm-up's place
            model, start = steps.starting_model(ctx, "meca-warmup", data, path=c.warmup_model,
                                                field="$.defense.warmup_model")
            ctx.log({"stage": "meca-warmup", "meca_iteration": 0, "alpha": 0.0, "forget_size": 0,
                     "learn_size": n, "loaded_from": c.warmup_model, **start["eval"]})
            done = {"model": steps.cpu_state(model), "eval": start["eval"], "seconds": 0.0, "loaded": True}
            step.save(done)
        elif done is not None:
            model.load_state_dict(done["model"])
            resumed.append("warmup")
            if not done.get("eval"):
                # a warm-up state made outside this defense (e.g. a saved model handed in by a
                # benchmark) may carry no evaluation: measure it, so the trend starts with figures
                done = dict(done, eval=ctx.evaluate(model))
        else:
            t0 = time.perf_counter()
            st = ctx.stage("meca-warmup", evaluate_each_epoch=c.evaluate_each_epoch, lr_setting="[defense] warmup_lr")
            warmup_trainer.fit(model, data, st)
            ev = ctx.evaluate(model)
            ctx.log({"stage": "meca-warmup", "meca_iteration": 0, "alpha": 0.0, "forget_size": 0,
                     "learn_size": n, **ev})
            done = {"model": steps.cpu_state(model), "eval": ev, "seconds": time.perf_counter() - t0}
            step.save(done)
        seconds["warmup"] = done["seconds"]
        warmup_eval = dict(done["eval"])
        warmup_state = done["model"]
        if out_dir is not None and c.save_models:
            save_atomic(done["model"], out_dir / "meca_warmup_model.pt")
        trend = [{"iteration": 0, "alpha": 0.0, "forget_size": 0, "learn_size": n,
                  "clean_acc": done["eval"].get("clean_acc"), "asr": done["eval"].get("asr")}]

        # 2. iterative backdoor enhancement: one checkpoint, saved after every iteration ------------
        step = ctx.checkpoint("meca-enhance")
        enh = step.load() or {"k": 0, "model": None, "records": []}
        if enh["model"] is not None:
            model.load_state_dict(enh["model"])
            resumed.extend(f"iteration-{r['iteration']}" for r in enh["records"])
        records = list(enh["records"])
        sctx = self._score_ctx(ctx, "consistency")
        for k in range(enh["k"] + 1, c.iterations + 1):
            t0 = time.perf_counter()
            scorer = ctx.component("scorer", "adv-kl", **scorer_params, iteration=k)
            with self._score_autocast(amp, ctx.device):
                scores = scorer.score(model, data, sctx).double().cpu()
            alpha = alpha_at(k, c.alpha_step, c.alpha_max)
            eligible = None
            if c.protect_confident > 0:
                _, fit = detect(scoring.logits(model, data, sctx, desc="meca fit"), data.labels)
                eligible = (fit <= c.protect_confident).cpu()
            forget_pos, learn_pos = partition(scores, data.ids, alpha, eligible, skip=c.forget_skip)
            t_score = time.perf_counter() - t0
            forget, learn = data.subset(forget_pos), data.subset(learn_pos)
            name = f"meca-iter-{k:02d}"
            mixed.fit(model, learn, ctx.stage(name, lr_setting="[defense] enhance_lr or lam"), forget=forget)
            ev = ctx.evaluate(model) if c.evaluate_iterations or k == c.iterations else {}
            kl = -scores
            rec = {"stage": name, "meca_iteration": k, "alpha": alpha, "forget_size": len(forget),
                   "learn_size": len(learn), "protected": None if eligible is None else int((~eligible).sum()),
                   "kl_mean": float(kl.mean()), "kl_median": float(kl.median()),
                   "kl_forget_min": float(kl[forget_pos].min()) if len(forget_pos) else None, **ev,
                   "score_seconds": t_score, "seconds": time.perf_counter() - t0}
            ctx.log(rec)
            records.append({"iteration": k, "rec": rec, "scores": scores.float(), "forget_ids": forget.ids.clone()})
            step.save({"k": k, "model": steps.cpu_state(model), "records": records})
        for r in records:
            rec = r["rec"]
            trend.append({"iteration": r["iteration"], "alpha": rec["alpha"], "forget_size": rec["forget_size"],
                          "learn_size": rec["learn_size"], "clean_acc": rec.get("clean_acc"), "asr": rec.get("asr"),
                          "kl_mean": rec["kl_mean"], "seconds": rec["seconds"]})
        seconds["enhance"] = sum(r["rec"]["seconds"] for r in records)
        seconds["iterations"] = [r["rec"]["seconds"] for r in records]

        # 3. detection with the enhanced model -------------------------------------------------
        step = ctx.checkpoint("meca-detect")
        det = step.load()
        if det is not None:
            resumed.append("detect")
        else:
            t0 = time.perf_counter()
            logits = scoring.logits(model, data, self._score_ctx(ctx, "detect"), desc="meca detect")
            poisoned, prob = detect(logits, data.labels)
            paper_rule = poisoned.clone()
            classes, confirm, margin, zs = None, None, {}, None
            labels = data.labels.cpu()
            if c.detection == "confidence":
                poisoned = flag_confident(prob, threshold=c.threshold, k=c.outlier_k)
            elif c.detection == "label-aware":
                feats = None
                need_feats = c.inside == "clusters" or c.class_stat.startswith("gap")
                class_probs = {}
                if c.class_test != "enhanced" or need_feats:
                    warm = ctx.new_model(state_dict=warmup_state)
                    wctx = self._score_ctx(ctx, "detect-warmup")
                    if c.class_test != "enhanced":
                        # with no enhancement iteration the model is the warm-up model: its fit is known
                        warm_logits = logits if not records else \
                            scoring.logits(warm, data, wctx, desc="meca warm-up fit")
                        _, confirm = detect(warm_logits, data.labels)
                        margin["warmup"] = margins(warm_logits, labels)
                        if c.class_stat == "gap-separation-floor":
                            class_probs["warmup"] = torch.softmax(warm_logits.double(), 1).cpu()
                        del warm_logits
                    if need_feats:
                        feats = scoring.features(warm, data, wctx, desc="meca warm-up features").double().cpu()
                    del warm
                picked = None
                if c.class_stat != "share":
                    if c.class_test != "warmup":
                        margin["enhanced"] = margins(logits, labels)
                        if c.class_stat == "gap-separation-floor":
                            class_probs["enhanced"] = torch.softmax(logits.double(), 1).cpu()
                    zs, votes = {}, []
                    for tag, m in margin.items():
                        if c.class_stat == "spread":
                            present, z = spread_z(m, labels, q=c.spread_quantile)
                        elif c.class_stat == "gap":  # the same 2-means keys as the split inside a picked class
                            present, z = gap_z(feats, m, labels, data.ids.cpu(), ("meca-clusters", int(ctx.seed)),
                                               n_components=c.cluster_components)
                        else:
                            present, z, both = gap_separation_z(feats, m, labels, data.ids.cpu(),
                                                                ("meca-clusters", int(ctx.seed)),
                                                                n_components=c.cluster_components)
                            if c.class_stat == "gap-separation-floor":
                                # the floor's classes are the same labels (torch.unique of labels)
                                _, both["floor"] = floor_z(class_probs[tag], labels)
                                known = [v for v in both.values() if v is not None]
                                z = None if not known else functools.reduce(torch.maximum, known)
                            for name, v in both.items():
                                zs[f"{tag}-{name}"] = {int(k): (None if v is None else float(v[i]))
                                                       for i, k in enumerate(present)}
                        zs[tag] = {int(k): (None if z is None else float(z[i])) for i, k in enumerate(present)}
                        votes.append(set(classes_above(present, z, k=c.spread_k, limit=c.spread_max_classes)))
                    picked = sorted(set.intersection(*votes))
                poisoned, classes = flag_label_aware(prob, labels, high=c.confidence_high, alpha=c.class_alpha,
                                                     threshold=c.threshold, k=c.outlier_k, inside=c.inside,
                                                     quantile=c.reference_quantile, confirm=confirm,
                                                     pick="confirm" if c.class_test == "warmup" else "both",
                                                     classes=picked, features=feats, ids=data.ids.cpu(),
                                                     seed=ctx.seed, n_components=c.cluster_components,
                                                     side=c.split_side, side_cut=c.split_side_cut,
                                                     class_prob=None if c.split_side == "confident" else
                                                     torch.softmax(logits.double(), 1).cpu())
            unlearn = poisoned if not self.cores(c) else \
                cluster_cores(feats, prob, labels, data.ids.cpu(), poisoned, classes, seed=ctx.seed,
                              n_components=c.cluster_components, side=c.core_side)
            ctx.log({"stage": "meca-detect", "rule": c.detection, "detected_clean": int((~poisoned).sum()),
                     "detected_poison": int(poisoned.sum()), "suspicious_classes": classes,
                     **({"unlearn_core": int(unlearn.sum())} if self.cores(c) else {}),
                     **({} if zs is None else {f"class_{c.class_stat}_z": zs})})
            det = {"flagged_ids": data.ids[poisoned].clone(), "kept_ids": data.ids[~poisoned].clone(),
                   "classes": list(classes or []),
                   "unlearn_ids": data.ids[unlearn].clone(),
                   "ids": data.ids.clone(), "prob": prob, "poisoned": poisoned, "paper_rule": paper_rule,
                   "warmup_prob": confirm, "warmup_margin": margin.get("warmup"),
                   "seconds": time.perf_counter() - t0}
            step.save(det)
        seconds["detect"] = det["seconds"]
        if out_dir is not None:
            if c.save_models:
                save_atomic(steps.cpu_state(model), out_dir / "meca_enhanced_model.pt")
            save_atomic({"ids": data.ids.clone(),
                         "iterations": [r["iteration"] for r in records],
                         "consistency_scores": [r["scores"] for r in records],
                         "forget_ids": [r["forget_ids"] for r in records],
                         "enhanced_prob": det["prob"], "detected_poison": det["poisoned"],
                         "paper_rule_poison": det.get("paper_rule", det["poisoned"]),
                         "warmup_prob": det.get("warmup_prob"), "warmup_margin": det.get("warmup_margin")},
                        out_dir / "meca_scores.pt")
        clean_set = data.subset(data.contains(det["kept_ids"]))
        poison_set = data.subset(data.contains(det["flagged_ids"]))
        # what the clean training unlearns: the flagged set, or with clean_unlearn_core its cores
        forget_set = poison_set if not self.cores(c) else \
            data.subset(data.contains(det.get("unlearn_ids", det["flagged_ids"])))
        del model

        # per-sample suspicion: the enhanced model's p_e(y|x), in data's row order (suspected.csv, the repair)
        scores = torch.empty(n, dtype=torch.float64)
        scores[data.positions(det["ids"])] = det["prob"].double().cpu()

        # 4. clean training from scratch on the detected clean set, or the repair of the warm-up model --
        repaired, suspected = None, det["flagged_ids"]
        if repairing:  # the repair acts on the samples it unlearned: those are what it suspects
            if repair_state is None:
                clean_model, start = ctx.new_model(state_dict=warmup_state), warmup_eval
            else:  # the given model (repair_model), e.g. the fully trained plain model
                clean_model = ctx.new_model(state_dict=repair_state)
                start = ctx.evaluate(clean_model)
                ctx.log({"stage": "meca-repair-start", "loaded_from": c.repair_model, **start})
            done, repaired, suspected = self._repair(ctx, data, det, scores, clean_model, start)
        else:
            clean_model = ctx.new_model()
            step = ctx.checkpoint("meca-clean")
            done = step.load()
            if done is not None:
                clean_model.load_state_dict(done["model"])
                resumed.append("clean")
            else:
                t0 = time.perf_counter()
                st = ctx.stage("meca-clean", evaluate_each_epoch=c.evaluate_each_epoch,
                               lr_setting="[defense] semi.lr" if semi else "[train] lr")
                clean_trainer.fit(clean_model, clean_set, st, forget=forget_set if self.unlearns(c) else None,
                                  unlabelled=poison_set if semi and len(poison_set) else None)
                ev = ctx.evaluate(clean_model)
                ctx.log({"stage": "meca-clean", "train_size": len(clean_set),
                         "unlearned": len(forget_set) if self.unlearns(c) else 0,
                         "unlabelled": len(poison_set) if semi else 0, **ev})
                done = {"model": steps.cpu_state(clean_model), "eval": ev, "seconds": time.perf_counter() - t0}
                step.save(done)
        seconds["repair" if repairing else "clean_train"] = done["seconds"]
        clean_eval = done["eval"]
        if out_dir is not None and c.save_models:
            save_atomic(steps.cpu_state(clean_model), out_dir / "meca_clean_model.pt")

        # 5. optional second look and relabel and relearn ----------------------------------------
        relearn_metrics = None
        picked = det.get("classes", [])
        if c.relearn or (rechecks and picked):
            step = ctx.checkpoint("meca-relearn")
            done = step.load()
            if done is not None:
                clean_model.load_state_dict(done["model"])
                resumed.append("relearn")
            else:
                done = self.relabel_and_relearn(ctx, data, det, clean_model, relearner,
                                                picked if rechecks else [])
                step.save(done)
            seconds["relearn"] = done["seconds"]
            rechecked = done.get("rechecked_ids", data.ids[:0].cpu())
            relearn_metrics = {"relabelled": done["relabelled"], "label_changed": done["label_changed"],
                               "rechecked": len(rechecked), "cuts": {str(k): v for k, v in done.get("cuts", {}).items()},
                               **done["eval"]}
            if len(done.get("rounds", [])) > 1:
                relearn_metrics["rounds"] = done["rounds"]
            if len(rechecked):
                suspected = torch.cat([suspected.cpu(), rechecked.cpu()])

        # report ---------------------------------------------------------------------------
        plot = None  # stays None without a run directory or without matplotlib (the `plots` extra)
        if out_dir is not None:
            from bdframe import plots

            drawn = plots.trend([t["clean_acc"] for t in trend], [t["asr"] for t in trend],
                                out_dir / "meca_trend.png")
            plot = drawn["file"] if drawn else None
        seconds["total_this_session"] = time.perf_counter() - t_run
        n_p = len(det["flagged_ids"])
        metrics = {
            "trend": trend,
            "split": {"clean": n - n_p, "poison": n_p, "poison_share": n_p / n,
                      "unlearned": len(forget_set) if self.unlearns(c) else 0},
            "clean_model": dict(clean_eval),
            "relearn": relearn_metrics,
            "repair": repaired,
            "stage_seconds": seconds,
            "resumed_stages": resumed,
            "plot": plot,
        }
        warm_src = f"loaded from {c.warmup_model}" if c.warmup_model else "all data, no defense yet"
        summary = [f"meca: warm-up model ({warm_src}): {steps.figures(trend[0])}"]
        if len(trend) > 1:
            summary.append(f"meca: enhanced model after {len(trend) - 1} iterations: {steps.figures(trend[-1])}")
        summary.append(f"meca: detected {n_p} of {n} samples as poisoned ({100 * n_p / n:.1f}%)")
        if repaired is not None:
            stop = (f", stopped once the fit of the unlearned set levelled off at "
                    f"{100 * repaired['trend'][-1]['fit_poisoned']:.1f}%" if repaired["stopped"] else "")
            which = "warm-up model" if repaired["model"] == "warm-up" else f"model {repaired['model']}"
            summary.append(f"meca: {which} repaired ({repaired['unlearned']} unlearned, {repaired['relearned']} "
                           f"relearned, {repaired['rounds']} rounds{stop}): {steps.figures(clean_eval)}")
        else:
            # clean_unlearn is unused with clean_stage = "semi" (unlearns)
            flagged_use = (f", with the {n_p} flagged as unlabelled data" if semi else
                           f", unlearning {len(forget_set)} of the {n_p} flagged (their cores) and leaving out the "
                           f"rest" if self.cores(c) else
                           f", unlearning the {n_p} flagged" if self.unlearns(c) else "")
            summary.append(f"meca: clean model trained on the {n - n_p} kept samples{flagged_use}: {steps.figures(clean_eval)}"
                           + ("" if relearn_metrics is None or relearn_metrics["rechecked"] else
                              f"; after relabel-and-relearn: {steps.figures(relearn_metrics)}"))
            if relearn_metrics is not None and relearn_metrics["rechecked"]:
                names = ", ".join(f"{k} ({data.classes[k]})" if data.classes and k < len(data.classes) else str(k)
                                  for k in picked)
                cuts = "/".join(f"{v:.2f}" for v in relearn_metrics["cuts"].values())
                n_rounds = len(relearn_metrics.get("rounds", [])) or 1
                summary.append(f"meca: second look: the clean model flagged {relearn_metrics['rechecked']} more of "
                               f"class{'es' if len(picked) > 1 else ''} {names}"
                               + (f" in {n_rounds} rounds" if n_rounds > 1 else "")
                               + (f", p(label) < {cuts}; " if cuts else "; ")
                               + (f"after relearning the {relearn_metrics['label_changed']} of the "
                                  f"{relearn_metrics['relabelled']} flagged that it relabelled"
                                  if c.relabel == "changed" else
                                  f"after relabelling the {relearn_metrics['relabelled']} flagged and relearning")
                               + f": {steps.figures(relearn_metrics)}")
        return DefenseResult(model=clean_model, suspected_ids=suspected.clone(), scores=scores,
                             metrics=metrics, summary=summary)


@hookimpl
def bdframe_register_defenses(registry):
    registry.add(MeCa)
