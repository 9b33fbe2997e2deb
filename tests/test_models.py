"""Every model config in conf/model builds for any input shape and class count and returns logits."""

from __future__ import annotations

import pytest
import torch
from conftest import CONF_DIR
from hydra.utils import instantiate
from omegaconf import OmegaConf

from src.utils.errors import UserError, is_user_error, one_line

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
SHAPES = [(1, 28, 28), (3, 32, 32), (3, 64, 48)]


def build(model: str, input_shape, num_classes: int) -> torch.nn.Module:
    cfg = OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml")
    return instantiate(cfg, input_shape=input_shape, num_classes=num_classes)


@pytest.mark.parametrize("num_classes", [10, 3])
@pytest.mark.parametrize("input_shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("model", MODELS)
def test_model_forward_gives_one_logit_per_class(model, input_shape, num_classes):
    torch.manual_seed(0)
    net = build(model, input_shape, num_classes).eval()
    with torch.no_grad():
        out = net(torch.randn(4, *input_shape))
    assert out.shape == (4, num_classes)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("model", MODELS)
def test_model_trains_one_step(model):
    torch.manual_seed(0)
    net = build(model, (3, 32, 32), 3)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    before = [p.detach().clone() for p in net.parameters()]
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    for name, p in net.named_parameters():  # frozen ones (airbench's whitened stem, BN scales) get none
        assert (p.grad is not None and torch.isfinite(p.grad).all()) == p.requires_grad, name
    assert any(p.grad.abs().sum() > 0 for p in net.parameters() if p.grad is not None)
    optimizer.step()
    assert all(
        not torch.equal(p, b)
        for p, b in zip(net.parameters(), before, strict=True)
        if p.grad is not None and p.grad.any()
    )


def test_lenet_on_mnist_has_60074_parameters():
    net = build("lenet", (1, 28, 28), 10)
    assert sum(p.numel() for p in net.parameters()) == 60074


@pytest.mark.parametrize(
    ("model", "shape", "message"),
    [
        ("bn_convnet", (3, 6, 6), "(3, 6, 6) are too small for 3 pooling blocks"),
        ("cnn2", (1, 4, 4), "(1, 4, 4) are too small"),
    ],
)
def test_too_small_images_are_a_user_error_naming_the_shape(model, shape, message):
    with pytest.raises(Exception) as info:  # Hydra's InstantiationException around the model's UserError
        build(model, shape, 10)
    assert is_user_error(info.value) and isinstance(info.value.__cause__, UserError)
    assert message in one_line(info.value)


def test_model_settings_are_written_only_in_the_model_configs():
    """No Python defaults to drift from conf/model/*.yaml: every setting a config names is required."""
    import inspect

    from hydra.utils import get_class

    for model in MODELS:
        cfg = OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml")
        parameters = inspect.signature(get_class(cfg._target_)).parameters
        assert all(parameters[key].default is inspect.Parameter.empty for key in cfg if key != "_target_"), model
