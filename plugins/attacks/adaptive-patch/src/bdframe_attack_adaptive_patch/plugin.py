"""``adaptive-patch``: Adaptive-Patch (Qi et al., ICLR 2023); see docs/attacks.md, Adaptive-Patch.

Dirty-label, all-to-one, with covers. One random permutation of the training set (in id
order): the first ``int(N * poison_rate)`` images are poisoned (label -> target), the next
``int(N * cover_rate)`` are covers (true label kept).

There are k training triggers, one per sample, each mask-blended at its own alpha. The
poison list, sorted by id, is cut into k equal consecutive parts: poison number p uses trigger
``j = floor(p * k / num_poison)`` (the smallest j with p < (j+1) * num_poison / k); covers are
split the same way. At test time several triggers are applied at once (the train/test
asymmetry of the attack).

Presets (built-in patterns from :mod:`bdframe_attack_common.patterns`):

- ``firefox-x4`` (default, MeCa "Firefox x4"): the four quadrants of the 13x13 Firefox-icon
  substitute (rows 1-7 / 8-13 x cols 18-24 / 25-30 on 32x32), alpha 1 each; test = all four
  at alpha 1, which is exactly the whole icon.
- ``toolbox`` (backdoor-toolbox CIFAR-10 default): phoenix corner 0.5, Firefox corner 0.2,
  badnet X patch in four corners 0.5, trojan square 0.3; test = phoenix at both bottom
  corners + the four-corner X patch, alpha 1.
- ``hellokitty-x4`` (the other commented-out toolbox setting): the four 16x16 quadrants of the
  Hello-Kitty substitute at 0.2; test = all four at 0.2 (the full picture at 0.2).

User files: ``trigger_images`` (and optional ``mask_images``, "" = non-black pixels) replace the
preset's training triggers (alphas: ``train_alphas``, default 1 each); ``test_trigger_images``
(optional ``test_mask_images``) replace the test triggers, which default to all training
triggers stacked at ``test_alpha`` for user triggers. Per-sample trigger numbers are recorded
in ``meta`` (aligned with the sorted ``poison_ids`` / ``cover_ids``). Poisoned test set: every
non-target test image, labelled with the target.
"""

from __future__ import annotations

from typing import Optional

import attrs

from bdframe import hookimpl
from bdframe.config import each, in_range, one_of
from bdframe.interfaces import PoisonedSet
from bdframe_attack_common.base import TriggerAttack, select_rows

# preset -> (training triggers [(pattern name, alpha)], test triggers [pattern name], test alpha)
PRESETS = {
    "firefox-x4": ([(f"firefox-corner-split-{k}", 1.0) for k in (1, 2, 3, 4)],
                   [f"firefox-corner-split-{k}" for k in (1, 2, 3, 4)], 1.0),
    "toolbox": ([("phoenix-corner", 0.5), ("firefox-corner", 0.2), ("badnet-patch4", 0.5), ("trojan-square", 0.3)],
                ["phoenix-corner2", "badnet-patch4"], 1.0),
    "hellokitty-x4": ([(f"hellokitty-split-{k}", 0.2) for k in (1, 2, 3, 4)],
                      [f"hellokitty-split-{k}" for k in (1, 2, 3, 4)], 0.2),
}


def _opt_tuple(v):
    return None if v is None else tuple(v)


@attrs.frozen
class AdaptivePatchConfig:
    poison_rate: float = attrs.field(default=0.05, validator=in_range(0, 1, lo_open=True, hi_open=True),
                                     metadata={"help": "fraction of the training set poisoned"})
    cover_rate: float = attrs.field(default=0.01, validator=in_range(0, 1, hi_open=True), metadata={
        "help": "fraction of the training set given a training trigger with the true label"})
    target: int = attrs.field(default=1, validator=in_range(0, None), metadata={"help": "target class"})
    preset: str = attrs.field(default="firefox-x4", validator=one_of(*PRESETS), metadata={
        "help": "built-in trigger set: firefox-x4 (MeCa), toolbox (backdoor-toolbox default), hellokitty-x4"})
    train_alphas: Optional[tuple[float, ...]] = attrs.field(
        default=None, converter=_opt_tuple, validator=each(in_range(0, 1, lo_open=True)),
        metadata={"help": "per-trigger training opacity (default: the preset's, or 1 for trigger_images)"})
    test_alpha: Optional[float] = attrs.field(default=None, validator=in_range(0, 1, lo_open=True), metadata={
        "help": "opacity of the stacked test triggers (default: the preset's, or 1 for trigger_images)"})
    trigger_images: Optional[tuple[str, ...]] = attrs.field(default=None, converter=_opt_tuple, metadata={
        "help": "training trigger images (PNG/JPEG, full frame, resized), one per trigger; replace the preset"})
    mask_images: Optional[tuple[str, ...]] = attrs.field(default=None, converter=_opt_tuple, metadata={
        "help": "masks for trigger_images, same length ('' = the trigger's non-black pixels)"})
    test_trigger_images: Optional[tuple[str, ...]] = attrs.field(default=None, converter=_opt_tuple, metadata={
        "help": "test trigger images, all applied at once (default: the preset's, or all trigger_images)"})
    test_mask_images: Optional[tuple[str, ...]] = attrs.field(default=None, converter=_opt_tuple, metadata={
        "help": "masks for test_trigger_images, same length ('' = non-black pixels)"})

    @property
    def num_triggers(self) -> int:
        return len(self.trigger_images) if self.trigger_images else len(PRESETS[self.preset][0])

    def check(self):
        out = []
        if self.poison_rate + self.cover_rate > 1:
            out.append(("cover_rate", f"poison_rate + cover_rate must be <= 1, got "
                                      f"{self.poison_rate} + {self.cover_rate}"))
        if self.trigger_images is not None and not self.trigger_images:
            out.append(("trigger_images", "must name at least one image"))
        if self.test_trigger_images is not None and not self.test_trigger_images:
            out.append(("test_trigger_images", "must name at least one image"))
        if self.train_alphas is not None and len(self.train_alphas) != self.num_triggers:
            out.append(("train_alphas", f"needs one alpha per training trigger ({self.num_triggers}), "
                                        f"got {len(self.train_alphas)}"))
        for masks, images in (("mask_images", "trigger_images"), ("test_mask_images", "test_trigger_images")):
            m, t = getattr(self, masks), getattr(self, images)
            if m is not None:
                if not t:
                    out.append((masks, f"needs {images}"))
                elif len(m) != len(t):
                    out.append((masks, f"needs one entry per {images} entry ({len(t)}), got {len(m)}"))
        return out


class AdaptivePatch(TriggerAttack):
    name = "adaptive-patch"
    Config = AdaptivePatchConfig
    summary = "Adaptive-Patch: k patch triggers (Firefox x4), one per sample, stacked at test; with covers"

    def trigger_problems(self, info):
        from bdframe_attack_common import patterns
        from bdframe_attack_common.triggers import channel_problems, image_file_problem

        c = self.config
        out = channel_problems(info, "preset")
        train, test, _ = PRESETS[c.preset]
        used = ([] if c.trigger_images else [n for n, _ in train]) + \
               ([] if c.test_trigger_images or c.trigger_images else test)
        for name in dict.fromkeys(used):
            problem = patterns.size_problem(name, info.height, info.width)
            if problem:
                out.append(("preset", problem))
                break
        for f in ("trigger_images", "mask_images", "test_trigger_images", "test_mask_images"):
            for i, v in enumerate(getattr(c, f) or ()):
                problem = image_file_problem(v) if v else None
                if problem:
                    out.append((f"{f}[{i}]", problem))
        return out

    def _files(self, images, masks, field, channels, height, width):
        from bdframe_attack_common.triggers import image_trigger

        masks = masks or ("",) * len(images)
        return [image_trigger(t, m or None, f"$.attack.{field}[{i}]", height, width, channels)
                for i, (t, m) in enumerate(zip(images, masks))]

    def train_triggers(self, channels: int, height: int, width: int):
        """``[(pattern, mask, alpha)]`` of the k training triggers."""
        from bdframe_attack_common import patterns

        c = self.config
        train, _, _ = PRESETS[c.preset]
        if c.trigger_images:
            pm = self._files(c.trigger_images, c.mask_images, "trigger_images", channels, height, width)
            alphas = c.train_alphas or (1.0,) * len(pm)
        else:
            pm = [patterns.get(name, channels, height, width) for name, _ in train]
            alphas = c.train_alphas or tuple(a for _, a in train)
        return [(p, m, float(a)) for (p, m), a in zip(pm, alphas)]

    def test_triggers(self, channels: int, height: int, width: int):
        """``[(pattern, mask, alpha)]`` applied one after the other to every test image."""
        from bdframe_attack_common import patterns

        c = self.config
        _, test, preset_alpha = PRESETS[c.preset]
        if c.test_trigger_images:
            pm = self._files(c.test_trigger_images, c.test_mask_images, "test_trigger_images", channels, height, width)
            alpha = 1.0 if c.test_alpha is None else c.test_alpha
        elif c.trigger_images:
            pm = [(p, m) for p, m, _ in self.train_triggers(channels, height, width)]
            alpha = 1.0 if c.test_alpha is None else c.test_alpha
        else:
            pm = [patterns.get(name, channels, height, width) for name in test]
            alpha = preset_alpha if c.test_alpha is None else c.test_alpha
        return [(p, m, float(alpha)) for p, m in pm]

    @staticmethod
    def assign(count: int, k: int):
        """Trigger number of each of ``count`` consecutive samples: k equal consecutive parts."""
        import torch

        if count == 0:
            return torch.empty(0, dtype=torch.int64)
        return torch.arange(count, dtype=torch.int64) * k // count

    def poison_train(self, train, *, seed):
        import torch

        from bdframe.data import to_float, to_uint8
        from bdframe.seeding import generator
        from bdframe_attack_common.triggers import mask_blend, trigger_hash

        c = self.config
        n, ch, h, w = train.images.shape
        n_poison, n_cover = int(n * c.poison_rate), int(n * c.cover_rate)
        p_rows, c_rows = select_rows(train, [n_poison, n_cover], generator(seed, "adaptive-patch", "select"))
        triggers = self.train_triggers(ch, h, w)
        k = len(triggers)
        p_trig, c_trig = self.assign(len(p_rows), k), self.assign(len(c_rows), k)
        rows, which = torch.cat([p_rows, c_rows]), torch.cat([p_trig, c_trig])
        images = train.images.clone()
        for j, (pattern, mask, alpha) in enumerate(triggers):
            sel = rows[which == j]
            if len(sel):
                images[sel] = to_uint8(mask_blend(to_float(train.images[sel]), pattern, mask, alpha))
        data = self.relabelled(train, images, p_rows)
        tests = self.test_triggers(ch, h, w)
        return PoisonedSet(data=data, poison_ids=train.ids[p_rows].clone(), cover_ids=train.ids[c_rows].clone(),
                           meta={"target": c.target, "preset": None if c.trigger_images else c.preset,
                                 "train_triggers": [{"sha256": trigger_hash(p, m), "alpha": a} for p, m, a in triggers],
                                 "test_triggers": [{"sha256": trigger_hash(p, m), "alpha": a} for p, m, a in tests],
                                 "poison_trigger": p_trig.tolist(), "cover_trigger": c_trig.tolist()})

    def test_trigger(self, channels: int, height: int, width: int):
        from bdframe_attack_common.triggers import mask_blend

        triggers = self.test_triggers(channels, height, width)

        def stack(x):
            for pattern, mask, alpha in triggers:
                x = mask_blend(x, pattern, mask, alpha)
            return x

        return stack


@hookimpl
def bdframe_register_attacks(registry):
    registry.add(AdaptivePatch)
