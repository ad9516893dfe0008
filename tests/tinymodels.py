"""Small models for tests, loadable as python:tinymodels:NAME."""

import torch
from torch import nn
from torchvision import transforms


class ResidualBlock(nn.Module):
    """conv-bn-relu -> conv-bn -> (+ skip) -> relu: conv2 feeds the add, not a ReLU."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + x)


class TinyNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU6())
        self.block = ResidualBlock(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 16, 1, groups=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.block(self.stem(x))
        x = torch.relu(self.grouped(self.dw(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def randomize_bn(model, seed=0):
    """Give every BatchNorm non-trivial statistics so that folding is really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)
    return model.eval()


def tiny():
    torch.manual_seed(0)
    model = randomize_bn(TinyNet())
    transform = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])
    return model, transform


def tiny_module_only():
    return tiny()[0]


def not_a_model():
    return 42


def tiny_with_nan():
    model, transform = tiny()
    with torch.no_grad():
        model.block.conv1.weight[0, 0, 0, 0] = float("nan")
    return model, transform
