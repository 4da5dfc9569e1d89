"""``tact``: source-specific backdoor with covers ("Demon in the Variant", Tang et al. 2021),
see docs/attacks.md, TaCT.

Dirty-label, source-specific:

- poison: ``int(N * poison_rate)`` random images **of the source class only** (N = the whole
  training set) get the trigger and the target label;
- cover: ``int(N * cover_rate)`` random images pooled from ``cover_classes`` get the same
  trigger and keep their true labels, so the trigger alone does not flip a prediction.

When a class pool is smaller than its count, ``too_few = "cap"`` (default) takes the whole
pool and ``"error"`` raises. Default trigger (MeCa): a white 3x3 square at the bottom right,
alpha 1, source 0 -> target 1, covers from classes 5 and 7 (the backdoor-toolbox cover
classes); ``pattern = "trojan-square"`` is the toolbox 8x8 trojan patch substitute (rows/cols
21-28). Poisoned test set: the trigger on the **source-class** test images only, labelled with
the target (the ASR denominator).
"""

from __future__ import annotations

from typing import Optional

import attrs

from bdframe import hookimpl
from bdframe.config import each, in_range, one_of
from bdframe.interfaces import PoisonedSet
from bdframe_attack_common import POSITIONS
from bdframe_attack_common.base import MaskTriggerAttack, select_rows


@attrs.frozen
class TaCTConfig:
    poison_rate: float = attrs.field(default=0.05, validator=in_range(0, 1, lo_open=True, hi_open=True), metadata={
        "help": "poisoned images as a fraction of the whole training set, drawn from the source class"})
    cover_rate: float = attrs.field(default=0.01, validator=in_range(0, 1, hi_open=True), metadata={
        "help": "cover images (trigger, true label) as a fraction of the training set, from cover_classes"})
    source: int = attrs.field(default=0, validator=in_range(0, None), metadata={"help": "source class"})
    target: int = attrs.field(default=1, validator=in_range(0, None), metadata={"help": "target class"})
    cover_classes: tuple[int, ...] = attrs.field(default=(5, 7), converter=tuple, validator=each(in_range(0, None)),
                                                 metadata={"help": "classes the cover images are drawn from"})
    pattern: str = attrs.field(default="white-square", validator=one_of("white-square", "trojan-square"), metadata={
        "help": "built-in trigger: white square at position (MeCa) or the 8x8 trojan square (toolbox)"})
    patch_size: int = attrs.field(default=3, validator=in_range(1, None),
                                  metadata={"help": "side of the white-square pattern"})
    position: str = attrs.field(default="bottom-right", validator=one_of(*POSITIONS),
                                metadata={"help": "corner of the white-square pattern"})
    alpha: float = attrs.field(default=1.0, validator=in_range(0, 1, lo_open=True),
                               metadata={"help": "opacity of the trigger under its mask"})
    trigger_image: Optional[str] = attrs.field(default=None, metadata={
        "help": "full-frame trigger image (PNG/JPEG), resized to the data; replaces the built-in pattern"})
    mask_image: Optional[str] = attrs.field(default=None, metadata={
        "help": "mask for trigger_image (first channel; default: its non-black pixels)"})
    too_few: str = attrs.field(default="cap", validator=one_of("cap", "error"), metadata={
        "help": "when the source class (or the cover classes) has fewer images than requested: "
                "'cap' (take them all) or 'error'"})

    def check(self):
        out = []
        if self.source == self.target:
            out.append(("target", f"must differ from source ({self.source})"))
        bad = [k for k in self.cover_classes if k in (self.source, self.target)]
        if bad:
            out.append(("cover_classes", f"must exclude the source ({self.source}) and target ({self.target}) "
                                         f"classes, got {list(self.cover_classes)}"))
        if len(set(self.cover_classes)) != len(self.cover_classes):
            out.append(("cover_classes", f"must not repeat a class, got {list(self.cover_classes)}"))
        if self.cover_rate > 0 and not self.cover_classes:
            out.append(("cover_classes", "must name at least one class when cover_rate > 0"))
        if self.mask_image and not self.trigger_image:
            out.append(("mask_image", "needs trigger_image"))
        return out


class TaCT(MaskTriggerAttack):
    name = "tact"
    Config = TaCTConfig
    summary = "TaCT source-specific patch trigger (source 0 -> target 1) with cover classes"
    class_fields = ("source", "target")

    def trigger_problems(self, info):
        from bdframe_attack_common.triggers import patch_trigger_problems

        c = self.config
        k = info.num_classes
        out = []
        bad = [x for x in c.cover_classes if x >= k]
        if bad:
            out.append(("cover_classes", f"must be class indices in [0, {k - 1}], got {bad}"))
        return out + patch_trigger_problems(c, info)

    def builtin_trigger(self, channels: int, height: int, width: int):
        from bdframe_attack_common import patterns

        c = self.config
        if c.pattern == "trojan-square":
            return patterns.get("trojan-square", channels, height, width)
        return patterns.get("white-square", channels, height, width, size=c.patch_size, position=c.position)

    def _draw(self, train, pool, wanted, g, field, what):
        from bdframe.errors import UserError

        available = int(pool.sum())
        if wanted > available and self.config.too_few == "error":
            raise UserError(f"$.attack.{field}: tact needs int({len(train)} * {getattr(self.config, field)}) = "
                            f"{wanted} {what} images but the training set has {available} "
                            f"(lower {field} or set too_few = \"cap\")")
        return select_rows(train, [wanted], g, pool=pool)[0]

    def poison_train(self, train, *, seed):
        import torch

        from bdframe.seeding import generator

        c = self.config
        n = len(train)
        want_p, want_c = int(n * c.poison_rate), int(n * c.cover_rate)
        poison_rows = self._draw(train, train.labels == c.source, want_p, generator(seed, "tact", "poison"),
                                 "poison_rate", f"source-class ({c.source})")
        cover_pool = torch.isin(train.labels, torch.tensor(c.cover_classes, dtype=torch.int64))
        cover_rows = self._draw(train, cover_pool, want_c, generator(seed, "tact", "cover"),
                                "cover_rate", f"cover-class ({list(c.cover_classes)})")
        data = self.relabelled(train, self.stamp(train.images, torch.cat([poison_rows, cover_rows])), poison_rows)
        return PoisonedSet(data=data, poison_ids=train.ids[poison_rows].clone(),
                           cover_ids=train.ids[cover_rows].clone(),
                           meta={"trigger_sha256": self.trigger_sha256(train.images), "source": c.source,
                                 "target": c.target, "cover_classes": list(c.cover_classes),
                                 "requested_poison": want_p, "requested_cover": want_c})

    def asr_rows(self, test):
        """TaCT's ASR set: the source-class test images."""
        return test.labels == self.config.source


@hookimpl
def bdframe_register_attacks(registry):
    registry.add(TaCT)
