"""Small models for tests, loadable as python:tinymodels:NAME."""

import torch
import torch.nn.functional as F
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


# -- attention in every form a vision model writes it (tests/test_coverage.py) ---------------------
class TinyViT(nn.Module):
    """Patch embedding, two encoder blocks with nn.MultiheadAttention, a head."""

    def __init__(self, dim=16, heads=4, depth=2):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        y = self.norm(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(x)


class SdpaAttention(nn.Module):
    """timm's attention: one qkv Linear, F.scaled_dot_product_attention or q @ k^T."""

    def __init__(self, dim=16, heads=4, fused=True):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = (q * (c // self.heads) ** -0.5 @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Tokens(nn.Module):
    def __init__(self, attention):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.attn = attention
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.attn(self.embed(x)).mean(1))


def window_attention(x, qkv_weight, proj_weight, qkv_bias, heads: int):
    """Like torchvision's Swin: weights handed to a function that the trace keeps whole."""
    b, n, c = x.shape
    q, k, v = F.linear(x, qkv_weight, qkv_bias).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    x = (q.matmul(k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(-1).matmul(v)
    return F.linear(x.transpose(1, 2).reshape(b, n, c), proj_weight)


torch.fx.wrap("window_attention")


class WindowAttention(nn.Module):
    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        return window_attention(x, self.qkv.weight, self.proj.weight, self.qkv.bias, self.heads)


class AllAttentions(nn.Module):
    """Patch embedding, then nn.MultiheadAttention, F.scaled_dot_product_attention, q @ k^T and
    a function the trace keeps whole that takes the weights: every path, in one model."""

    def __init__(self, dim=16):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.mha = Block(dim, 4)
        self.sdpa = SdpaAttention(dim, fused=True)
        self.matmul = SdpaAttention(dim, fused=False)
        self.window = WindowAttention(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = self.mha(x)
        x = x + self.sdpa(x)
        x = x + self.matmul(x)
        x = x + self.window(x)
        return self.head(x.mean(1))


def all_attentions():
    torch.manual_seed(0)
    return AllAttentions().eval(), transforms.Compose([transforms.Resize((16, 16)), transforms.ToTensor()])


class WithConv1d(nn.Module):
    """An image model with a 1-D convolution, a layer kind sub8 leaves in float (and says so)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=4)
        self.conv1d = nn.Conv1d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        x = self.conv1d(self.stem(x).flatten(2))
        return self.head(x.mean(2))


def tiny_with_conv1d():
    torch.manual_seed(0)
    return WithConv1d().eval(), transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])


# -- one layer made deliberately bad (tests/test_inspect.py) ----------------------------------------
def tiny_with_outlier():
    """TinyNet whose `grouped` layer reads one input channel 1000 times larger than the others:
    dw's channel 3 is scaled up and grouped's weights for it scaled down, so the float function
    is unchanged but one per-tensor grid must span the outlier (the other channels round to 0).
    Its logits are scaled up so that the float model is confident and errors show in KL."""
    model, transform = tiny()
    model.stem[2].inplace = True  # as torchvision's models write it: the conv's output is clamped in place
    with torch.no_grad():
        model.fc.weight *= 40.0
        model.dw.weight[3] *= 1000.0
        model.dw.bias[3] *= 1000.0
        model.grouped.weight[:, 3] /= 1000.0
    return model, transform


# -- a transformer-like MLP whose Linear inputs have outlier features (tests/test_smooth_quant.py) ---
class OutlierTokens(nn.Module):
    """Tokens (N x T x 8) through a Linear whose output features 3 and 11 are about 100 times the
    others (as a transformer's are: the same features for every token), an MLP with a residual,
    and a head on every token (N x T x 4)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.up = nn.Linear(16, 32)
        self.act = nn.ReLU()
        self.down = nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)
        with torch.no_grad():
            self.embed.weight[[3, 11]] *= 100.0
            self.embed.bias[[3, 11]] *= 100.0

    def forward(self, x):
        h = self.embed(x)
        return self.head(h + self.down(self.act(self.up(h))))


def outlier_tokens():
    torch.manual_seed(0)
    return OutlierTokens().eval()


# -- inverted residuals, MobileNetV2's pattern (tests/test_equalize.py) -----------------------------
def _conv_bn(cin, cout, k=1, groups=1, relu6=True):
    layers = [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([nn.ReLU6()] if relu6 else []))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, expand=3):
        super().__init__()
        hidden = cin * expand
        self.conv = nn.Sequential(_conv_bn(cin, hidden), _conv_bn(hidden, hidden, 3, groups=hidden),
                                  _conv_bn(hidden, cout, relu6=False))
        self.skip = cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.skip else self.conv(x)


class TinyMobile(nn.Module):
    """stem -> inverted residual with its skip -> one without -> 1x1 head -> pool -> fc; channel
    ranges spread over two orders of magnitude, as in MobileNetV2's expansions."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = _conv_bn(3, 8, 3)
        self.block1 = InvertedResidual(8, 8)
        self.block2 = InvertedResidual(8, 16)
        self.head = _conv_bn(16, 32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.head(self.block2(self.block1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _spread_channels(cls):
    """A `cls` model whose BatchNorms spread the channels' ranges, and its 32x32 transform."""
    torch.manual_seed(0)
    model = randomize_bn(cls())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.mul_(torch.exp(torch.randn(m.num_features, generator=g) * 1.5))
    transform = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])
    return model, transform


def tiny_mobile():
    return _spread_channels(TinyMobile)


class TinyStage(nn.Module):
    """stem -> a stage of three inverted residuals (the first without its skip) -> 1x1 head ->
    pool -> fc: a linear residual stream (the projections' outputs and the two adds) that the
    second and third expansions and the head read; its channels' ranges spread as in
    MobileNetV2's."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = _conv_bn(3, 8, 3)
        self.block0 = InvertedResidual(8, 12)
        self.block1 = InvertedResidual(12, 12)
        self.block2 = InvertedResidual(12, 12)
        self.head = _conv_bn(12, 32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.head(self.block2(self.block1(self.block0(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny_stage():
    return _spread_channels(TinyStage)
