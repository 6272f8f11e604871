"""Reference networks as plain ``torch.nn.Module``s.

They carry no priors: pass them to :func:`pyro_bq.bq_priors` or to the Bayesian
model classes to make them Bayesian.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pyro_bq._validation import check_int, check_int_sequence

__all__ = ["MLP", "LeNet5", "ResNet20", "resnet20", "max_pool_2x2"]


def _check_activation(activation):
    """``activation`` must make an activation module when called: an ``nn.Module`` class such as ``nn.ReLU``
    (or a factory such as ``functools.partial(nn.LeakyReLU, 0.1)``), not a module instance."""
    if isinstance(activation, nn.Module) or not callable(activation) or (
            isinstance(activation, type) and not issubclass(activation, nn.Module)):
        raise TypeError(f"activation must be an nn.Module class such as nn.ReLU (the class, not an instance), "
                        f"got {type(activation).__name__} ({activation!r:.60})")
    return activation


class MLP(nn.Sequential):
    """Fully connected ReLU network, 784-400-400-10 by default.

    Inputs of shape ``(N, 1, 28, 28)`` or ``(N, 784)`` are flattened.

    Usage::

        net = MLP()                     # 784-400-400-10
        net = MLP(sizes=(784, 100, 10))
    """

    def __init__(self, sizes: Sequence[int] = (784, 400, 400, 10), activation: type[nn.Module] = nn.ReLU):
        sizes = check_int_sequence("sizes", sizes, low=1)
        if len(sizes) < 2:
            raise ValueError(f"sizes must list at least an input and an output size, got {sizes}")
        _check_activation(activation)
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(n_in, n_out))
            if i < len(sizes) - 2:
                layers.append(activation())
        super().__init__(*layers)
        self.sizes = sizes


def max_pool_2x2(x):
    """2x2 max pooling with stride 2, the value of ``F.max_pool2d(x, 2)`` to the last bit.

    On the CPU, for inputs that need no gradient and whose last two sizes are
    even, it is the element-wise maximum of the four strided views of each
    window (about 6x faster than ``F.max_pool2d``'s CPU kernel at LeNet-5's
    sizes; a maximum is exact, so the values are equal). Anywhere else (a GPU,
    inputs that need a gradient, odd sizes, tracing with :mod:`torch.fx` or
    :func:`torch.jit.trace`) it calls ``F.max_pool2d(x, 2)`` itself, so
    training, traced graphs and exported files see the ordinary operation.

    Usage::

        y = max_pool_2x2(torch.rand(8, 6, 28, 28))    # (8, 6, 14, 14)
    """
    if (isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dim() >= 3 and x.shape[-1] % 2 == 0
            and x.shape[-2] % 2 == 0 and not (x.requires_grad and torch.is_grad_enabled())
            and not torch.jit.is_tracing() and not torch.jit.is_scripting()):
        cols = torch.maximum(x[..., 0::2], x[..., 1::2])
        return torch.maximum(cols[..., 0::2, :], cols[..., 1::2, :])
    return F.max_pool2d(x, 2)


class LeNet5(nn.Module):
    """LeNet-5 for 28x28 single-channel images (padding 2 on the first conv).

    conv(1->6, 5x5) - pool - conv(6->16, 5x5) - pool - fc 400-120-84-10.

    Usage::

        net = LeNet5()
        logits = net(torch.zeros(8, 1, 28, 28))
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, activation: type[nn.Module] = nn.ReLU):
        super().__init__()
        check_int("num_classes", num_classes, low=2)
        check_int("in_channels", in_channels, low=1)
        _check_activation(activation)
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        self.act = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = max_pool_2x2(self.act(self.conv1(x)))
        x = max_pool_2x2(self.act(self.conv2(x)))
        x = x.flatten(-3)
        x = self.act(self.fc1(x))
        x = self.act(self.fc2(x))
        return self.fc3(x)


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20 (He et al. 2016): 3 stages of 3 basic blocks, 16/32/64 channels.

    Usage::

        net = ResNet20(num_classes=10, in_channels=3)
        logits = net(torch.zeros(2, 3, 32, 32))
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, blocks_per_stage: int = 3):
        super().__init__()
        check_int("num_classes", num_classes, low=2)
        check_int("in_channels", in_channels, low=1)
        check_int("blocks_per_stage", blocks_per_stage, low=1)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(_BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(-3)
        return self.linear(out)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> ResNet20:
    """Build a :class:`ResNet20`."""
    return ResNet20(num_classes=num_classes, in_channels=in_channels)
