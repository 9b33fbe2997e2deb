"""After training: calibration metrics (ECE, reliability, per-class precision/recall/F1, top-5), temperature
scaling, and the learning-rate finder, end to end from the composed config on tiny real-format data."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from conftest import FAST, NO_FIGURES, offline_dataset, write_idx
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from src.models.classifier import ECE_BINS, ClassifierModule
from src.runs.checkpoints import read_checkpoint
from src.runs.tuning import fit_temperature
from src.train import train


def test_ece_and_reliability_of_a_hand_made_batch_equal_the_hand_computed_values():
    """Three classes; each image's top-class confidence lies in its own bin, so ECE = mean |correct - confidence|."""
    confidences = torch.tensor([0.95, 0.75, 0.55, 0.40])
    labels = torch.tensor([0, 1, 0, 2])  # right, right, wrong, right
    # Logits whose softmax puts `confidence` on class 0, 1, 1, 2 and splits the rest evenly.
    predicted = torch.tensor([0, 1, 1, 2])
    probabilities = ((1 - confidences) / 2).unsqueeze(1).repeat(1, 3)
    probabilities[torch.arange(4), predicted] = confidences
    images = probabilities.log().view(4, 1, 1, 3)  # the "network" is a flatten: images are the logits
    module = ClassifierModule(nn.Flatten(), class_names=["a", "b", "c"], input_shape=(1, 1, 3), channels_last=False)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (test,) = trainer.test(module, DataLoader(TensorDataset(images, labels), batch_size=2), verbose=False)

    correct = torch.tensor([1.0, 1.0, 0.0, 1.0])
    assert test["test/ece"] == pytest.approx(float((correct - confidences).abs().mean()), abs=1e-6)
    bins = module.test_result.reliability
    assert len(bins) == ECE_BINS and sum(n for _, _, n in bins) == 4
    filled = [(round(c, 4), a) for c, a, n in bins if n]
    assert filled == [(0.40, 1.0), (0.55, 0.0), (0.75, 1.0), (0.95, 1.0)]
    assert module.test_result.precision == {"a": 1.0, "b": 0.5, "c": 1.0}
    assert module.test_result.recall == {"a": 0.5, "b": 1.0, "c": 1.0}


def test_temperature_scaling_lowers_the_nll_of_overconfident_logits():
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (2000,))
    logits = torch.randn(2000, 10)
    logits[torch.arange(2000), labels] += 1.5  # right about half the time...
    overconfident = 6 * logits  # ...but sure of itself
    temperature, before, after = fit_temperature(overconfident, labels)
    assert temperature > 2 and after < before - 0.5
    assert fit_temperature(overconfident / temperature, labels)[0] == pytest.approx(1.0, abs=0.02)


@pytest.fixture
def data(tmp_path):
    write_idx(tmp_path / "data", n_train=120, gz=True)
    return tmp_path / "data"


def test_every_run_reports_ece_top5_per_class_scores_and_a_reliability_diagram(fashion_run):
    metrics = fashion_run.metrics
    assert 0 <= metrics["test/ece"] <= 1 and metrics["test/acc"] <= metrics["test/acc_top5"] <= 1
    for key in ("precision", "recall", "f1"):
        assert set(metrics[f"test/{key}_per_class"]) == set(metrics["class_names"])
        assert all(0 <= v <= 1 for v in metrics[f"test/{key}_per_class"].values() if v is not None), key
    matrix = metrics["test/confusion_matrix"]
    assert sum(b["images"] for b in metrics["test/reliability"]) == sum(map(sum, matrix))
    for i, name in enumerate(metrics["class_names"]):  # recall is the confusion matrix's diagonal over its row
        if sum(matrix[i]):
            assert metrics["test/recall_per_class"][name] == pytest.approx(matrix[i][i] / sum(matrix[i]), abs=1e-6)
    with Image.open(fashion_run.run_dir / "reliability_diagram.png") as image:
        assert image.width > 100 and image.height > 100


def test_calibrate_fits_a_temperature_on_val_and_stores_it_in_the_best_checkpoint(compose_cfg, data, tmp_path):
    overrides = [*offline_dataset("fashion_mnist", data), "model=cnn2", *FAST, *NO_FIGURES, "trainer.max_epochs=3"]
    overrides.append("calibrate=true")
    train(compose_cfg(overrides))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["calibration/val_nll_after"] <= metrics["calibration/val_nll_before"]
    assert "test/ece_uncalibrated" in metrics and "test/ece" in metrics
    temperature = metrics["calibration/temperature"]
    assert temperature > 0 and temperature != 1.0
    assert float(read_checkpoint(metrics["best_checkpoint"])["state_dict"]["temperature"]) == pytest.approx(temperature)
    last = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["state_dict"]  # other weights: not T's
    assert float(last.get("temperature", torch.ones(()))) == 1.0


def test_calibrate_fits_the_temperature_on_the_views_test_averages_not_val_s(tmp_path):
    from src.runs.tuning import CollectLogits, calibrate

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.AdaptiveMaxPool2d(1), nn.Flatten())  # not mirror-symmetric
    module = ClassifierModule(net, list("abc"), (1, 6, 6), config={"tta": "mirror", "val_tta": "none"})
    x, y = torch.randn(8, 1, 6, 6), torch.arange(8) % 3
    data = L.LightningDataModule.from_datasets(val_dataset=TensorDataset(x, y), batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[collect := CollectLogits()], default_root_dir=tmp_path,
    )  # fmt: skip
    calibrate(trainer, module, data)
    with torch.no_grad():
        mirror, plain = 0.5 * net(x) + 0.5 * net(x.flip(-1)), net(x)
    torch.testing.assert_close(torch.cat(collect.logits), mirror)
    assert not torch.allclose(mirror, plain) and module.val_tta == "none"  # and val keeps its own views after


def test_lr_find_trains_with_the_finders_suggestion_and_draws_its_curve(compose_cfg, tmp_path):
    write_idx(tmp_path / "more", n_train=1000)  # the finder takes 100 steps and needs a curve to read
    overrides = [*offline_dataset("fashion_mnist", tmp_path / "more"), "model=mlp", *FAST, *NO_FIGURES, "lr_find=true"]
    train(compose_cfg(overrides))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    suggestion = metrics["lr_find/suggestion"]
    assert 1e-8 < suggestion < 1 and math.isfinite(suggestion)
    with Image.open(tmp_path / "run" / "lr_find.png") as image:
        assert image.width > 100 and image.height > 100
    used = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["optimizer_states"][0]["param_groups"][0]
    assert used["lr"] == pytest.approx(suggestion)
