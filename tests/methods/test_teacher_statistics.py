"""Every EMA teacher keeps its own BatchNorm statistics: after training steps they are not the
student's, and they are exactly what the teacher's own train-mode passes accumulated (replayed
through a fresh copy with the weights the teacher had at each pass). Also which network each
method evaluates."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from semiseg.methods import METHODS, Batch, method_config
from semiseg.models import create_model

K = 3
# method name -> the attribute holding its EMA copy
EMA_COPIES = {"mean_teacher": "teacher", "low_confidence": "teacher", "reference_guided": "matcher"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def batches(step: int) -> tuple[Batch, Batch]:
    g = torch.Generator().manual_seed(step)
    img = torch.randn(2, 1, 16, 16, generator=g) * 1.5 + 0.5
    lab = Batch(img, img, torch.randint(0, K, (2, 16, 16), generator=g), torch.arange(2))
    u = torch.randn(2, 1, 16, 16, generator=g) - 0.3
    return lab, Batch(u, 0.8 * u + 0.2 * torch.randn(2, 1, 16, 16, generator=g), None, torch.arange(2))


def build(name: str, params: dict | None = None):
    """`params`: what a multi-stage method's last stage reads from earlier ones (stage_inputs)."""
    torch.manual_seed(0)
    model = create_model("unet", 1, K, base_channels=4, depth=2,
                         **METHODS.get(name).model_options(params or {}))
    model.train()
    return METHODS.get(name)(model, method_config(name, params or {}), K)


def bn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b for n, b in module.named_buffers() if "running" in n}


@pytest.mark.parametrize("name", sorted(EMA_COPIES))
def test_ema_copy_keeps_its_own_batchnorm_statistics(name: str) -> None:
    method = build(name)
    ema = getattr(method, EMA_COPIES[name])
    fresh = copy.deepcopy(ema)  # its state before any pass
    passes: list[tuple[torch.Tensor, list[torch.Tensor]]] = []

    def record(module, args):  # the input and the weights of every pass of the EMA copy
        passes.append((args[0].detach().clone(), [p.detach().clone() for p in module.parameters()]))

    handle = ema.register_forward_pre_hook(record)
    opt = torch.optim.SGD(method.model.parameters(), lr=0.1)
    for step in range(4):
        out = method.training_step(*batches(step), step)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        method.after_optimizer_step(step)
    handle.remove()
    assert len(passes) >= 4

    own, student = bn_buffers(ema), bn_buffers(method.model)
    assert own and own.keys() == student.keys()
    assert all(not torch.allclose(own[k], student[k]) for k in own), "copied from the student"

    fresh.train()
    with torch.no_grad():
        for inputs, weights in passes:
            for p, w in zip(fresh.parameters(), weights):
                p.copy_(w)
            fresh(inputs)
    replayed = bn_buffers(fresh)
    for k in own:
        torch.testing.assert_close(own[k], replayed[k], rtol=1e-6, atol=1e-7, msg=k)
    # and the weights are still the parameters' EMA, not a copy of the student
    assert any(not torch.equal(t, s) for t, s in zip(ema.parameters(), method.model.parameters()))


@pytest.mark.parametrize("name, evaluates", [
    ("mean_teacher", "teacher"), ("low_confidence", "teacher"), ("reference_guided", "student"),
    ("pseudo_label", "student"), ("local_contrastive", "student"), ("supervised", "student"),
])
def test_which_network_is_evaluated(name: str, evaluates: str, stage_inputs) -> None:
    method = build(name, stage_inputs(name, range(2), (16, 16), K))  # tests/conftest.py
    assert type(method).evaluates == evaluates
    if evaluates == "teacher":
        assert method.eval_model() is method.teacher and method.teacher is not method.model
    else:
        assert method.eval_model() is method.model
