"""The composed config itself: every group choice and experiment composes and passes `validate`, and a
value of the wrong type fails at start naming its key (no data, no training)."""

from __future__ import annotations

import pytest
from conftest import CONF_DIR
from omegaconf import OmegaConf

from src.utils.config import ConfigError, validate

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def test_default_config_composes_and_validates(compose_cfg):
    cfg = compose_cfg([])
    validate(cfg)
    assert cfg.dataset._target_ == "src.data.mnist.FashionMNISTDataModule"
    assert cfg.dataset.seed == cfg.seed  # the split follows the run seed


@pytest.mark.parametrize(
    ("overrides", "targets"),
    [
        (
            ["dataset=mnist", "model=lenet", "optimizer=sgd", "scheduler=step"],
            ("mnist.MNISTDataModule", "cnn2.CNN2", "SGD", "StepLR"),
        ),
        (
            ["dataset=cifar10", "model=cnn3", "optimizer=adamw", "scheduler=cosine"],
            ("cifar10.CIFAR10DataModule", "cnn3.CNN3", "AdamW", "CosineAnnealingLR"),
        ),
        (
            ["dataset=image_folder", "dataset.data_dir=/tmp/x", "dataset.size=[32,32]", "model=mlp"],
            ("image_folder.ImageFolderDataModule", "mlp.MLP", "Adam", None),
        ),
        (
            ["dataset=image_folder", "dataset.data_dir=/tmp/x", "dataset.size=32", "model=cnn2", "seed=0"],
            ("image_folder.ImageFolderDataModule", "cnn2.CNN2", "Adam", None),
        ),
    ],
    ids=["mnist-lenet-sgd-step", "cifar10-cnn3-adamw-cosine", "image_folder-size-list", "image_folder-size-int"],
)
def test_group_choices_compose_and_validate(compose_cfg, overrides, targets):
    cfg = compose_cfg(overrides)
    validate(cfg)
    dataset, model, optimizer, scheduler = targets
    assert cfg.dataset._target_ == f"src.data.{dataset}" and cfg.model._target_ == f"src.models.{model}"
    assert cfg.optimizer._target_ == f"torch.optim.{optimizer}"
    if scheduler is None:
        assert cfg.get("scheduler") is None
    else:
        assert cfg.scheduler._target_ == f"torch.optim.lr_scheduler.{scheduler}"
    assert cfg.dataset.seed == cfg.seed


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_validates(compose_cfg, experiment):
    """The experiment's own values win over the groups' defaults, and the result validates."""
    cfg = compose_cfg([f"experiment={experiment}"])
    validate(cfg)
    own = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "experiment" / f"{experiment}.yaml"))
    own.pop("defaults", None)

    def leaves(node, prefix=""):
        if isinstance(node, dict):
            for key, child in node.items():
                yield from leaves(child, f"{prefix}{key}.")
        else:
            yield prefix[:-1], node

    settings = dict(leaves(own))
    assert "trainer.max_epochs" in settings, "an experiment says how long it trains"
    composed = OmegaConf.to_container(cfg, resolve=False)  # interpolations (`${fast_precision:...}`) as written
    for key, value in settings.items():
        node = composed
        for part in key.split("."):
            node = node[part]
        assert node == value, key


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


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("dataset=nope", ["dataset/nope", "cifar10", "fashion_mnist", "image_folder", "mnist"]),
        ("model=nope", ["model/nope", "cnn2", "cnn3", "lenet", "mlp"]),
        ("trainer.max_epocs=1", ["trainer.max_epocs"]),
    ],
)
def test_unknown_choice_or_misspelt_key_fails_at_composition_naming_it(compose_cfg, override, words):
    """In-process, what `python -m src.train dataset=nope` prints (tests/test_cli.py, slow tier)."""
    from hydra.errors import ConfigCompositionException, MissingConfigException

    with pytest.raises((MissingConfigException, ConfigCompositionException)) as info:
        compose_cfg([override])
    assert all(word in str(info.value) for word in words), str(info.value)
