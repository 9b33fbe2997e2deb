"""The speed-run options (src/speed.py): test-time augmentation, EMA of the weights, stem whitening."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import FAST, NO_FIGURES, offline_dataset, write_cifar_batches, write_idx
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from src.callbacks.speed import EMA, WhitenStem, patch_moment, whitening_filters
from src.models.airbench import AirbenchNet
from src.models.bn_convnet import BNConvNet
from src.models.classifier import ClassifierModule, MuonSGD, tta_logits, warmup_then_decay
from src.train import build_module, train
from src.utils.errors import UserError
from src.utils.resolvers import fast_precision

TINY = ["model=bn_convnet", "model.widths=[8,16,16]", "model.stem=8", "dataset.batch_size=8"]


def tiny_module(tta: str = "none", seed: int = 0) -> ClassifierModule:
    torch.manual_seed(seed)
    net = BNConvNet((3, 8, 8), 3, widths=[4], stem=6, convs_per_block=2, logit_scale=1.0, whiten=False)
    return ClassifierModule(
        net, ["a", "b", "c"], (3, 8, 8), optimizer=functools.partial(torch.optim.SGD, lr=0.5, momentum=0.9), tta=tta
    )


def tiny_loader(n: int = 12, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % 3), batch_size=batch_size)


def tiny_trainer(tmp_path: Path, callbacks: list, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=callbacks, **kwargs,
    )  # fmt: skip


# --- test-time augmentation -------------------------------------------------------------------------------
def reflect_shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x moved by (dy, dx) = +-1 pixel, the uncovered border filled by reflection, by explicit indexing."""

    def index(n: int, d: int) -> torch.Tensor:
        i = torch.arange(n) - d
        return torch.where(i < 0, -i, torch.where(i > n - 1, 2 * (n - 1) - i, i))

    return x[..., index(x.shape[-2], dy), :][..., index(x.shape[-1], dx)]


def hand_tta(forward, x: torch.Tensor, tta: str) -> torch.Tensor:
    if tta == "mirror":
        return (forward(x) + forward(x.flip(-1))) / 2
    views = [(1 / 4, x), (1 / 4, x.flip(-1))]
    for v in (reflect_shift(x, 1, 1), reflect_shift(x, -1, -1)):
        views += [(1 / 8, v), (1 / 8, v.flip(-1))]
    return sum(w * forward(v) for w, v in views)


def test_mirror_tta_of_a_mirror_symmetric_image_is_the_plain_prediction():
    module = tiny_module().eval()
    x = torch.randn(5, 3, 8, 8)
    x = (x + x.flip(-1)) / 2
    with torch.no_grad():
        torch.testing.assert_close(tta_logits(module, x, "mirror"), module(x))
        assert not torch.allclose(tta_logits(module, torch.randn(5, 3, 8, 8), "mirror"), module(x))


@pytest.mark.parametrize("tta", ["mirror", "mirror_translate"])
@pytest.mark.parametrize("stage", ["validate", "test"])
def test_val_and_test_steps_average_the_logits_of_the_views(tmp_path, tta, stage):
    module = tiny_module(tta)
    logits = []

    class Collect(L.Callback):
        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            logits.append(outputs["logits"])

        on_test_batch_end = on_validation_batch_end

    loader = tiny_loader()
    getattr(tiny_trainer(tmp_path, [Collect()]), stage)(module, loader, verbose=False)
    module.eval()
    with torch.no_grad():
        expected = torch.cat([hand_tta(module, x, tta) for x, _ in loader])
        torch.testing.assert_close(torch.cat(logits), expected)
        assert not torch.allclose(expected, torch.cat([module(x) for x, _ in loader]))


def test_val_tta_takes_tta_s_place_in_validation_only(tmp_path):
    module = ClassifierModule(
        tiny_module().net, list("abc"), (3, 8, 8), config={"tta": "mirror", "val_tta": "none"}
    )  # fmt: skip
    assert (module.tta, module.val_tta) == ("mirror", "none")
    assert ClassifierModule(torch.nn.Flatten(), ["a", "b"], (1, 2, 2), config={"tta": "mirror"}).val_tta == "mirror"
    logits = {}

    class Collect(L.Callback):
        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            logits.setdefault("validate", []).append(outputs["logits"])

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            logits.setdefault("test", []).append(outputs["logits"])

    loader = tiny_loader()
    for stage in ("validate", "test"):
        getattr(tiny_trainer(tmp_path, [Collect()]), stage)(module, loader, verbose=False)
    module.eval()
    with torch.no_grad():
        plain = torch.cat([module(x) for x, _ in loader])
        torch.testing.assert_close(torch.cat(logits["validate"]), plain)
        assert not torch.allclose(torch.cat(logits["test"]), plain)
        torch.testing.assert_close(
            torch.cat(logits["test"]), torch.cat([hand_tta(module, x, "mirror") for x, _ in loader])
        )


def test_training_step_sees_only_the_plain_image():
    module = tiny_module("mirror_translate").train()
    seen = []
    module.net.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    module.trainer = SimpleNamespace(log_every_n_steps=0, global_step=0)
    x, y = next(iter(tiny_loader()))
    module.training_step((x, y), 0)
    assert seen == [len(x)]


@pytest.mark.parametrize("value", ["flip", None, "Mirror"])
def test_unknown_tta_is_a_user_error_naming_tta(value):
    with pytest.raises(UserError, match="^tta="):
        ClassifierModule(torch.nn.Flatten(), ["a", "b"], (1, 2, 2), config={"tta": value})
    with pytest.raises(UserError, match="^val_tta="):
        ClassifierModule(torch.nn.Flatten(), ["a", "b"], (1, 2, 2), config={"val_tta": "flip"})


def test_tta_comes_from_the_run_config_by_default():
    module = ClassifierModule(torch.nn.Flatten(), ["a", "b"], (1, 2, 2), config={"tta": "mirror"})
    assert module.tta == "mirror"
    assert ClassifierModule(torch.nn.Flatten(), ["a", "b"], (1, 2, 2)).tta == "none"


# --- EMA of the weights -------------------------------------------------------------------------------------
def float_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


class RecordWeights(L.Callback):
    """The weights after every optimizer step, at the start of fitting, and as validation/test see them."""

    def __init__(self) -> None:
        self.steps, self.at_start, self.val, self.test = [], None, [], []

    def on_train_start(self, trainer, pl_module):
        self.at_start = float_state(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(float_state(pl_module))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val.append(float_state(pl_module))

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.test.append(float_state(pl_module))


def hand_ema(steps: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    average = dict(steps[0])  # the first update copies the weights
    for weights in steps[1:]:
        average = {k: decay * average[k] + (1 - decay) * weights[k] for k in average}
    return average


def assert_state_close(actual: dict, expected: dict) -> None:
    assert set(expected) <= set(actual)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key].float(), value.float(), msg=key)


def test_ema_is_the_hand_computed_average_in_validation_checkpoints_test_and_resume(tmp_path):
    decay = 0.6
    record, checkpoint = RecordWeights(), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = tiny_trainer(tmp_path, [EMA(decay), record, checkpoint], max_epochs=1, enable_checkpointing=True)
    loader = tiny_loader()  # 3 steps an epoch
    trainer.fit(tiny_module(), loader, loader)
    assert len(record.steps) == 3
    average = hand_ema(record.steps, decay)
    assert not torch.allclose(average["net.stem.0.weight"], record.steps[-1]["net.stem.0.weight"])
    assert_state_close(record.val[0], average)  # validation swaps the average in
    ckpt = torch.load(checkpoint.last_model_path, weights_only=True)
    assert_state_close(ckpt["state_dict"], average)  # checkpointed as the model
    assert_state_close(ckpt["current_model_state"], record.steps[-1])  # the training weights, for resuming

    # After fit, validate/test from the checkpoint see the average (and nothing swaps it out again).
    record.val.clear()
    trainer.validate(tiny_module(seed=5), loader, ckpt_path=checkpoint.last_model_path, verbose=False)
    trainer.test(tiny_module(seed=5), loader, ckpt_path=checkpoint.last_model_path, verbose=False)
    assert_state_close(record.val[0], average)
    assert_state_close(record.test[0], average)

    # Resuming continues from the training weights and the stored average.
    resumed = RecordWeights()
    trainer = tiny_trainer(tmp_path, [EMA(decay), resumed], max_epochs=2, enable_checkpointing=False)
    trainer.fit(tiny_module(seed=5), loader, loader, ckpt_path=checkpoint.last_model_path, weights_only=True)
    assert_state_close(resumed.at_start, record.steps[-1])
    assert len(resumed.steps) == 3
    assert_state_close(resumed.val[0], hand_ema(record.steps + resumed.steps, decay))


def test_ema_decay_outside_0_1_is_a_user_error():
    with pytest.raises(UserError, match="ema_decay"):
        EMA(1.5)


# --- stem whitening ------------------------------------------------------------------------------------------
def smooth_images(n: int, channels: int = 3, size: int = 12, seed: int = 0) -> torch.Tensor:
    """Correlated pixels (neighbours and channels), so whitening has something to undo."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, channels, size + 2, size + 2)
    x = torch.randn(n, 1, *shape[2:], generator=g) + 0.3 * torch.randn(shape, generator=g)
    return torch.nn.functional.avg_pool2d(x, 3, stride=1)


def assert_whitened(filters: torch.Tensor, images: torch.Tensor, eps: float, kernel_size: int = 3) -> None:
    """Filter outputs over the patches: uncorrelated, second moment lambda/(lambda+eps) (~1), +-pairs."""
    moment, count = patch_moment(images, kernel_size)
    moment = moment / count
    k = len(filters) // 2
    flat = filters.reshape(len(filters), -1).double()
    torch.testing.assert_close(flat[k:], -flat[:k])
    eigenvalues = torch.linalg.eigvalsh(moment).flip(0)[:k]
    out_moment = flat[:k] @ moment @ flat[:k].T
    torch.testing.assert_close(out_moment, torch.diag(eigenvalues / (eigenvalues + eps)), atol=1e-6, rtol=1e-6)
    strong = eigenvalues > 100 * eps  # identity along the directions well above eps
    assert strong.any()
    torch.testing.assert_close(torch.diag(out_moment)[strong], torch.ones_like(eigenvalues[strong]), atol=0.01, rtol=0)


@pytest.mark.parametrize(("n_filters", "pairs"), [(64, 27), (32, 16), (8, 4)])
def test_whitening_filters_are_pairs_of_scaled_eigenvectors_with_identity_output_moment(n_filters, pairs):
    images = smooth_images(40)
    moment, count = patch_moment(images, 3)
    filters = whitening_filters(moment / count, n_filters, eps=5e-4)
    assert filters.shape == (2 * pairs, 27)
    assert_whitened(filters, images, 5e-4)


def test_whiten_stem_uses_the_normalized_training_batches_and_skips_resumed_fits(compose_cfg, tmp_path):
    write_cifar_batches(tmp_path / "data", per_batch=12)
    cfg = compose_cfg([*offline_dataset("cifar10", tmp_path / "data"), *FAST, *TINY, "model.whiten=true"])
    datamodule = instantiate(cfg.dataset)
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = build_module(cfg, datamodule)
    before = module.net.stem_conv.weight.detach().clone()
    trainer = tiny_trainer(tmp_path, [WhitenStem(images=20, eps=5e-4)], max_epochs=0)
    trainer.fit(module, datamodule=datamodule)
    weight = module.net.stem_conv.weight.detach()
    assert not torch.allclose(weight[:8], before[:8])
    loader = datamodule.train_dataloader()
    images = torch.cat([datamodule.on_after_batch_transfer(b, 0)[0] for b in loader])[:20]  # normalized
    assert images.mean().abs() < 0.5 and images.dtype == torch.float32
    assert_whitened(weight[:8], images, 5e-4)  # stem=8: the 4 strongest directions, +-

    resumed = SimpleNamespace(ckpt_path="last.ckpt", datamodule=datamodule)
    WhitenStem().on_fit_start(resumed, SimpleNamespace(net=module.net))
    torch.testing.assert_close(module.net.stem_conv.weight, weight)


# --- end to end ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("option", ["tta=mirror", "tta=mirror_translate", "ema_decay=0.9", "model.whiten=true"])
def test_each_option_runs_end_to_end(compose_cfg, tmp_path, option):
    write_cifar_batches(tmp_path / "data", per_batch=12)
    run_dir = tmp_path / "run"
    cfg = compose_cfg([*offline_dataset("cifar10", tmp_path / "data"), *FAST, *TINY, option], run_dir)
    result = train(cfg)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert result == pytest.approx(metrics[cfg.optimized_metric])
    assert 0.0 <= metrics["test/acc"] <= 1.0
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ("current_model_state" in last) == option.startswith("ema")
    if option.startswith("ema"):  # resuming a run with EMA continues it
        resumed = compose_cfg(
            [*offline_dataset("cifar10", tmp_path / "data"), *FAST, *TINY, option, "trainer.max_epochs=2",
             f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"], run_dir,
        )  # fmt: skip
        train(resumed)
        assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 2


# --- airbench's network, optimizer groups and schedule ---------------------------------------------------------
def airbench(whiten: bool = True, bn_scale: bool = False) -> AirbenchNet:
    torch.manual_seed(0)
    return AirbenchNet(
        (3, 12, 12), 4, widths=[8, 16], bn_momentum=0.4, bn_scale=bn_scale, logit_scale=1 / 9, whiten=whiten
    )


def test_airbench_net_freezes_whitened_stem_and_bn_scales_and_starts_convs_as_identity():
    net = airbench()
    assert net(torch.randn(2, 3, 12, 12)).shape == (2, 4)
    assert net.stem_conv.weight.shape == (24, 3, 2, 2)  # a +-pair for each of the 12 directions of a 2x2x3 patch
    assert not net.stem_conv.weight.requires_grad and net.stem_conv.bias.requires_grad
    assert airbench(whiten=False).stem_conv.weight.requires_grad
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(not m.weight.requires_grad and m.bias.requires_grad for m in norms)
    assert all(m.weight.requires_grad for m in airbench(bn_scale=True).modules() if isinstance(m, torch.nn.BatchNorm2d))
    conv = net.blocks[1].conv1  # 8 -> 16 channels: its first 8 filters pass their input channel through
    x = torch.randn(1, 8, 5, 5)
    torch.testing.assert_close(torch.nn.functional.conv2d(x, conv.weight[:8], padding=1), x)


def test_airbench_net_whitening_sets_all_stem_filters(compose_cfg, tmp_path):
    write_cifar_batches(tmp_path / "data", per_batch=12)
    cfg = compose_cfg([*offline_dataset("cifar10", tmp_path / "data"), *FAST, "model=airbench", "model.widths=[8,8,8]"])
    datamodule = instantiate(cfg.dataset)
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = build_module(cfg, datamodule)
    tiny_trainer(tmp_path, [WhitenStem(images=20, eps=5e-4)], max_epochs=0).fit(module, datamodule=datamodule)
    loader = datamodule.train_dataloader()
    images = torch.cat([datamodule.on_after_batch_transfer(b, 0)[0] for b in loader])[:20]
    assert_whitened(module.net.stem_conv.weight.detach(), images, 5e-4, kernel_size=2)


def optimizer_of(module: ClassifierModule, steps: int = 100):
    module.trainer = SimpleNamespace(estimated_stepping_batches=steps)  # what configure_optimizers reads
    return module.configure_optimizers()


def grouped_module(scale: float, scheduler=None, optimizer=torch.optim.SGD, **extra) -> ClassifierModule:
    sgd = functools.partial(optimizer, lr=0.5, momentum=0.85, nesterov=True, weight_decay=1e-3, **extra)
    settings = {"interval": "step", "total_steps_key": "total_steps"} if scheduler else None
    return ClassifierModule(
        airbench(), list("abcd"), (3, 12, 12), optimizer=sgd, scheduler=scheduler, lr_scheduler=settings,
        norm_lr_scale=scale,
    )  # fmt: skip


def test_norm_lr_scale_gives_norm_parameters_scaled_lr_and_divided_weight_decay():
    module = grouped_module(64.0)
    others, norms = optimizer_of(module).param_groups
    norm_ids = {id(p) for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    assert {id(p) for p in norms["params"]} == norm_ids and not norm_ids & {id(p) for p in others["params"]}
    assert len(others["params"]) + len(norms["params"]) == len(list(module.parameters()))
    assert (others["lr"], norms["lr"]) == (0.5, 32.0)
    assert (others["weight_decay"], norms["weight_decay"]) == (1e-3, pytest.approx(1e-3 / 64))
    assert len(optimizer_of(grouped_module(1.0)).param_groups) == 1  # the default: one group, as before


def test_warmup_decay_rises_from_a_fifth_to_the_peak_then_falls_to_7_percent_keeping_group_ratios():
    scheduler = functools.partial(warmup_then_decay, warmup=0.25, start_factor=0.2, end_factor=0.07)
    configured = optimizer_of(grouped_module(64.0, scheduler), steps=100)
    optimizer, lr_scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(100):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        lr_scheduler.step()
    seen.append([group["lr"] for group in optimizer.param_groups])
    others = [lrs[0] for lrs in seen]
    assert others[0] == pytest.approx(0.1) and others[25] == pytest.approx(0.5) and others[100] == pytest.approx(0.035)
    assert others[10] == pytest.approx(0.5 * (0.2 + 0.8 * 10 / 25))
    assert others[60] == pytest.approx(0.5 * (1 - 0.93 * 35 / 75))
    assert all(lrs[1] == pytest.approx(64 * lrs[0]) for lrs in seen)


def test_groups_with_their_own_rates_and_a_scheduler_that_sets_one_rate_for_all_is_a_user_error():
    onecycle = functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.5)
    with pytest.raises(UserError, match=r"\(norm_lr_scale=64.0\) need a scheduler that multiplies every group's"):
        optimizer_of(grouped_module(64.0, onecycle))
    with pytest.raises(UserError, match=r"\(muon_lr\) need a scheduler that multiplies every group's rate and keeps"):
        optimizer_of(grouped_module(1.0, onecycle, MuonSGD, muon_lr=0.5, muon_momentum=0.6))  # same rate: momentum


def test_muon_sgd_steps_conv_filters_by_orthogonalized_momentum_and_the_rest_as_sgd():
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, _zeropower_via_newtonschulz

    NS = (DEFAULT_A, DEFAULT_B, DEFAULT_C)
    scheduler = functools.partial(warmup_then_decay, warmup=0.0, start_factor=1.0, end_factor=0.5)
    module = grouped_module(64.0, scheduler, MuonSGD, muon_lr=0.1, muon_momentum=0.6)
    configured = optimizer_of(module, steps=10)
    optimizer, lr_scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    filters = [p for p in module.parameters() if p.ndim == 4 and p.requires_grad]
    muon = [group for group in optimizer.param_groups if group.get("muon")]
    assert [id(p) for group in muon for p in group["params"] if p.requires_grad] == [id(p) for p in filters]
    assert [(g["lr"], g["momentum"], g["weight_decay"]) for g in muon] == [(0.1, 0.6, 0.0)]
    assert sorted(g["lr"] for g in optimizer.param_groups if not g.get("muon")) == [0.5, 32.0]  # norm_lr_scale holds
    sgd_twin = grouped_module(64.0)  # the same net under plain SGD
    sgd_optimizer = optimizer_of(sgd_twin)
    stem = module.net.stem.weight.detach().clone()
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    buffers = [torch.zeros_like(p) for p in filters]
    for step in range(2):  # the second step has a momentum, from another batch's gradient
        x = torch.randn(6, 3, 12, 12)
        before = [p.detach().clone() for p in filters]
        for net, opt in ((module, optimizer), (sgd_twin, sgd_optimizer)):
            torch.nn.functional.cross_entropy(net(x), y).backward()
            if net is module:
                grads = [p.grad.clone() for p in filters]
            opt.step()
            opt.zero_grad()
        for old, new, grad, buffer in zip(before, filters, grads, buffers, strict=True):
            buffer.mul_(0.6).add_(grad)  # airbench94_muon's Muon, written out: Nesterov momentum 0.6 ...
            direction = _zeropower_via_newtonschulz((grad + 0.6 * buffer).flatten(1), NS, 3, 1e-7).view_as(old)
            expected = old * len(old) ** 0.5 / old.norm() - 0.1 * direction  # ... at lr 0.1
            assert (new.detach() - expected).norm() < 0.01 * (0.1 * direction).norm()  # bf16 inside: ~0.4% apart
            update = (new.detach() - old * len(old) ** 0.5 / old.norm()).flatten(1)
            singular = torch.linalg.svdvals(update / -0.1)
            assert 0.3 < singular.min() and singular.max() < 1.7  # orthogonalized: all directions move alike
            assert (update * grad.flatten(1)).sum() < 0  # downhill
        if step == 0:  # same grads before the filters differ: the other parameters took SGD's own step
            twins = dict(sgd_twin.named_parameters())
            assert all(torch.equal(p, twins[n]) for n, p in module.named_parameters() if p.ndim != 4)
    assert torch.equal(module.net.stem.weight, stem)  # frozen: never stepped
    lr_scheduler.step()
    assert muon[0]["lr"] == pytest.approx(0.1 * (1 - 0.5 / 10))  # the scheduler multiplies the filters' rate too


@pytest.mark.slow
def test_compile_keeps_parameter_names_and_outputs():
    plain = grouped_module(1.0).eval()
    compiled = grouped_module(1.0)
    compiled.net.compile()
    compiled.eval()
    assert list(compiled.state_dict()) == list(plain.state_dict())
    x = torch.randn(3, 3, 12, 12)
    torch.testing.assert_close(compiled(x), plain(x), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["fast_cifar10", "fast_fashion_mnist", "fast_mnist"])
def test_recipes_run_end_to_end_on_tiny_data(compose_cfg, tmp_path, recipe):
    data = tmp_path / "data"
    if recipe == "fast_cifar10":
        write_cifar_batches(data, per_batch=40)
        # with the first epoch on 24x24 images: the net pools globally, the second epoch sees whole images
        dataset, shrink = "cifar10", ["model.widths=[8,16,16]", "dataset.early_crop=24", "dataset.early_crop_epochs=1"]
    else:
        dataset = "mnist" if recipe == "fast_mnist" else "fashion_mnist"
        write_idx(data / ("MNIST" if dataset == "mnist" else "FashionMNIST") / "raw", n_train=200)
        shrink = ["model.widths=[8,16,16]", "model.stem=8"]
    run_dir = tmp_path / "run"
    overrides = [f"experiment={recipe}", *offline_dataset(dataset, data), "trainer.max_epochs=2", *shrink]
    cfg = compose_cfg([*overrides, "dataset.batch_size=32", "trainer.precision=32-true", *NO_FIGURES], run_dir)
    train(cfg)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and 0.0 <= metrics["test/acc"] <= 1.0


def test_early_crops_for_a_net_that_flattens_are_one_user_error_before_fitting(compose_cfg, tmp_path):
    write_idx(tmp_path / "data" / "FashionMNIST" / "raw", n_train=80)
    crops = ["dataset.early_crop=20", "dataset.early_crop_epochs=1"]
    overrides = [*offline_dataset("fashion_mnist", tmp_path / "data"), *FAST, *NO_FIGURES, "model=cnn2", *crops]
    with pytest.raises(UserError, match="early_crop=20: this model cannot take 20x20 images; early crops need a net"):
        train(compose_cfg(overrides, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before fitting


@pytest.mark.parametrize(
    ("accelerator", "cpu_bf16", "cuda", "cuda_bf16", "expected"),
    [
        ("cpu", False, False, False, "32-true"),  # AVX2-only: emulated bf16 is an order of magnitude slower
        ("cpu", True, False, False, "bf16-mixed"),
        ("auto", True, False, False, "bf16-mixed"),
        ("auto", False, True, True, "bf16-mixed"),  # a CUDA GPU with bf16 comes first under auto
        ("gpu", False, True, True, "bf16-mixed"),
        ("gpu", False, True, False, "16-mixed"),  # a GPU without bf16 gets fp16 autocast
        ("mps", True, False, False, "32-true"),
    ],
)
def test_fast_precision_is_bf16_only_where_the_hardware_has_it(
    monkeypatch, accelerator, cpu_bf16, cuda, cuda_bf16, expected
):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: cpu_bf16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert fast_precision(accelerator) == expected


def test_auto_on_apple_mps_is_full_precision(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert fast_precision("auto") == fast_precision("gpu") == "32-true"


@pytest.mark.parametrize("recipe", ["fast_cifar10", "fast_fashion_mnist", "fast_mnist", "fast_cifar10_gpu"])
def test_recipes_resolve_their_precision_for_the_machine(compose_cfg, monkeypatch, recipe):
    """A CPU without bf16 beside a CUDA GPU with it: the CPU recipes run in fp32, the GPU recipe in bf16."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    overrides = [f"experiment={recipe}"] + ([] if recipe == "fast_cifar10_gpu" else ["trainer.accelerator=cpu"])
    expected = "bf16-mixed" if recipe == "fast_cifar10_gpu" else "32-true"
    assert compose_cfg(overrides).trainer.precision == expected
    assert compose_cfg([*overrides, "trainer.precision=16-mixed"]).trainer.precision == "16-mixed"


def test_no_profiler_wraps_no_hook_in_one_and_debug_profiler_and_barebones_still_work(compose_cfg, tmp_path):
    from lightning.pytorch.profilers import PassThroughProfiler, SimpleProfiler

    from src.runs.record import build_trainer

    plain = build_trainer(compose_cfg([f"paths.output_dir={tmp_path}"])).profiler
    assert isinstance(plain, PassThroughProfiler) and not hasattr(plain.profile("hook"), "gen")  # no generator
    with plain.profile("hook") as name:
        assert name == "hook"
    profiled = build_trainer(compose_cfg([f"paths.output_dir={tmp_path}", "debug=profiler"]))
    assert isinstance(profiled.profiler, SimpleProfiler)
    off = ["callbacks=none", "logger=none", "trainer.enable_progress_bar=false", "++trainer.enable_checkpointing=false"]
    off += ["trainer.enable_model_summary=false", "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=null"]
    assert build_trainer(compose_cfg([*off, "+trainer.barebones=true"])).barebones  # which refuses any profiler


@pytest.mark.parametrize("nvml", [True, False])
def test_cuda_checks_skip_nvml_only_where_it_cannot_be_loaded(monkeypatch, nvml):
    import ctypes

    from src.runs.record import skip_missing_nvml

    def load(name: str) -> object:
        if not nvml:
            raise OSError(f"{name}: cannot open shared object file")
        return object()

    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    monkeypatch.setattr(ctypes, "CDLL", load)
    skip_missing_nvml()
    assert (os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1") is nvml
