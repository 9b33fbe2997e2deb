"""Sweeps through the real CLI on tiny data (slow tier): the results table (with a crashed run), `summarize`,
Optuna, submitit_local, and DDP on two CPU processes counting every test image once. In the fast tier: the
table of a folder of runs written by hand, and the sweep folder names."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from conftest import FAST, REPO_ROOT, UNEVEN_TEST_LABELS, offline_dataset, run_cli, write_idx

CRASH = ["+callbacks.crash._target_=crash.RaiseDuringEpoch", "+callbacks.crash.epoch=1", "+callbacks.crash.batch=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fashion")
    write_idx(root, n_train=80, gz=True)
    return root


def tiny(data) -> list[str]:
    return [*offline_dataset("fashion_mnist", data), *[o for o in FAST if not o.startswith("trainer.max_epochs")]]


@pytest.mark.slow
def test_sweep_writes_a_table_and_marks_the_crashed_run_failed(data, tmp_path):
    sweep = tmp_path / "sweep"
    # 2 models x 2 epoch counts; the crash callback fires in epoch 2, so the max_epochs=2 runs crash mid-way.
    args = ["-m", *tiny(data), "model=mlp,cnn2", "trainer.max_epochs=1,2", *CRASH, f"hydra.sweep.dir={sweep}"]
    result = run_cli(*args, env={"PYTHONPATH": str(REPO_ROOT / "tests")})
    assert result.returncode == 1, result.stderr  # a failed run makes the sweep fail, after all runs
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 4
    status = {r["overrides"]: r["status"] for r in rows}
    assert status == {
        "model=mlp trainer.max_epochs=1": "COMPLETED",
        "model=mlp trainer.max_epochs=2": "FAILED",
        "model=cnn2 trainer.max_epochs=1": "COMPLETED",
        "model=cnn2 trainer.max_epochs=2": "FAILED",
    }
    completed = [r for r in rows if r["status"] == "COMPLETED"]
    assert [r["run"] for r in rows[:2]] == [r["run"] for r in completed], "completed runs first"
    assert float(completed[0]["val/acc"]) >= float(completed[1]["val/acc"]), "sorted by val/acc"
    assert all(r["test/acc"] and r["wall_time_s"] and r["epochs"] == "1" for r in completed)
    assert "simulated crash in epoch 1" in (sweep / "summary.md").read_text()
    # Each run's folder, and so its TensorBoard run, is named by what the sweep varies.
    assert {r["run"].split("_", 1)[1] for r in rows} == {
        f"model={m},trainer.max_epochs={e}" for m in ("mlp", "cnn2") for e in (1, 2)
    }
    assert len({p.parent.parent.name for p in sweep.glob("*/tensorboard/events.out.tfevents.*")}) == 4

    again = subprocess.run(
        [sys.executable, "-m", "src.summarize", str(sweep), "--metric", "val/loss"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0 and "Sorted by val/loss" in again.stdout, again.stderr
    losses = [float(r["val/loss"]) for r in csv.DictReader((sweep / "summary.csv").open()) if r["val/loss"]]
    assert len(losses) == 2 and losses == sorted(losses)  # the table rewritten, lowest loss first


def test_sweep_folder_names_hold_only_the_varying_overrides(monkeypatch):
    from src.runs.sweeps import varying_keys
    from src.utils.resolvers import SWEEP_KEYS, sweep_subdir

    given = ["model=mlp,cnn2", "optimizer.lr=range(1,3)", "model.hidden=[8,16]", "+x=glob(*)", "seed=1"]
    assert varying_keys(given, ["dataset.batch_size"]) == ["model", "optimizer.lr", "x", "dataset.batch_size"]
    monkeypatch.setenv(SWEEP_KEYS, "model,dataset.data_dir")
    job = ["model=cnn2", "dataset.data_dir=/a/b", "trainer.max_epochs=3"]
    assert sweep_subdir(7, job) == "7_model=cnn2,dataset.data_dir=_a_b"
    monkeypatch.setenv(SWEEP_KEYS, "")
    assert sweep_subdir(0, job) == "0"


def write_run(sweep, name: str, overrides: list[str], metrics: dict | None, status: dict | None) -> None:
    """A run directory as a sweep job leaves it: .hydra/overrides.yaml, metrics.json, job_status.json."""
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in [*overrides, "hydra.verbose=false"]))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    if status is not None:
        (run / "job_status.json").write_text(json.dumps(status))


def test_summary_of_a_folder_of_runs_sorts_groups_and_lists_what_did_not_finish(tmp_path, capsys, monkeypatch):
    from src.runs.sweeps import summarize
    from src.summarize import main

    sweep = tmp_path / "sweep"

    def result(val_acc: float, test_acc: float) -> dict:
        return {
            "val/acc": val_acc,
            "test/acc": test_acc,
            "val/loss": 1 - val_acc,
            "test/loss": 1 - test_acc,
            "epochs": 1,
        }

    common = ["trainer.max_epochs=1"]
    write_run(
        sweep, "0", [*common, "model=mlp", "seed=0"], result(0.5, 0.4), {"status": "COMPLETED", "wall_time_s": 3.21}
    )
    write_run(
        sweep, "1", [*common, "model=mlp", "seed=1"], result(0.7, 0.6), {"status": "COMPLETED", "wall_time_s": 2.0}
    )
    write_run(sweep, "2", [*common, "model=cnn2", "seed=0"], None, {"status": "FAILED", "error": "training diverged"})
    resume = "python -m src.train model=cnn2 seed=1 resume=true"
    write_run(sweep, "3", [*common, "model=cnn2", "seed=1"], None, {"status": "INTERRUPTED", "resume_command": resume})
    write_run(sweep, "10", [*common, "model=cnn2", "seed=2"], None, None)  # killed outright: no status
    write_run(sweep, "11", [*common, "model=cnn2", "seed=3"], result(0.6, 0.5), None)  # status lost, metrics there

    text = summarize(sweep, "val/acc")
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [(r["run"], r["status"], r["overrides"]) for r in rows] == [
        ("1", "COMPLETED", "model=mlp seed=1"),  # best val/acc first
        ("11", "COMPLETED", "model=cnn2 seed=3"),
        ("0", "COMPLETED", "model=mlp seed=0"),
        ("2", "FAILED", "model=cnn2 seed=0"),  # then the rest, 2 before 10
        ("3", "INTERRUPTED", "model=cnn2 seed=1"),
        ("10", "INCOMPLETE", "model=cnn2 seed=2"),
    ]
    assert (rows[0]["test/acc"], rows[0]["wall_time_s"], rows[0]["epochs"]) == ("0.6", "2.0", "1")
    assert rows[3]["error"] == "training diverged" and rows[4]["error"] == f"continue with: {resume}"
    assert "Every run: trainer.max_epochs=1" in text and "Sorted by val/acc." in text
    assert "Failed runs:\n- 2 (model=cnn2 seed=0) training diverged" in text
    assert f"- 3 (model=cnn2 seed=1) continue with: {resume}" in text
    assert "Runs without a result (still running, or killed outright):\n- 10 (model=cnn2 seed=2)" in text
    (group,) = list(csv.DictReader((sweep / "summary_groups.csv").open()))  # cnn2 has one completed run: no group
    assert (group["overrides"], group["runs"]) == ("model=mlp", "2")
    assert float(group["val/acc mean"]) == pytest.approx(0.6)
    assert float(group["val/acc std"]) == pytest.approx(0.1414, abs=1e-4)  # statistics.stdev of 0.5 and 0.7
    assert (sweep / "summary.md").read_text() == text + "\n"

    summarize(sweep, "val/loss")  # a loss: lowest first
    assert [r["run"] for r in csv.DictReader((sweep / "summary.csv").open())] == ["1", "11", "0", "2", "3", "10"]

    (tmp_path / "empty").mkdir()
    for folder, message in ((tmp_path / "nowhere", "is not a directory"), (tmp_path / "empty", "no runs")):
        monkeypatch.setattr(sys, "argv", ["summarize", str(folder)])  # python -m src.summarize FOLDER
        with pytest.raises(SystemExit) as info:
            main()
        err = capsys.readouterr().err
        assert info.value.code == 1 and err.startswith("error: ") and message in err and str(folder) in err
        assert err.count("\n") == 1


@pytest.mark.slow
def test_runs_differing_only_by_seed_are_aggregated(data, tmp_path):
    sweep = tmp_path / "seeds"
    result = run_cli("-m", *tiny(data), "model=mlp", "trainer.max_epochs=1", "seed=0,1", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr
    text = (sweep / "summary.md").read_text()
    over_seeds = text.split("## Over seeds and folds")[1]
    assert "| 2 |" in over_seeds, over_seeds  # one group of two seeds, with mean and std
    (group,) = list(csv.DictReader((sweep / "summary_groups.csv").open()))
    assert group["runs"] == "2" and group["overrides"] == "" and float(group["test/acc std"]) >= 0


@pytest.mark.slow
def test_optuna_search_continues_its_study_when_run_again(data, tmp_path):
    """The study lives in a SQLite file under paths.runs_root: a second run of the same command adds its trials."""
    search = ["-m", "hparams_search=optuna", *tiny(data), "model=mlp", "trainer.max_epochs=1"]
    search.append("hydra.sweeper.n_trials=2")
    for name in ("first", "second"):
        result = run_cli(*search, f"paths.runs_root={tmp_path}", f"hydra.sweep.dir={tmp_path / name}")
        assert result.returncode == 0, result.stderr
        best = (tmp_path / name / "optimization_results.yaml").read_text()
        assert "best_value" in best and "optimizer.lr" in best
        assert len(list(csv.DictReader((tmp_path / name / "summary.csv").open()))) == 2
    import optuna

    storage = f"sqlite:///{tmp_path}/optuna-fashion_mnist-mlp.db"
    study = optuna.load_study(study_name="fashion_mnist-mlp", storage=storage)
    assert len(study.trials) == 4 and all(t.state.name == "COMPLETE" for t in study.trials)


@pytest.mark.slow
def test_search_whose_every_trial_fails_ends_with_one_line(data, tmp_path):
    crash = ["+callbacks.crash._target_=crash.RaiseDuringEpoch", "+callbacks.crash.epoch=0", "+callbacks.crash.batch=0"]
    args = ["-m", "hparams_search=optuna", *tiny(data), "model=mlp", "trainer.max_epochs=1", "hydra.sweeper.n_trials=2"]
    result = run_cli(
        *args, *crash, f"paths.runs_root={tmp_path}", f"hydra.sweep.dir={tmp_path / 's'}",
        env={"PYTHONPATH": str(REPO_ROOT / "tests")},
    )  # fmt: skip
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: every trial of the search 'fashion_mnist-mlp' failed"), result.stderr[-2000:]
    assert "No trials are completed yet" not in result.stderr


@pytest.mark.slow
def test_three_fold_cross_validation_writes_one_group_of_three_runs(data, tmp_path):
    sweep = tmp_path / "cv"
    args = ["-m", *tiny(data), "model=mlp", "trainer.max_epochs=1", "dataset.folds=3", "dataset.fold=0,1,2"]
    result = run_cli(*args, f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr
    (group,) = list(csv.DictReader((sweep / "summary_groups.csv").open()))
    assert group["runs"] == "3" and group["overrides"] == ""
    assert list(group)[:6] == ["overrides", "runs", "val/acc mean", "val/acc std", "test/acc mean", "test/acc std"]
    runs = list(csv.DictReader((sweep / "summary.csv").open()))
    assert float(group["test/acc mean"]) == pytest.approx(sum(float(r["test/acc"]) for r in runs) / 3, abs=1e-4)


@pytest.mark.slow
def test_sweep_runs_through_submitit_local(data, tmp_path):
    sweep = tmp_path / "submitit"
    args = ["-m", "hydra/launcher=submitit_local", *tiny(data), "trainer.max_epochs=1", "model=mlp,cnn2"]
    result = run_cli(*args, f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["COMPLETED", "COMPLETED"]
    assert sorted(r["overrides"] for r in rows) == ["model=cnn2", "model=mlp"]
    assert all(0 <= float(r["test/acc"]) <= 1 and r["epochs"] == "1" for r in rows)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_counts_every_test_image_once(data, tmp_path):
    run_dir = tmp_path / "ddp"
    args = [
        *tiny(data),
        "trainer.max_epochs=1",
        "trainer.strategy=ddp",
        "trainer.devices=2",
        f"hydra.run.dir={run_dir}",
    ]
    result = run_cli(*[a for a in args if a != "trainer.devices=1"])
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert sum(map(sum, metrics["test/confusion_matrix"])) == len(UNEVEN_TEST_LABELS)
    assert result.stdout.count("run directory:") == 1, "only rank 0 reports"
