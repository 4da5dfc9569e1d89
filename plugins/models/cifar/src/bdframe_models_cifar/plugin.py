"""Model factories for small images. Networks are built lazily (torch imported on build)."""

from __future__ import annotations

import attrs

from bdframe import hookimpl
from bdframe.config import in_range, one_of
from bdframe.interfaces import ModelFactory


@attrs.frozen
class SimpleCNNConfig:
    width: int = attrs.field(default=16, validator=in_range(4, 512),
                             metadata={"help": "channels of the first stage; later stages double it"})
    pool: str = attrs.field(default="max", validator=one_of("max", "avg"), metadata={"help": "global pooling"})
    logit_scale: float = attrs.field(default=0.125, validator=in_range(0, None, lo_open=True), metadata={
        "help": "multiplier on the logits (ResNet-9's 0.125 keeps early training stable with max pooling)"})


class SimpleCNN(ModelFactory):
    """A ResNet-9-style net (conv stem, three pooled stages, two residual blocks) sized for
    CPUs: about 0.4M parameters at the default width 16."""

    name = "simple-cnn"
    Config = SimpleCNNConfig
    summary = "fast CPU-sized residual CNN (ResNet-9 layout, configurable width)"

    def build(self, info):
        from bdframe_models_cifar.nets import SimpleCNNNet

        import torch

        # channels-last memory layout is markedly faster for these convolutions on CPU
        return SimpleCNNNet(info.channels, info.num_classes, self.config.width, self.config.pool,
                            self.config.logit_scale).to(memory_format=torch.channels_last)


def _widths(instance, attribute, value):
    sequence = isinstance(value, (tuple, list))
    if not sequence or len(value) != 3 or any(
            not isinstance(v, int) or isinstance(v, bool) or not 4 <= v <= 1024 for v in value):
        raise ValueError(f"must be three integers between 4 and 1024, got {list(value) if sequence else value!r}")


@attrs.frozen
class FastCNNConfig:
    widths: tuple[int, ...] = attrs.field(default=(24, 96, 96), converter=tuple, validator=_widths, metadata={
        "help": "channels of the three conv groups"})
    whiten: bool = attrs.field(default=True, metadata={
        "help": "first layer: frozen 2x2 whitening filters computed from the training images (false: a trained conv)"})
    logit_scale: float = attrs.field(default=1 / 9, validator=in_range(0, None, lo_open=True), metadata={
        "help": "multiplier on the logits"})
    bn_lr_scale: float = attrs.field(default=64.0, validator=in_range(0, None, lo_open=True), metadata={
        "help": "learning-rate multiplier of the BatchNorm shifts under SGD (their scales are fixed at 1)"})


class FastCNN(ModelFactory):
    """A lean net for fast CIFAR training on CPUs: a frozen whitening first layer initialised
    from the training images, three conv groups (conv, max-pool, BN, GELU, conv, BN, GELU),
    a final max-pool and a scaled linear head."""

    name = "fast-cnn"
    Config = FastCNNConfig
    summary = "fast CPU net: whitened 2x2 stem, three GELU conv groups (about 0.28M parameters by default)"

    def build(self, info):
        from bdframe_models_cifar.nets import FastNet

        import torch

        c = self.config
        return FastNet(info.channels, info.num_classes, c.widths, c.logit_scale, c.whiten,
                       c.bn_lr_scale).to(memory_format=torch.channels_last)


@attrs.frozen
class ResNetConfig:
    width: int = attrs.field(default=64, validator=in_range(4, 512))


def _resnet(arch: str, summary_: str):
    class _F(ModelFactory):
        name = arch
        Config = ResNetConfig
        summary = summary_

        def build(self, info):
            from bdframe_models_cifar import nets

            return nets.build(arch, info.channels, info.num_classes, self.config.width)

    _F.__name__ = _F.__qualname__ = "".join(p.capitalize() for p in arch.split("-")) + "Factory"
    return _F


PreActResNet18 = _resnet("preact-resnet18", "PreAct-ResNet-18 for 32x32 inputs (3x3 stem, no max-pool)")
ResNet18 = _resnet("resnet18", "ResNet-18 adapted to 32x32 inputs (3x3 stem, no max-pool)")
ResNet34 = _resnet("resnet34", "ResNet-34 adapted to 32x32 inputs (3x3 stem, no max-pool)")


@attrs.frozen
class MobileNetConfig:
    width_mult: float = attrs.field(default=1.0, validator=in_range(0.1, 4.0))


class MobileNetV2(ModelFactory):
    name = "mobilenetv2"
    Config = MobileNetConfig
    summary = "MobileNetV2 adapted to 32x32 inputs (stride-1 stem and first stages)"

    def build(self, info):
        from bdframe_models_cifar.nets import MobileNetV2Net

        return MobileNetV2Net(info.channels, info.num_classes, self.config.width_mult)


@hookimpl
def bdframe_register_models(registry):
    for cls in (SimpleCNN, FastCNN, PreActResNet18, ResNet18, ResNet34, MobileNetV2):
        registry.add(cls)
