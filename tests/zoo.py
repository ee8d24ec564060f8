"""A local zoo of tiny hand-written models for the r2r_fx test-suite.

Every entry of :data:`ZOO` is a zero-argument builder returning ``(model,
example_inputs)``.  Builders seed the RNG, randomise normalisation statistics
and affine parameters (so eval-mode checks are meaningful), and return a
float32 model in eval mode.  All models are traceable with
``torch.fx.symbolic_trace`` and exportable with
``torch.export.export(..., strict=False)``.

Run this file directly for a self-check.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ZOO",
    "Builder",
    "ZooEntry",
    "build",
    "randomize_norms",
    "MLP",
    "MLPTokens",
    "VGGish",
    "BasicBlock",
    "TinyResNet",
    "DenseLayer",
    "TinyDenseNet",
    "SqueezeExcite",
    "InvertedResidual",
    "TinyMobileNetV2",
    "ShuffleUnit",
    "TinyShuffleNet",
    "InceptionModule",
    "TinyInception",
    "Attention",
    "TransformerBlock",
    "TinyViT",
    "TinyEncoder",
    "TinyAttentionNet",
    "LlamaAttention",
    "LlamaBlock",
    "TinyLlama",
    "GroupedBottleneck",
    "TinyResNeXt",
    "Conv1dNet",
    "Conv3dNet",
    "UNetLike",
    "EmbeddingNet",
    "MultiOutputNet",
    "TupleOutputNet",
    "TwoInputNet",
]

ZooEntry = tuple[nn.Module, tuple[torch.Tensor, ...]]
Builder = Callable[[], ZooEntry]

ZOO: dict[str, Builder] = {}

_BATCH = 2


def _register(name: str) -> Callable[[Builder], Builder]:
    """Decorator adding a builder to :data:`ZOO` under ``name``."""

    def deco(fn: Builder) -> Builder:
        if name in ZOO:
            raise KeyError(f"duplicate zoo entry {name!r}")
        ZOO[name] = fn
        return fn

    return deco


def build(name: str) -> ZooEntry:
    """Build the zoo model ``name`` and its example inputs."""
    return ZOO[name]()


@torch.no_grad()
def randomize_norms(model: nn.Module) -> nn.Module:
    """Give every norm layer non-trivial running stats and affine params."""
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
    for m in model.modules():
        if not isinstance(m, norm_types):
            continue
        weight = getattr(m, "weight", None)
        bias = getattr(m, "bias", None)
        if weight is not None:
            weight.uniform_(0.5, 1.5)
        if bias is not None:
            bias.uniform_(-0.5, 0.5)
        running_mean = getattr(m, "running_mean", None)
        running_var = getattr(m, "running_var", None)
        if running_mean is not None:
            running_mean.uniform_(-0.5, 0.5)
        if running_var is not None:
            running_var.uniform_(0.5, 1.5)
    return model


def _finish(model: nn.Module, *inputs: torch.Tensor) -> ZooEntry:
    """Randomise norms, cast to float32 and switch to eval mode."""
    randomize_norms(model)
    model = model.float().eval()
    return model, tuple(inputs)


def _image(channels: int = 3, size: int = 16) -> torch.Tensor:
    return torch.randn(_BATCH, channels, size, size)


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv2d (no bias) -> BatchNorm2d -> ReLU with 'same'-style padding."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


# --------------------------------------------------------------------------
# 1. mlp
# --------------------------------------------------------------------------
class MLP(nn.Module):
    """Linear-ReLU-Linear-ReLU-Linear."""

    def __init__(self, din: int = 16, hidden: int = 32, dout: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(din, hidden)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.act2 = nn.ReLU()
        self.fc3 = nn.Linear(hidden, dout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.fc1(x))
        x = self.act2(self.fc2(x))
        return self.fc3(x)


@_register("mlp")
def build_mlp() -> ZooEntry:
    """MLP on a (2, 16) input."""
    torch.manual_seed(0)
    return _finish(MLP(), torch.randn(_BATCH, 16))


# --------------------------------------------------------------------------
# 2. mlp_tokens
# --------------------------------------------------------------------------
class MLPTokens(nn.Module):
    """Token-wise MLP with a residual stream: ``h = in(x); h + mlp(h)``."""

    def __init__(self, din: int = 12, dim: int = 16, hidden: int = 32, dout: int = 8) -> None:
        super().__init__()
        self.proj_in = nn.Linear(din, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, dout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)
        h = h + self.fc2(self.act(self.fc1(h)))
        return self.head(h)


@_register("mlp_tokens")
def build_mlp_tokens() -> ZooEntry:
    """Token MLP on a (2, 5, 12) input."""
    torch.manual_seed(0)
    return _finish(MLPTokens(), torch.randn(_BATCH, 5, 12))


# --------------------------------------------------------------------------
# 3. vgg
# --------------------------------------------------------------------------
class VGGish(nn.Module):
    """Small VGG: conv blocks, max-pools, flatten (H*W > 1) and classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(3, 8),
            _conv_bn_relu(8, 8),
            nn.MaxPool2d(2),
            _conv_bn_relu(8, 16),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * 4 * 4, 32),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(32, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


@_register("vgg")
def build_vgg() -> ZooEntry:
    """VGG-style net on (2, 3, 16, 16)."""
    torch.manual_seed(0)
    return _finish(VGGish(), _image())


# --------------------------------------------------------------------------
# 4. resnet
# --------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """ResNet basic block with optional 1x1 projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                nn.BatchNorm2d(cout),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    """Stem + two basic blocks (second strided with projection) + head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


@_register("resnet")
def build_resnet() -> ZooEntry:
    """Tiny ResNet on (2, 3, 16, 16)."""
    torch.manual_seed(0)
    return _finish(TinyResNet(), _image())


# --------------------------------------------------------------------------
# 5. densenet
# --------------------------------------------------------------------------
class DenseLayer(nn.Module):
    """bn-relu-conv3x3 producing ``growth`` new channels."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.relu(self.norm(x)))


class TinyDenseNet(nn.Module):
    """Stem, a 3-layer dense block, a transition, global pool and head."""

    def __init__(self, stem: int = 8, growth: int = 4, num_layers: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, stem, 3, padding=1, bias=False)
        self.layers = nn.ModuleList(DenseLayer(stem + i * growth, growth) for i in range(num_layers))
        cat = stem + num_layers * growth
        self.transition = nn.Sequential(
            nn.BatchNorm2d(cat),
            nn.ReLU(inplace=True),
            nn.Conv2d(cat, cat // 2, 1, bias=False),
            nn.AvgPool2d(2),
        )
        self.fc = nn.Linear(cat // 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        x = self.transition(torch.cat(features, 1))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


@_register("densenet")
def build_densenet() -> ZooEntry:
    """Tiny DenseNet on (2, 3, 16, 16)."""
    torch.manual_seed(0)
    return _finish(TinyDenseNet(), _image())


# --------------------------------------------------------------------------
# 6. mobilenetv2
# --------------------------------------------------------------------------
class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation gate with a hardsigmoid."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = self.gate(self.fc2(self.relu(self.fc1(scale))))
        return x * scale


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand, depthwise, SE, project, optional residual."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 2) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.expand = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
        )
        self.se = SqueezeExcite(hidden, max(hidden // 4, 4))
        self.project = nn.Sequential(
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.depthwise(self.expand(x))))
        if self.use_res:
            out = x + out
        return out


class TinyMobileNetV2(nn.Module):
    """Stem + two inverted residual blocks + pooled classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU6(inplace=True),
        )
        self.block1 = InvertedResidual(8, 8, stride=1)
        self.block2 = InvertedResidual(8, 12, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


@_register("mobilenetv2")
def build_mobilenetv2() -> ZooEntry:
    """Tiny MobileNetV2 with SE on (2, 3, 16, 16)."""
    torch.manual_seed(0)
    return _finish(TinyMobileNetV2(), _image())


# --------------------------------------------------------------------------
# 7. shufflenet
# --------------------------------------------------------------------------
def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet channel shuffle via view/transpose/view."""
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 stride-1 unit: split, branch on one half, concat, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False),
            nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        out = torch.cat((x1, self.branch(x2)), 1)
        return channel_shuffle(out, 2)


class TinyShuffleNet(nn.Module):
    """Stem conv, two shuffle units, mean pool, classifier."""

    def __init__(self, channels: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.stage = nn.Sequential(ShuffleUnit(channels), ShuffleUnit(channels))
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage(self.stem(x))
        x = x.mean([2, 3])
        return self.fc(x)


@_register("shufflenet")
def build_shufflenet() -> ZooEntry:
    """Tiny ShuffleNetV2 on (2, 3, 16, 16)."""
    torch.manual_seed(0)
    return _finish(TinyShuffleNet(), _image())


# --------------------------------------------------------------------------
# 8. inception
# --------------------------------------------------------------------------
class InceptionModule(nn.Module):
    """Four parallel branches concatenated along channels."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch1 = _conv_bn_relu(cin, 8, 1)
        self.branch2 = nn.Sequential(_conv_bn_relu(cin, 8, 1), _conv_bn_relu(8, 12, 3))
        self.branch3 = nn.Sequential(_conv_bn_relu(cin, 4, 1), _conv_bn_relu(4, 6, 5))
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1),
            _conv_bn_relu(cin, 6, 1),
        )

    out_channels = 8 + 12 + 6 + 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class TinyInception(nn.Module):
    """Stem, one Inception module, 1x1 reduction, pool, classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(3, 16, 3)
        self.inception = InceptionModule(16)
        self.reduce = nn.Conv2d(InceptionModule.out_channels, 16, 1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inception(self.stem(x))
        x = self.relu(self.reduce(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


@_register("inception")
def build_inception() -> ZooEntry:
    """Tiny Inception net on (2, 3, 16, 16)."""
    torch.manual_seed(0)
    return _finish(TinyInception(), _image())


# --------------------------------------------------------------------------
# 9. vit
# --------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v Linears and SDPA."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.num_heads, -1).transpose(1, 2)
        k = self.k(x).view(b, t, self.num_heads, -1).transpose(1, 2)
        v = self.v(x).view(b, t, self.num_heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, t, -1)
        return self.proj(out)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)); x + mlp(ln(x))."""

    def __init__(self, dim: int, num_heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.fc2(self.act(self.fc1(self.norm2(x))))
        return x


class TinyViT(nn.Module):
    """Patch embed, class token, positional embedding, 2 blocks, head."""

    def __init__(
        self,
        image: int = 16,
        patch: int = 4,
        dim: int = 16,
        num_heads: int = 2,
        hidden: int = 32,
        depth: int = 2,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        tokens = (image // patch) ** 2 + 1
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.1 * torch.randn(1, tokens, dim))
        self.blocks = nn.Sequential(*(TransformerBlock(dim, num_heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


@_register("vit")
def build_vit() -> ZooEntry:
    """Tiny ViT (17 tokens of width 16) on (2, 3, 16, 16)."""
    torch.manual_seed(0)
    return _finish(TinyViT(), _image())


class TinyEncoder(nn.Module):
    """Token and position embeddings, ``nn.TransformerEncoder`` (post-LN, or pre-LN with a final norm),
    mean-pooled head."""

    def __init__(self, norm_first: bool, vocab: int = 50, dim: int = 16, heads: int = 2, tokens: int = 7) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.1 * torch.randn(1, tokens, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=norm_first)
        final = nn.LayerNorm(dim) if norm_first else None
        self.encoder = nn.TransformerEncoder(layer, 2, norm=final, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids) + self.pos).mean(1))


@_register("encoder_post_ln")
def build_encoder_post_ln() -> ZooEntry:
    """nn.TransformerEncoder, norm_first=False, on int64 token ids (2, 7)."""
    torch.manual_seed(0)
    return _finish(TinyEncoder(norm_first=False), torch.randint(0, 50, (_BATCH, 7)))


@_register("encoder_pre_ln")
def build_encoder_pre_ln() -> ZooEntry:
    """nn.TransformerEncoder, norm_first=True, on int64 token ids (2, 7)."""
    torch.manual_seed(0)
    return _finish(TinyEncoder(norm_first=True), torch.randint(0, 50, (_BATCH, 7)))


class TinyAttentionNet(nn.Module):
    """Conv patches, one ``nn.MultiheadAttention`` (its head-averaged weights returned and dropped),
    residual, LayerNorm, pooled head."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x).flatten(2).transpose(1, 2)
        a, _ = self.attn(h, h, h)
        return self.head(self.norm(h + a).mean(1))


@_register("mha")
def build_mha() -> ZooEntry:
    """nn.MultiheadAttention over 16 patches of width 16 on (2, 3, 16, 16)."""
    torch.manual_seed(0)
    return _finish(TinyAttentionNet(), _image())


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class LlamaAttention(nn.Module):
    """Grouped-query attention (``kv_heads`` key/value heads, each read by ``heads // kv_heads`` query
    heads through an expand), rotary embeddings from cos/sin tables, no biases."""

    def __init__(self, dim: int, heads: int, kv_heads: int, tokens: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim)
        angles = torch.outer(torch.arange(tokens).float(), inv_freq)
        self.register_buffer("cos", torch.cat([angles, angles], -1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat([angles, angles], -1).sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = (z * self.cos + _rotate_half(z) * self.sin for z in (q, k))
        g = self.heads // self.kv_heads
        k, v = (
            z[:, :, None].expand(b, self.kv_heads, g, t, self.head_dim).reshape(b, self.heads, t, self.head_dim)
            for z in (k, v)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class LlamaBlock(nn.Module):
    """Pre-norm decoder layer: RMSNorm, GQA with RoPE, RMSNorm, SwiGLU MLP."""

    def __init__(self, dim: int, heads: int, kv_heads: int, hidden: int, tokens: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)
        self.attn = LlamaAttention(dim, heads, kv_heads, tokens)
        self.gate, self.up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyLlama(nn.Module):
    """Token embedding, two Llama blocks, final RMSNorm, LM head tied to the embedding."""

    def __init__(self, vocab: int = 50, dim: int = 16, heads: int = 4, kv_heads: int = 2, tokens: int = 7) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(*(LlamaBlock(dim, heads, kv_heads, 3 * dim, tokens) for _ in range(2)))
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(self.blocks(self.embed(ids))))


@_register("llama_like")
def build_llama_like() -> ZooEntry:
    """Llama-like decoder (RMSNorm, RoPE, GQA 4/2 heads, SwiGLU, tied head) on int64 ids (2, 7)."""
    torch.manual_seed(0)
    model = TinyLlama()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.RMSNorm):
                m.weight.uniform_(0.5, 1.5)
    return _finish(model, torch.randint(0, 50, (_BATCH, 7)))


# --------------------------------------------------------------------------
# 10. grouped
# --------------------------------------------------------------------------
class GroupedBottleneck(nn.Module):
    """ResNeXt bottleneck: 1x1 -> grouped 3x3 -> 1x1, plus identity."""

    def __init__(self, channels: int = 32, width: int = 16, groups: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 1, bias=False)
        self.gn1 = nn.GroupNorm(4, width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.gn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + x)


class TinyResNeXt(nn.Module):
    """Stem conv, one grouped bottleneck, global pool, classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(3, 32, 3, stride=2)
        self.block = GroupedBottleneck(32, 16, 4)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


@_register("grouped")
def build_grouped() -> ZooEntry:
    """ResNeXt-style net with GroupNorm on (2, 3, 16, 16)."""
    torch.manual_seed(0)
    return _finish(TinyResNeXt(), _image())


# --------------------------------------------------------------------------
# 11. conv1d
# --------------------------------------------------------------------------
class Conv1dNet(nn.Module):
    """Conv1d-BN1d-ReLU-Conv1d-InstanceNorm1d-ReLU, mean over time, Linear."""

    def __init__(self, cin: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(cin, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv1d(8, 16, 3, padding=1)
        self.norm2 = nn.InstanceNorm1d(16, affine=True)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.norm2(self.conv2(x)))
        return self.fc(x.mean(-1))


@_register("conv1d")
def build_conv1d() -> ZooEntry:
    """1-D conv net on (2, 4, 20)."""
    torch.manual_seed(0)
    return _finish(Conv1dNet(), torch.randn(_BATCH, 4, 20))


# --------------------------------------------------------------------------
# 12. conv3d
# --------------------------------------------------------------------------
class Conv3dNet(nn.Module):
    """Conv3d-BN3d-ReLU-Conv3d, adaptive avg pool, Linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm3d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv3d(8, 16, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.relu(self.bn1(self.conv1(x))))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


@_register("conv3d")
def build_conv3d() -> ZooEntry:
    """3-D conv net on (2, 3, 6, 8, 8)."""
    torch.manual_seed(0)
    return _finish(Conv3dNet(), torch.randn(_BATCH, 3, 6, 8, 8))


# --------------------------------------------------------------------------
# 13. unet_like
# --------------------------------------------------------------------------
class UNetLike(nn.Module):
    """Encoder, unpadded stride-2 down, two up paths (ConvTranspose2d and
    nearest interpolate), ``F.pad`` back to full size, skip concat, conv head.
    """

    def __init__(self, cin: int = 3, cout: int = 2) -> None:
        super().__init__()
        self.enc = _conv_bn_relu(cin, 8, 3)
        self.down = nn.Conv2d(8, 16, 3, stride=2)  # 16x16 -> 7x7
        self.down_bn = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)  # 7x7 -> 14x14
        self.side = nn.Conv2d(16, 4, 1)
        self.head = nn.Sequential(
            _conv_bn_relu(8 + 8 + 4, 8, 3),
            nn.Conv2d(8, cout, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.enc(x)
        mid = self.relu(self.down_bn(self.down(skip)))
        up = F.pad(self.up(mid), [1, 1, 1, 1])
        side = self.side(F.interpolate(mid, scale_factor=2, mode="nearest"))
        side = F.pad(side, [1, 1, 1, 1])
        return self.head(torch.cat([skip, up, side], 1))


@_register("unet_like")
def build_unet_like() -> ZooEntry:
    """U-Net-like dense predictor on (2, 3, 16, 16) -> (2, 2, 16, 16)."""
    torch.manual_seed(0)
    return _finish(UNetLike(), _image())


# --------------------------------------------------------------------------
# 14. embedding
# --------------------------------------------------------------------------
class EmbeddingNet(nn.Module):
    """Embedding -> token MLP -> mean over tokens -> Linear."""

    def __init__(self, vocab: int = 50, dim: int = 16, hidden: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.fc2(self.relu(self.fc1(self.embed(ids))))
        return self.head(x.mean(1))


@_register("embedding")
def build_embedding() -> ZooEntry:
    """Embedding net on int64 token ids (2, 7)."""
    torch.manual_seed(0)
    model = EmbeddingNet()
    return _finish(model, torch.randint(0, 50, (_BATCH, 7), dtype=torch.int64))


# --------------------------------------------------------------------------
# 15. multi_output / tuple_output
# --------------------------------------------------------------------------
class MultiOutputNet(nn.Module):
    """Conv trunk returning ``{"logits": ..., "features": ...}``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn_relu(3, 8), _conv_bn_relu(8, 16, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = torch.flatten(self.pool(self.body(x)), 1)
        return {"logits": self.fc(features), "features": features}


class TupleOutputNet(nn.Module):
    """Conv trunk with two heads, returning ``(logits, aux)``."""

    def __init__(self, num_classes: int = 10, aux_dim: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn_relu(3, 8), _conv_bn_relu(8, 16, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.cls_head = nn.Linear(16, num_classes)
        self.aux_head = nn.Linear(16, aux_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.flatten(self.pool(self.body(x)), 1)
        return self.cls_head(features), self.aux_head(features)


@_register("multi_output")
def build_multi_output() -> ZooEntry:
    """Dict-output conv net on (2, 3, 16, 16)."""
    torch.manual_seed(0)
    return _finish(MultiOutputNet(), _image())


@_register("tuple_output")
def build_tuple_output() -> ZooEntry:
    """Tuple-output conv net on (2, 3, 16, 16)."""
    torch.manual_seed(0)
    return _finish(TupleOutputNet(), _image())


# --------------------------------------------------------------------------
# 16. two_inputs
# --------------------------------------------------------------------------
class TwoInputNet(nn.Module):
    """Image conv path (pooled) + vector linear path, summed, then a head."""

    def __init__(self, vec_dim: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = _conv_bn_relu(3, 16, 3, stride=2)
        self.vec = nn.Linear(vec_dim, 16)
        self.relu = nn.ReLU()
        self.head = nn.Linear(16, num_classes)

    def forward(self, image: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        a = torch.flatten(F.adaptive_avg_pool2d(self.conv(image), 1), 1)
        b = self.relu(self.vec(vector))
        return self.head(a + b)


@_register("two_inputs")
def build_two_inputs() -> ZooEntry:
    """Two-input net on image (2, 3, 16, 16) and vector (2, 8)."""
    torch.manual_seed(0)
    return _finish(TwoInputNet(), _image(), torch.randn(_BATCH, 8))


# --------------------------------------------------------------------------
# Self-check
# --------------------------------------------------------------------------
def _same(a: object, b: object, atol: float = 1e-6) -> bool:
    """Structural equality of (nested) tensor outputs within ``atol``."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and (torch.equal(a, b) or torch.allclose(a, b, rtol=0.0, atol=atol))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], atol) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y, atol) for x, y in zip(a, b))
    return False


def _describe(out: object) -> str:
    if isinstance(out, torch.Tensor):
        return str(tuple(out.shape))
    if isinstance(out, dict):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in out.items()) + "}"
    if isinstance(out, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in out) + ")"
    return type(out).__name__


def _self_check() -> int:
    """Build, run, trace and export every zoo model; return #failures."""
    import torch.fx

    failures = 0
    for name in ZOO:
        model, inputs = build(name)
        with torch.no_grad():
            eager = model(*inputs)
            try:
                gm = torch.fx.symbolic_trace(model)
                fx_ok = _same(eager, gm(*inputs))
                fx_msg = "ok" if fx_ok else "MISMATCH"
            except Exception as exc:  # noqa: BLE001
                fx_ok, fx_msg = False, f"FAIL ({type(exc).__name__}: {exc})"
            try:
                ep = torch.export.export(model, inputs, strict=False)
                ex_ok = _same(eager, ep.module()(*inputs), atol=1e-5)
                ex_msg = "ok" if ex_ok else "MISMATCH"
            except Exception as exc:  # noqa: BLE001
                ex_ok, ex_msg = False, f"FAIL ({type(exc).__name__}: {exc})"
        failures += (not fx_ok) + (not ex_ok)
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        print(f"{name:13s} in={shapes:30s} out={_describe(eager):40s} fx={fx_msg} export={ex_msg}")
    return failures


if __name__ == "__main__":
    import sys

    sys.exit(1 if _self_check() else 0)
