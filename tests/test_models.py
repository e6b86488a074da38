import pytest
import torch

from lossgeo.errors import UserInputError
from lossgeo.models import build_model, parameter_blocks


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet", "vit"])
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_models_map_images_to_logits(name, channels, size):
    torch.manual_seed(0)
    model = build_model(name, channels, size, 10)
    out = model(torch.randn(3, channels, size, size))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


def test_mlp_widths_and_activation():
    model = build_model("mlp", 1, 28, 10, hidden=(200, 200), activation="tanh")
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(200, 784), (200,), (200, 200), (200,), (10, 200), (10,)]
    assert any(isinstance(m, torch.nn.Tanh) for m in model.modules())


def test_parameter_blocks_group_by_layer():
    blocks = parameter_blocks(build_model("mlp", 1, 28, 10, hidden=(8,)))
    assert blocks == {"fc1": ["net.1.weight", "net.1.bias"], "fc2": ["net.3.weight", "net.3.bias"]}
    cnn = parameter_blocks(build_model("cnn", 1, 28, 10))
    assert list(cnn) == ["conv1", "conv2", "fc1", "fc2"]
    assert cnn["conv2"] == ["features.3.weight", "features.3.bias"]
    resnet = parameter_blocks(build_model("resnet", 3, 32, 10))
    assert {"conv1", "bn1", "stages.0.conv1", "stages.1.shortcut.0"} <= set(resnet)


def test_unknown_model():
    with pytest.raises(UserInputError, match="model: must be one of mlp, cnn, resnet, vit"):
        build_model("transformerxl")
