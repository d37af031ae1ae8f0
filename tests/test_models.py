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


def test_feature_dropout_returns_clean_and_perturbed_logits() -> None:
    """UniMatch's feature perturbation: a second branch decoded from encoder features under
    Dropout2d; it differs from the clean branch, and in eval mode (per-sample BatchNorm) the
    clean branch is exactly the ordinary forward."""
    torch.manual_seed(0)
    model = create_model("unet", in_channels=1, num_classes=3, base_channels=4, depth=2)
    x = torch.randn(2, 1, 16, 16)
    model.train()
    clean, perturbed = model(x, feature_dropout=0.5)
    assert clean.shape == perturbed.shape == (2, 3, 16, 16)
    assert not torch.allclose(clean, perturbed)
    model.eval()
    with torch.no_grad():
        clean, perturbed = model(x, feature_dropout=0.5)
        assert torch.allclose(clean, model(x), atol=1e-6)
        assert not torch.allclose(perturbed, clean)
        same, also_same = model(x, feature_dropout=0.0)  # p=0: no perturbation at all
        assert torch.allclose(same, also_same, atol=1e-6)


def test_feature_dropout_sends_gradient_through_both_branches() -> None:
    torch.manual_seed(0)
    model = create_model("unet", in_channels=1, num_classes=2, base_channels=4, depth=2)
    model.train()
    x = torch.randn(2, 1, 16, 16)
    grads = []
    for pick in (0, 1):  # 0: clean branch alone, 1: perturbed branch alone
        model.zero_grad(set_to_none=True)
        model(x, feature_dropout=0.5)[pick].pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        for name, g in grads[-1].items():
            assert torch.isfinite(g).all() and g.abs().sum() > 0, (pick, name)
    assert any(not torch.allclose(grads[0][n], grads[1][n]) for n in grads[0])


def test_feature_dropout_bad_values() -> None:
    model = UNet(in_channels=1, num_classes=2, base_channels=4, depth=2)
    with pytest.raises(ValueError, match=r"feature_dropout=1.0.*\[0, 1\)"):
        model(torch.randn(1, 1, 16, 16), feature_dropout=1.0)
    with pytest.raises(ValueError, match="cannot be combined"):
        model(torch.randn(1, 1, 16, 16), return_features=True, feature_dropout=0.5)
