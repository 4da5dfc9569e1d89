"""Network definitions. Each net exposes ``forward_features`` (pooled penultimate feature)
and ``forward_head`` (the linear classifier), which the core's Classifier wrapper uses."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def conv_bn(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a = conv_bn(c, c)
        self.b = conv_bn(c, c)

    def forward(self, x):
        return x + self.b(self.a(x))


class SimpleCNNNet(nn.Module):
    """ResNet-9 layout (Page, 2018) at a configurable width w: stem w, then stages 2w/4w/8w,
    each conv + max-pool, residual blocks after the first and last stage."""

    def __init__(self, in_ch: int, num_classes: int, w: int = 32, pool: str = "max", logit_scale: float = 0.125):
        super().__init__()
        self.pool = pool
        self.logit_scale = logit_scale
        self.body = nn.Sequential(
            conv_bn(in_ch, w),
            conv_bn(w, 2 * w), nn.MaxPool2d(2), Residual(2 * w),
            conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
            conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), Residual(8 * w),
        )
        self.fc = nn.Linear(8 * w, num_classes)

    def forward_features(self, x):
        x = x.contiguous(memory_format=torch.channels_last)
        pool = F.adaptive_max_pool2d if self.pool == "max" else F.adaptive_avg_pool2d
        return torch.flatten(pool(self.body(x), 1), 1)

    def forward_head(self, f):
        return self.fc(f) * self.logit_scale

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + sc


class ResNet(nn.Module):
    """ResNet for small images: 3x3 stride-1 stem, no max-pool, four stages."""

    def __init__(self, block, layers, in_ch, num_classes, w=64, preact=False):
        super().__init__()
        self.preact = preact
        self.conv1 = nn.Conv2d(in_ch, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w) if not preact else nn.Identity()
        cin = w
        stages = []
        for i, n in enumerate(layers):
            cout = w * 2 ** i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.final_bn = nn.BatchNorm2d(cin) if preact else nn.Identity()
        self.fc = nn.Linear(cin, num_classes)

    def forward_features(self, x):
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layers(out)
        if self.preact:
            out = F.relu(self.final_bn(out))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward_head(self, f):
        return self.fc(f)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(inplace=True), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2Net(nn.Module):
    # (expansion, channels, repeats, stride); strides of the stem and second stage are 1 for 32x32
    CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, in_ch, num_classes, width_mult=1.0):
        super().__init__()

        def c(v):
            return max(8, int(round(v * width_mult / 8)) * 8)

        cin = c(32)
        layers = [nn.Conv2d(in_ch, cin, 3, 1, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(inplace=True)]
        for t, ch, n, s in self.CFG:
            for i in range(n):
                layers.append(InvertedResidual(cin, c(ch), s if i == 0 else 1, t))
                cin = c(ch)
        last = c(1280) if width_mult > 1.0 else 1280
        layers += [nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(last, num_classes)

    def forward_features(self, x):
        return torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)

    def forward_head(self, f):
        return self.fc(f)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def build(arch: str, in_ch: int, num_classes: int, w: int = 64) -> nn.Module:
    if arch == "resnet18":
        return ResNet(BasicBlock, [2, 2, 2, 2], in_ch, num_classes, w)
    if arch == "resnet34":
        return ResNet(BasicBlock, [3, 4, 6, 3], in_ch, num_classes, w)
    if arch == "preact-resnet18":
        return ResNet(PreActBlock, [2, 2, 2, 2], in_ch, num_classes, w, preact=True)
    raise ValueError(f"unknown architecture {arch!r}")


class Whitening(nn.Module):
    """A frozen 2x2-patch whitening convolution (the first layer of the fast CIFAR nets).

    Its filters are the eigenvectors of the covariance of all 2x2 input patches, each scaled
    by ``1/sqrt(eigenvalue + eps)``, followed by their negations (so a ReLU-like activation
    after it loses nothing): ``2 * 4 * channels`` outputs. The filters come from data, not
    from the seed: :meth:`init_from_input` computes them from the first input the layer
    sees during data initialisation (the training loop passes the stage's first 5,000
    training images before the first epoch). Only the bias is trained.
    """

    def __init__(self, in_ch: int, eps: float = 5e-4):
        super().__init__()
        self.eps = eps
        self.conv = nn.Conv2d(in_ch, 8 * in_ch, 2, bias=True)
        self.conv.weight.requires_grad_(False)
        nn.init.zeros_(self.conv.bias)
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def init_from_input(self, x: torch.Tensor) -> None:
        """Set the filters from the 2x2 patches of ``x`` (``N x C x H x W``, as this layer sees it)."""
        c = x.shape[1]
        # patch sums and Gram matrix accumulated over chunks of images: the patches of 5,000
        # images at once would take half a gigabyte in float64
        # (shifted by the first chunk's mean, so the final subtraction loses no precision)
        total, gram, n = torch.zeros(4 * c, dtype=torch.float64), torch.zeros(4 * c, 4 * c, dtype=torch.float64), 0
        shift = None
        for chunk in x.split(500):
            patches = F.unfold(chunk.double(), 2).transpose(1, 2).reshape(-1, 4 * c)  # (N*P, C*2*2), conv's order
            if shift is None:
                shift = patches.mean(0, keepdim=True)
            patches = patches - shift
            total += patches.sum(0).cpu()
            gram += (patches.T @ patches).cpu()
            n += len(patches)
        mean = total / n
        cov = (gram - n * torch.outer(mean, mean)) / max(n - 1, 1)
        eigval, eigvec = torch.linalg.eigh(cov)
        # eigh's sign of each eigenvector is arbitrary: fix it so the largest entry is positive
        sign = torch.sign(eigvec.gather(0, eigvec.abs().argmax(0, keepdim=True)))
        eigvec = eigvec * torch.where(sign == 0, torch.ones_like(sign), sign)
        filters = (eigvec / torch.sqrt(eigval + self.eps)).T.reshape(4 * c, c, 2, 2)
        self.conv.weight.copy_(torch.cat([filters, -filters]).to(self.conv.weight.dtype))
        self.initialised.fill_(True)

    def forward(self, x):
        return self.conv(x)


class _BN(nn.BatchNorm2d):
    """BatchNorm with a fixed unit scale; the shift, the layer's only parameter, is learned at
    ``lr_scale`` times the stage's lr under SGD (a shift learned at the weights' lr barely moves);
    Adam and AdamW stages train it at their own lr (see ``bdframe.training.param_groups``)."""

    def __init__(self, c, lr_scale: float = 64.0, momentum=0.4, eps=1e-12):
        super().__init__(c, eps=eps, momentum=momentum)
        self.weight.requires_grad_(False)
        self.lr_scale = {"bias": lr_scale}


def _identity_init(conv: nn.Conv2d) -> nn.Conv2d:
    """Default initialisation, then the first ``min(out, in)`` filters set to pass their input
    channel through (Dirac): the untrained net starts close to an identity map."""
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:conv.in_channels])
    return conv


class _ConvGroup(nn.Module):
    """conv -> max-pool 2 -> BN -> GELU -> conv -> BN -> GELU (convs identity-initialised)."""

    def __init__(self, cin, cout, bn_lr_scale: float = 64.0):
        super().__init__()
        self.conv1 = _identity_init(nn.Conv2d(cin, cout, 3, padding="same", bias=False))
        self.bn1 = _BN(cout, bn_lr_scale)
        self.conv2 = _identity_init(nn.Conv2d(cout, cout, 3, padding="same", bias=False))
        self.bn2 = _BN(cout, bn_lr_scale)

    def forward(self, x):
        x = F.gelu(self.bn1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.bn2(self.conv2(x)))


class FastNet(nn.Module):
    """A lean CIFAR net for fast training: a frozen whitening layer, GELU, three conv groups
    (widths ``widths``), a final 3x3 max-pool and a bias-free linear head scaled by
    ``logit_scale``."""

    def __init__(self, in_ch: int, num_classes: int, widths=(64, 256, 256), logit_scale: float = 1 / 9,
                 whiten: bool = True, bn_lr_scale: float = 64.0):
        super().__init__()
        self.logit_scale = logit_scale
        self.stem = Whitening(in_ch) if whiten else nn.Conv2d(in_ch, 8 * in_ch, 2, bias=True)
        groups, cin = [], 8 * in_ch
        for w in widths:
            groups.append(_ConvGroup(cin, w, bn_lr_scale))
            cin = w
        self.groups = nn.Sequential(*groups)
        self.fc = nn.Linear(cin, num_classes, bias=False)

    channels_last = True  # input layout (the factory also converts the weights); markedly faster on CPU

    def forward_features(self, x):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.groups(F.gelu(self.stem(x)))
        return torch.flatten(F.adaptive_max_pool2d(x, 1), 1)

    def forward_head(self, f):
        return self.fc(f) * self.logit_scale

    def forward(self, x):
        return self.forward_head(self.forward_features(x))
