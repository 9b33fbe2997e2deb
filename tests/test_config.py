"""The composed config itself: every group choice and experiment composes and passes `validate`, and a
value of the wrong type fails at start naming its key (no data, no training)."""

from __future__ import annotations

import pytest
from conftest import CONF_DIR

from src.config import ConfigError, validate

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def test_default_config_composes_and_validates(compose_cfg):
    cfg = compose_cfg([])
    validate(cfg)
    assert cfg.dataset._target_ == "src.data.mnist.FashionMNISTDataModule"
    assert cfg.dataset.seed == cfg.seed  # the split follows the run seed


@pytest.mark.parametrize(
    "overrides",
    [
        ["dataset=mnist", "model=lenet", "optimizer=sgd", "scheduler=step"],
        ["dataset=cifar10", "model=cnn3", "optimizer=adamw", "scheduler=cosine"],
        ["dataset=image_folder", "dataset.data_dir=/tmp/x", "dataset.size=[32,32]", "model=mlp"],
        ["dataset=image_folder", "dataset.data_dir=/tmp/x", "dataset.size=32", "model=cnn2", "seed=0"],
    ],
    ids=["mnist-lenet-sgd-step", "cifar10-cnn3-adamw-cosine", "image_folder-size-list", "image_folder-size-int"],
)
def test_group_choices_compose_and_validate(compose_cfg, overrides):
    validate(compose_cfg(overrides))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_validates(compose_cfg, experiment):
    cfg = compose_cfg([f"experiment={experiment}"])
    validate(cfg)
    assert cfg.trainer.max_epochs >= 1


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.max_epochs=abc", "trainer.max_epochs"),
        ("dataset.batch_size=abc", "dataset.batch_size"),
        ("dataset.val_fraction=abc", "dataset.val_fraction"),
        ("optimizer.lr=fast", "optimizer.lr"),
        ("model.hidden=abc", "model.hidden"),
        ("seed=abc", "seed"),
    ],
)
def test_wrong_value_type_is_a_config_error_naming_the_key(compose_cfg, override, key):
    cfg = compose_cfg(["model=mlp", override])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert str(info.value).startswith(f"{key}=")
