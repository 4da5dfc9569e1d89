"""``timm``: any timm architecture by name (``arch = "resnet18"``, ``"convnext_nano"``, ...).

The net is created with the dataset's channels and classes. Pretrained weights are fetched by
timm from its hub when ``pretrained = true`` (needs internet, and the weights' input
resolution and normalisation are the user's concern). Features for scorers are timm's
pre-logits (pooled) features, logits its classifier on them.
"""

from __future__ import annotations

import attrs

from bdframe import hookimpl
from bdframe.errors import UserError
from bdframe.interfaces import ModelFactory


@attrs.frozen
class TimmConfig:
    arch: str = attrs.field(default="resnet18", metadata={"help": "timm model name (timm.list_models())"})
    pretrained: bool = False
    drop_rate: float = 0.0

    def check(self):
        import difflib

        import timm

        names = timm.list_models()
        if self.arch not in names:
            close = difflib.get_close_matches(self.arch, names, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            return [("arch", f"unknown timm model {self.arch!r}{hint} (see timm.list_models())")]
        return []


class Timm(ModelFactory):
    name = "timm"
    Config = TimmConfig
    summary = "any timm architecture by name"

    def build(self, info):
        import timm
        from torch import nn

        c = self.config
        try:
            model = timm.create_model(c.arch, pretrained=c.pretrained, num_classes=info.num_classes,
                                      in_chans=info.channels, drop_rate=c.drop_rate)
        except Exception as e:  # e.g. no internet for pretrained weights
            raise UserError(f"$.model: timm could not create {c.arch!r}: {e}") from None

        class TimmNet(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward_features(self, x):
                return self.m.forward_head(self.m.forward_features(x), pre_logits=True)

            def forward_head(self, f):
                return self.m.get_classifier()(f)

            def forward(self, x):
                return self.m(x)

        return TimmNet(model)


@hookimpl
def bdframe_register_models(registry):
    registry.add(Timm)
