"""Shape, gradient, error and determinism checks for semiseg.models."""

from __future__ import annotations

import pytest
import torch

from semiseg.errors import RegistryError
from semiseg.models import MODELS, UNet, create_model


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_output_shapes(depth: int) -> None:
    model = create_model("unet", in_channels=1, num_classes=3, base_channels=4, depth=depth)
    x = torch.randn(2, 1, 32, 48)
    assert model(x).shape == (2, 3, 32, 48)


def test_features_shape_and_feature_dim() -> None:
    model = UNet(in_channels=3, num_classes=2, base_channels=8, depth=3)
    assert model.feature_dim == 8
    logits, feats = model(torch.randn(2, 3, 16, 24), return_features=True)
    assert logits.shape == (2, 2, 16, 24)
    assert feats.shape == (2, model.feature_dim, 16, 24)


def test_backward_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    model = create_model("unet", in_channels=1, num_classes=2, base_channels=4, depth=2)
    logits, feats = model(torch.randn(2, 1, 16, 16), return_features=True)
    loss = torch.nn.functional.cross_entropy(logits, torch.randint(0, 2, (2, 16, 16)))
    (loss + feats.pow(2).mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_bad_input_size_names_size_and_divisor() -> None:
    model = UNet(in_channels=1, num_classes=2, base_channels=4, depth=3)
    with pytest.raises(ValueError, match=r"20x16.*divisible by 8"):
        model(torch.randn(1, 1, 20, 16))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.randn(1, 3, 16, 16))


def test_unknown_model_lists_unet() -> None:
    assert "unet" in MODELS
    with pytest.raises(RegistryError, match="unet"):
        create_model("resnet", in_channels=1, num_classes=2)


def test_deterministic_init() -> None:
    torch.manual_seed(123)
    a = create_model("unet", in_channels=1, num_classes=2, base_channels=4)
    torch.manual_seed(123)
    b = create_model("unet", in_channels=1, num_classes=2, base_channels=4)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    x = torch.randn(1, 1, 16, 16)
    a.eval(), b.eval()
    assert torch.equal(a(x), b(x))
