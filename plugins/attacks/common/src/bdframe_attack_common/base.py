"""Base classes of the trigger attacks (badnet, blend, sig, wanet, physicalba, tact,
adaptive-blend, adaptive-patch): what they share, so each attack's module holds only what is
its own.

- :func:`select_rows`: the id-ordered draw of poison (and cover) rows.
- :class:`TriggerAttack`: class-index checks of ``check_dataset``, the ASR set of
  ``poison_test`` (the eligible test images with the test trigger, labelled with the target)
  and the relabelling of poisoned rows.
- :class:`MaskTriggerAttack`: one ``(pattern, mask)`` trigger, a built-in pattern or the
  ``trigger_image`` / ``mask_image`` files of the config, mask-blended at an opacity.

torch is imported inside the functions, so importing an attack plugin stays light.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Optional, Sequence

from bdframe.interfaces import Attack


def select_rows(train, counts: Sequence[int], generator, *, pool=None) -> list:
    """Row positions drawn without replacement, one tensor per entry of ``counts``.

    The candidates (the rows where the bool mask ``pool`` is True, default every row) are put
    in id order and permuted with ``generator``; the permutation is cut into consecutive parts
    of ``counts`` (a part is shorter when the candidates run out) and each part is returned
    sorted by id. The same ids are drawn whatever the row order of ``train``.
    """
    import torch

    cand = torch.arange(len(train)) if pool is None else torch.nonzero(pool).flatten()
    cand = cand[torch.argsort(train.ids[cand])]
    perm = cand[torch.randperm(len(cand), generator=generator)]
    out, start = [], 0
    for count in counts:
        part = perm[start:start + count]
        out.append(part[torch.argsort(train.ids[part])])
        start += count
    return out


class TriggerAttack(Attack):
    """An attack that puts a trigger on images and relabels them with ``config.target``.

    A subclass writes ``poison_train`` and :meth:`test_trigger`; it may extend
    :meth:`trigger_problems` (dataset checks beyond the class indices) and :meth:`asr_rows`.
    """

    #: config fields holding class indices, checked against the dataset's classes
    class_fields: ClassVar[tuple[str, ...]] = ("target",)

    def check_dataset(self, info):
        from bdframe_attack_common.triggers import class_problems

        return class_problems(self.config, info.num_classes, self.class_fields) + self.trigger_problems(info)

    def trigger_problems(self, info) -> list[tuple[str, str]]:
        """Dataset checks after the class indices: ``(field, message)`` pairs."""
        return []

    def asr_rows(self, test):
        """Bool mask of the test images eligible for the ASR set: all-to-one, the non-target ones."""
        return test.labels != self.config.target

    def test_trigger(self, channels: int, height: int, width: int) -> Callable:
        """The test-time trigger: a function of float images (N,C,H,W) in [0,1]."""
        raise NotImplementedError

    def poison_test(self, test):
        import torch

        from bdframe_attack_common.triggers import apply_to_rows

        sub = test.subset(self.asr_rows(test))
        images = apply_to_rows(sub.images, torch.arange(len(sub)), self.test_trigger(*sub.images.shape[1:]))
        return sub.with_images(images).with_labels(torch.full((len(sub),), self.config.target, dtype=torch.int64))

    def relabelled(self, train, images, poison_rows):
        """``train`` with ``images`` and the target label on ``poison_rows``."""
        labels = train.labels.clone()
        labels[poison_rows] = self.config.target
        return train.with_images(images).with_labels(labels)


class MaskTriggerAttack(TriggerAttack):
    """One ``(pattern, mask)`` trigger, ``x' = x + alpha * mask * (pattern - x)``.

    The config has ``trigger_image`` and ``mask_image``; without a trigger file the subclass's
    :meth:`builtin_trigger` is used. The test trigger is the same at :attr:`test_alpha`.
    """

    #: mask of a trigger file given without a mask file: every pixel (True, blends) or the
    #: trigger's non-black pixels (False, patches)
    full_frame: ClassVar[bool] = False

    def builtin_trigger(self, channels: int, height: int, width: int):
        """``(pattern, mask)`` of the built-in trigger, float (C,H,W) and (1,H,W)."""
        raise NotImplementedError

    def trigger(self, channels: int, height: int, width: int):
        """``(pattern, mask)``, float (C,H,W) and (1,H,W): the trigger file or the built-in trigger."""
        from bdframe_attack_common.triggers import image_trigger

        c = self.config
        if c.trigger_image:
            return image_trigger(c.trigger_image, c.mask_image, "$.attack.trigger_image", height, width, channels,
                                 full_frame=self.full_frame)
        return self.builtin_trigger(channels, height, width)

    def trigger_sha256(self, images) -> str:
        """Hash of the trigger at the size of ``images`` (N,C,H,W), recorded in ``meta``."""
        from bdframe_attack_common.triggers import trigger_hash

        return trigger_hash(*self.trigger(*images.shape[1:]))

    @property
    def test_alpha(self) -> float:
        return self.config.alpha

    def stamp(self, images, rows, alpha: Optional[float] = None):
        """A copy of uint8 ``images`` with the trigger blended into ``rows`` at ``alpha``
        (default ``config.alpha``)."""
        from bdframe_attack_common.triggers import apply_to_rows, mask_blend

        alpha = self.config.alpha if alpha is None else alpha
        pattern, mask = self.trigger(*images.shape[1:])
        return apply_to_rows(images, rows, lambda x: mask_blend(x, pattern, mask, alpha))

    def test_trigger(self, channels: int, height: int, width: int):
        from bdframe_attack_common.triggers import mask_blend

        pattern, mask = self.trigger(channels, height, width)
        alpha = self.test_alpha
        return lambda x: mask_blend(x, pattern, mask, alpha)
