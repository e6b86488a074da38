"""Model registry: small networks sized for 28x28 (MNIST-like) and 32x32 (CIFAR) inputs."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from lossgeo.errors import UserInputError

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """Flatten -> [Linear -> activation] * len(hidden) -> Linear."""

    def __init__(
        self,
        in_features: int,
        n_classes: int = 10,
        hidden: tuple[int, ...] = (512, 256),
        activation: str = "relu",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            width = h
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def as_sequence(self) -> nn.Sequential:
        """The forward pass as one chain (lets landscapes factor the first layer)."""
        return self.net


class CNN(nn.Module):
    """Two conv blocks (conv-ReLU-maxpool) and a two-layer classifier head."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        n_classes: int = 10,
        channels: tuple[int, int] = (16, 32),
        hidden: int = 128,
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def as_sequence(self) -> nn.Sequential:
        """The forward pass as one chain (lets landscapes factor the first layer)."""
        return nn.Sequential(*self.features, *self.classifier)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small CIFAR-style ResNet (3 stages of one BasicBlock each) with BatchNorm."""

    def __init__(
        self, in_channels: int = 3, n_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64)
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        self.stages = nn.Sequential(
            BasicBlock(widths[0], widths[0], 1),
            BasicBlock(widths[0], widths[1], 2),
            BasicBlock(widths[1], widths[2], 2),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[2], n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


class ViT(nn.Module):
    """A tiny vision transformer: patch embedding, 2 pre-norm encoder layers, CLS head."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        n_classes: int = 10,
        patch: int = 7,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
    ) -> None:
        super().__init__()
        if image_size % patch:
            patch = 4 if image_size % 4 == 0 else 1
        n_patches = (image_size // patch) ** 2
        self.embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n_patches + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim * 2, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.encoder(tokens))[:, 0])


Builder = Callable[..., nn.Module]
REGISTRY: dict[str, Builder] = {
    "mlp": lambda c, s, k, hidden=(512, 256), activation="relu": MLP(
        c * s * s, k, hidden, activation
    ),
    "cnn": lambda c, s, k, **_: CNN(c, s, k),
    "resnet": lambda c, s, k, **_: ResNet(c, k),
    "vit": lambda c, s, k, **_: ViT(c, s, k),
}


def build_model(
    name: str, in_channels: int = 1, image_size: int = 28, n_classes: int = 10, **options
) -> nn.Module:
    """Builds a registered model; `options` (hidden, activation) apply to the MLP."""
    if name not in REGISTRY:
        raise UserInputError(f"model: must be one of {', '.join(REGISTRY)} (got {name!r})")
    return REGISTRY[name](in_channels, image_size, n_classes, **options)


def scale_initialisation(model: nn.Module, factor: float) -> None:
    """Multiplies every parameter by `factor` in place: the small initialisation under which
    Andreyev & Beneventano (2024) see sharpness rise to the edge (factor 0.2)."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)


_LAYER_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Linear, "fc"),
    (nn.Conv1d, "conv"),
    (nn.Conv2d, "conv"),
    (nn.Conv3d, "conv"),
    (nn.BatchNorm1d, "bn"),
    (nn.BatchNorm2d, "bn"),
    (nn.LayerNorm, "ln"),
)


def layer_names(model: nn.Module) -> dict[str, str]:
    """Module path -> the name a reader knows the layer by. A layer of a Sequential that is
    the model or one of its children ("0", "net.1") says nothing by its path: it is named
    by kind and order in the model ("fc1", "conv2", "bn1"), or by index and type where its
    kind has no short name ("0.Embedding"). Every other path ("stages.0.conv1",
    "stages.1.shortcut.0") is kept."""
    names: dict[str, str] = {}
    counts: dict[str, int] = {}
    for path, module in model.named_modules():
        kind = next((k for cls, k in _LAYER_KINDS if isinstance(module, cls)), None)
        if kind is not None:
            counts[kind] = counts.get(kind, 0) + 1
        last = path.rsplit(".", 1)[-1]
        if path.count(".") <= 1 and last.isdigit():
            names[path] = (
                f"{kind}{counts[kind]}" if kind is not None else f"{path}.{type(module).__name__}"
            )
        else:
            names[path] = path
    return names


def parameter_blocks(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Groups parameter names (default: every trainable one) by the layer that owns them,
    keyed by the layer's readable name (`layer_names`): the one naming of
    `lambda_max/<layer>` in lossgeo's loop, the Tracker and `layerwise_lambda_max`."""
    readable = layer_names(model)
    if names is None:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
    blocks: dict[str, list[str]] = {}
    for name in names:
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        blocks.setdefault(readable.get(owner, owner) or name, []).append(name)
    return blocks
