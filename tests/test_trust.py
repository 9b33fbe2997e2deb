"""Trust: checkpoints never run code when opened, and every way a run ends leaves an honest, resumable record
(diverged, at chance level, interrupted by SIGINT or SIGTERM, resumed with other settings, a bug)."""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    FAST,
    NO_FIGURES,
    REPO_ROOT,
    CreatesFileWhenUnpickled,
    cli_env,
    offline_dataset,
    one_line_error,
    run_cli,
    write_idx,
    write_image,
)

from src.callbacks.training import StopOnNonFiniteLoss, TrainingDiverged
from src.runs.checkpoints import (
    CheckpointError,
    SafeCheckpointIO,
    allowed_kinds,
    check_targets,
    checkpoint_hparams,
    open_run,
    read_checkpoint,
)
from src.runs.record import RunRecord
from src.runs.reports import chance_level, format_table, strict_json
from src.train import train
from src.utils.config import ConfigError
from src.utils.errors import RunInterrupted, report_errors


def strict_json_load(path: Path) -> dict:
    def refuse(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture
def data(tmp_path) -> Path:
    write_idx(tmp_path / "data", n_train=80, gz=True)
    return tmp_path / "data"


def command(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


# --- safe loading ---------------------------------------------------------------------------------------
def test_hostile_checkpoint_is_refused_by_predict_evaluate_and_train_and_runs_nothing(
    data, tmp_path, compose_cfg, capsys
):
    from src.evaluate import evaluate
    from src.predict import predict

    marker = tmp_path / "pwned"
    hostile = tmp_path / "shared.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": CreatesFileWhenUnpickled(marker)}, hostile)
    image = write_image(tmp_path / "shoe.png", "L", (28, 28), 50)
    out, ckpt = tmp_path / "out", f"ckpt_path={hostile}"
    commands = {
        "predict": lambda: predict(compose_cfg([ckpt, f"images=[{image}]"], out, name="predict"), out),
        "evaluate": lambda: evaluate(compose_cfg([ckpt], out, name="evaluate")),
        "train": lambda: train(compose_cfg([*offline_dataset("fashion_mnist", data), *FAST, ckpt], out)),
    }
    for command in commands.values():  # one line that names what it would have called
        assert "refused" in (line := one_line_error(command, capsys)) and "run code (it names " in line
    assert not marker.exists(), "unpickling ran the checkpoint's code"


def test_hostile_checkpoint_is_refused_in_process_and_runs_nothing(data, tmp_path):
    """What predict, evaluate, export and train read a checkpoint with (the commands: the slow test above)."""
    marker = tmp_path / "pwned"
    hostile = tmp_path / "shared.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": CreatesFileWhenUnpickled(marker)}, hostile)
    for read in (read_checkpoint, checkpoint_hparams, open_run):
        with pytest.raises(CheckpointError, match=r"refused: loading it would run code \(it names "):
            read(hostile)
    assert not marker.exists(), "unpickling ran the checkpoint's code"


def doctored_checkpoint(trained: Path, tmp_path: Path, where: str = "callbacks", target: str = "os.system") -> Path:
    """The trained run's checkpoint with `_target_` `target` added to its config: a callback ("callbacks"), or
    the model itself ("model")."""
    content = torch.load(trained, weights_only=True)
    config = content["hyper_parameters"]["config"]
    if where == "model":
        config["model"]["_target_"] = target
    else:
        config[where]["evil"] = {"_target_": target, "command": "touch x"}
    doctored = tmp_path / f"doctored-{where}.ckpt"
    torch.save(content, doctored)
    return doctored


def test_opening_a_run_builds_only_its_network_and_data_and_refuses_any_other_model_target(fashion_run, tmp_path):
    """evaluate, predict and export open a run with open_run: a callback or logger of the user's own (even one
    whose module is gone, or a hostile one) is never instantiated, so it never stops them; the model's target is
    checked and refused when it is not a network class of ours or torch's."""
    for where in ("callbacks", "logger"):
        module, datamodule = open_run(doctored_checkpoint(fashion_run.last, tmp_path, where), {})
        assert module.hparams.class_names and datamodule.class_names == module.hparams.class_names
    for target, why in [("os.system", "outside the allowed packages"), ("src.utils.io.os.system", "importable"),
                        ("src.runs.tuning.store_temperature", "not a network or datamodule class")]:  # fmt: skip
        with pytest.raises(CheckpointError, match=rf"refused: its config sets model._target_='{target}'.*{why}"):
            open_run(doctored_checkpoint(fashion_run.last, tmp_path, "model", target))


def test_evaluate_refuses_a_model_target_outside_the_allowed_packages_with_one_line(
    fashion_run, tmp_path, compose_cfg, capsys
):
    from src.evaluate import evaluate

    cfg = compose_cfg([f"ckpt_path={doctored_checkpoint(fashion_run.last, tmp_path, 'model')}"], name="evaluate")
    line = one_line_error(lambda: evaluate(cfg), capsys)
    assert "os.system" in line and "refused" in line


@pytest.mark.parametrize(
    "target",
    [
        "src.utils.io.os.system",  # passes a prefix check, resolves to os.system
        "torch.optim.optimizer.torch.hub.load",
        "src.predict.load_image",  # our own function, but not a network
        "src.runs.tuning.store_temperature",  # our own function that rewrites checkpoints
    ],
)
def test_allowed_packages_are_not_a_loophole(fashion_run, tmp_path, target):
    content = torch.load(fashion_run.last, weights_only=True)
    content["hyper_parameters"]["config"]["model"]["hidden"] = {"_target_": target, "command": "id"}
    doctored = tmp_path / "doctored.ckpt"
    torch.save(content, doctored)
    with pytest.raises(CheckpointError, match=f"model.hidden._target_='{target}'"):
        open_run(doctored)


def test_a_resumed_runs_stored_targets_are_checked_and_trusted_packages_allow_the_users_own(fashion_run, tmp_path):
    """Resume builds the run's callbacks again: their targets must be ours or the library's, named by the
    resuming command itself, or under trusted_packages; the refusal says how to trust them."""
    saved = checkpoint_hparams(doctored_checkpoint(fashion_run.last, tmp_path, "callbacks", "crash.SleepEachBatch"))
    kinds = allowed_kinds()
    with pytest.raises(CheckpointError, match=r"crash.SleepEachBatch.*trusted_packages=\[crash\]"):
        check_targets(saved["config"], "theirs.ckpt", kinds=kinds)
    check_targets(saved["config"], "theirs.ckpt", kinds=kinds, trusted=["crash.SleepEachBatch"])  # their command
    check_targets(saved["config"], "theirs.ckpt", kinds=kinds, trusted=["crash"])  # trusted_packages=[crash]
    with pytest.raises(CheckpointError, match="os.system"):
        check_targets(checkpoint_hparams(doctored_checkpoint(fashion_run.last, tmp_path))["config"], "x", kinds=kinds)


@pytest.mark.parametrize(
    "where, value, refusal",
    [
        ("model", "${callbacks.evil}", r"model._target_='os.system'"),  # the whole model points at a callback
        ("hidden", "${callbacks.evil}", r"model.hidden._target_='os.system'"),
        ("hidden", "\\${callbacks.evil}", "resolves to another interpolation"),  # escaped: `${` after resolving
        ("model", "${seed}", "model config is int, not a mapping"),
    ],
)
def test_interpolations_in_a_stored_model_config_are_checked_as_they_resolve(
    fashion_run, tmp_path, where, value, refusal
):
    content = torch.load(fashion_run.last, weights_only=True)
    config = content["hyper_parameters"]["config"]
    config["callbacks"]["evil"] = {"_target_": "os.system", "command": "touch x"}
    if where == "model":
        config["model"] = value
    else:
        config["model"][where] = value
    torch.save(content, doctored := tmp_path / "doctored.ckpt")
    with pytest.raises(CheckpointError, match=refusal):
        open_run(doctored)


@pytest.mark.parametrize(
    "optimizer", [["optimizer=sgd", "scheduler=onecycle"], ["optimizer=adamw", "scheduler=cosine"], ["scheduler=step"]]
)
def test_our_checkpoints_load_with_weights_only_for_every_optimizer_and_scheduler(
    compose_cfg, data, tmp_path, optimizer
):
    train(compose_cfg([*offline_dataset("fashion_mnist", data), "model=cnn2", *FAST, *NO_FIGURES, *optimizer]))
    for checkpoint in (tmp_path / "run" / "checkpoints").glob("*.ckpt"):
        assert read_checkpoint(checkpoint)["optimizer_states"]
        assert open_run(checkpoint)[0].hparams.class_names


def test_checkpoints_are_written_atomically_in_their_own_folder(fashion_run, monkeypatch, tmp_path):
    """Temporary file beside the checkpoint whatever TMPDIR is; none left behind; readable by others."""
    folder = fashion_run.last.parent
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], "temporary file left"
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in folder.iterdir())
    for name in ("metrics.json", "job_status.json"):
        assert (fashion_run.run_dir / name).stat().st_mode & 0o777 == 0o644, name

    elsewhere = tmp_path / "tmpdir"  # another TMPDIR: the writer must not stage there
    elsewhere.mkdir()
    monkeypatch.setenv("TMPDIR", str(elsewhere))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: renamed.append(Path(src).parent) or real_replace(src, dst))
    target = tmp_path / "copy" / "last.ckpt"
    SafeCheckpointIO().save_checkpoint(read_checkpoint(fashion_run.last), target)
    assert renamed == [target.parent] and list(elsewhere.iterdir()) == []
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"] and target.stat().st_mode & 0o777 == 0o644
    assert read_checkpoint(target)["global_step"] == read_checkpoint(fashion_run.last)["global_step"]


# --- divergence and chance level -----------------------------------------------------------------------
def test_divergence_names_the_first_non_finite_batch_after_the_losses_before_it():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import SingleDeviceStrategy

    stop = StopOnNonFiniteLoss(lr=0.5, check_every=4)
    trainer = SimpleNamespace(current_epoch=2, strategy=SingleDeviceStrategy(torch.device("cpu")))
    for batch, loss in enumerate([1.0, 0.9, 0.8, 0.7, 0.6, math.inf, math.nan]):
        stop.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, None, batch)  # checks at batch 3
    with pytest.raises(TrainingDiverged, match=r"epoch 2, batch 5; try a lower optimizer.lr \(now 0.5\)"):
        stop.on_train_epoch_end(trainer, None)


def test_nan_or_inf_loss_stops_the_run_naming_epoch_and_batch(compose_cfg, data, tmp_path):
    cfg = compose_cfg(
        [*offline_dataset("fashion_mnist", data), "model=cnn2", "optimizer=sgd", "optimizer.lr=1e6", *FAST, *NO_FIGURES]
    )
    with pytest.raises(TrainingDiverged, match=r"epoch 0, batch \d+; try a lower optimizer.lr \(now 1e\+06\)"):
        train(cfg)
    status = strict_json_load(tmp_path / "run" / "job_status.json")
    assert status["status"] == "FAILED" and "training diverged" in status["error"]
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_diverged_run_is_one_line_and_exit_1(data, compose_cfg, capsys):
    cfg = compose_cfg([*offline_dataset("fashion_mnist", data), *FAST, *NO_FIGURES, "model=cnn2", "optimizer=sgd",
                       "optimizer.lr=1e6"])  # fmt: skip
    line = one_line_error(lambda: train(cfg), capsys)
    assert "training diverged" in line and "optimizer.lr" in line


def test_run_at_chance_level_says_so_in_metrics_and_table(compose_cfg, tmp_path, capsys):
    """Every test image of one class: guessing it scores 100%, so no model beats chance here."""
    write_idx(tmp_path / "one", n_train=80, test_labels=[3] * 12)
    train(compose_cfg([*offline_dataset("fashion_mnist", tmp_path / "one"), "model=mlp", *FAST, *NO_FIGURES]))
    metrics = strict_json_load(tmp_path / "run" / "metrics.json")
    assert metrics["test/chance_level"] == 1.0 and metrics["test/at_chance_level"] is True
    assert "is at chance level (1.0000)" in capsys.readouterr().out


def test_chance_level_is_the_most_common_test_class_and_json_is_strict():
    assert chance_level([[5, 0], [5, 0]]) == 0.5
    assert chance_level([[1, 2, 0], [0, 1, 0], [0, 0, 1]]) == 0.6
    assert strict_json({"a": math.nan, "b": [math.inf, 1.0], "c": {"d": -math.inf}}) == {
        "a": None, "b": [None, 1.0], "c": {"d": None}
    }  # fmt: skip
    assert "WARNING" not in format_table({"test/acc": 0.9, "test/at_chance_level": False, "test/chance_level": 0.1})


# --- resume ---------------------------------------------------------------------------------------------
def test_resume_with_other_settings_is_refused_listing_them(compose_cfg, fashion_run, tmp_path):
    common = [*fashion_run.overrides, f"ckpt_path={fashion_run.last}"]
    with pytest.raises(ConfigError, match=r"other settings \(model.hidden, optimizer.lr\)"):
        train(compose_cfg([*common, "model.hidden=[8]", "optimizer.lr=0.1"], tmp_path / "r1"))
    assert not (tmp_path / "r1" / "metrics.json").exists()
    longer = [o if not o.startswith("trainer.max_epochs") else "trainer.max_epochs=2" for o in common]
    train(compose_cfg(longer, tmp_path / "r2"))  # training longer is what resuming is for
    # (in-process runs have no .hydra folder, so this one writes to r2 instead of the trained run's folder)
    assert strict_json_load(tmp_path / "r2" / "metrics.json")["epochs"] == 2
    assert strict_json_load(fashion_run.run_dir / "metrics.json") == fashion_run.metrics  # the shared run is as it was


def test_a_setting_added_since_a_run_began_differs_only_from_the_behaviour_the_run_had(compose_cfg, fashion_run):
    from src.runs.checkpoints import checkpoint_hparams
    from src.runs.record import differing_settings

    saved = checkpoint_hparams(fashion_run.last)["config"]
    del saved["dataset"]["crop_padding_mode"]  # a run from before the setting existed: it padded with zeros
    for old in ("early_crop", "early_crop_epochs", "early_resize"):  # ... and trained on whole images,
        del saved["dataset"][old]
    del saved["val_tta"]  # validating with tta's views
    assert differing_settings(compose_cfg(fashion_run.overrides), saved) == []
    reflect = compose_cfg([*fashion_run.overrides, "dataset.crop_padding_mode=reflect"])
    assert differing_settings(reflect, saved) == ["dataset.crop_padding_mode"]


def test_a_run_resumed_from_its_epoch_end_checkpoint_ends_as_the_uninterrupted_run(compose_cfg, data, tmp_path):
    """In-process, what the SIGKILL test (slow tier) checks end to end: augmentation, dropout and the batch order
    of every epoch depend on (seed, epoch) alone, so continuing from last.ckpt gives the same metrics."""
    common = [*offline_dataset("fashion_mnist", data), "model=cnn2", "model.hidden=[16]", "model.dropout=0.3"]
    common += [
        "dataset.hflip=alternate",
        "dataset.crop_padding=2",
        *NO_FIGURES,
        *[o for o in FAST if "epochs" not in o],
    ]
    train(compose_cfg([*common, "trainer.max_epochs=3"], tmp_path / "full"))
    train(compose_cfg([*common, "trainer.max_epochs=2"], tmp_path / "two"))
    train(
        compose_cfg(
            [*common, "trainer.max_epochs=3", f"ckpt_path={tmp_path / 'two/checkpoints/last.ckpt'}"], tmp_path / "r"
        )
    )
    full, resumed = (strict_json_load(tmp_path / d / "metrics.json") for d in ("full", "r"))
    assert (resumed["test/loss"], resumed["val/loss"]) == (full["test/loss"], full["val/loss"])


# --- interruption ---------------------------------------------------------------------------------------
def start_training(args: list[str]) -> subprocess.Popen:
    """A real `python -m src.train` process, with SIGINT at its default disposition (as in a terminal)."""
    return subprocess.Popen(
        [sys.executable, "-m", "src.train", *args],
        cwd=REPO_ROOT,
        env={**cli_env(), "PYTHONPATH": str(REPO_ROOT / "tests")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_leaves_a_checkpoint_a_status_and_the_command_that_finishes_the_run(data, tmp_path, signum):
    runs = tmp_path / "outputs"
    run_dir = runs / "run"
    args = [
        *offline_dataset("fashion_mnist", data),
        "model=mlp",
        *[o for o in FAST if not o.startswith("trainer.max_epochs")],
        "trainer.max_epochs=4",
        "+callbacks.slow._target_=crash.SleepEachBatch",
        "+callbacks.slow.seconds=0.1",
        f"paths.runs_root={runs}",
    ]
    process = start_training([*args, f"hydra.run.dir={run_dir}"])
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 90
    while not (last.exists() and read_checkpoint(last)["global_step"] > 0):  # epoch 0 is done: in epoch 1 now
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, stdout + stderr
    assert "Traceback" not in stderr, stderr
    status = strict_json_load(run_dir / "job_status.json")
    assert status["status"] == "INTERRUPTED" and status["signal"] == name
    assert status["epochs_completed"] >= 1 and status["epoch"] >= 1
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["epoch"] == status["epochs_completed"] - 1
    resume = status["resume_command"]
    assert resume.endswith("resume=true") and f"continue with: {resume}" in stderr, stderr
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")], "half-written file"

    summary = command("src.summarize", str(runs))
    assert summary.returncode == 0 and "| INTERRUPTED |" in summary.stdout and resume in summary.stdout

    argv = shlex.split(resume)[3:]  # after "python -m src.train", as a shell would split it
    finished = subprocess.run(
        [sys.executable, "-m", "src.train", *argv, f"hydra.run.dir={runs / 'continued'}"],
        cwd=REPO_ROOT, env={**cli_env(), "PYTHONPATH": str(REPO_ROOT / "tests")}, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert strict_json_load(run_dir / "job_status.json")["status"] == "COMPLETED"
    assert strict_json_load(run_dir / "metrics.json")["epochs"] == 4


@pytest.mark.slow
def test_signal_in_the_first_epoch_can_be_continued_from_the_start_checkpoint(data, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *offline_dataset("fashion_mnist", data),
        "model=mlp",
        *FAST,
        "+callbacks.slow._target_=crash.SleepEachBatch",
    ]
    process = start_training([*args, f"hydra.run.dir={run_dir}"])
    wait_for(run_dir / "checkpoints" / "last.ckpt", process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    status = strict_json_load(run_dir / "job_status.json")
    assert status["status"] == "INTERRUPTED" and status["epochs_completed"] == 0, stdout + stderr
    assert "ckpt_path=" in status["resume_command"]  # the run is not under paths.runs_root: its checkpoint


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_run_record_stopped_by_a_signal_writes_the_status_and_the_command_that_continues_it(
    compose_cfg, tmp_path, signum
):
    """In-process, what the subprocess tests above check end to end: RunRecord turns Ctrl-C (and SIGTERM, via
    its handler) into RunInterrupted with exit code 128 + signal, and job_status.json says how to continue."""
    run_dir = tmp_path / "run"
    cfg = compose_cfg(["model=mlp", "trainer.max_epochs=3", f"paths.runs_root={tmp_path / 'elsewhere'}"], run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    torch.save({"epoch": 1, "global_step": 20}, last)  # what ModelCheckpoint's save_last holds after 2 epochs
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunInterrupted) as info:
        with RunRecord(cfg):
            os.kill(os.getpid(), signum)  # SIGINT: Python's KeyboardInterrupt; SIGTERM: RunRecord's handler
            time.sleep(5)  # the handler runs before this returns
    assert info.value.exit_code == 128 + signum
    status = strict_json_load(run_dir / "job_status.json")
    name = signal.Signals(signum).name
    assert status["status"] == "INTERRUPTED" and status["signal"] == name and status["epochs_completed"] == 2
    assert status["epoch"] == 2  # no trainer progress past the checkpoint: the epoch after it, not 0
    resume = status["resume_command"]
    assert resume.startswith("python -m src.train model=mlp trainer.max_epochs=3 ")
    assert resume.endswith(f"ckpt_path={last}")  # not under paths.runs_root: resume=true would not find it
    assert (
        str(info.value)
        == f"interrupted ({name}) in epoch 2; {last} holds the run after 2 epochs; continue with: {resume}"
    )
    assert signal.getsignal(signal.SIGTERM) == previous  # RunRecord puts back the handler it found


def test_report_errors_gives_one_line_for_a_users_mistake_and_keeps_a_bugs_traceback(capsys):
    """The error story of every entry point's main(), in-process."""

    def raises(error: BaseException):
        def command():
            raise error

        return command

    assert report_errors(lambda: 7) == 7
    with pytest.raises(SystemExit) as info:
        report_errors(raises(ConfigError("trainer.max_epochs='abc' is not an int")))
    assert info.value.code == 1 and capsys.readouterr().err == "error: trainer.max_epochs='abc' is not an int\n"
    with pytest.raises(SystemExit) as info:
        report_errors(raises(RunInterrupted("interrupted (SIGTERM) in epoch 2; continue with: x", 143)))
    assert info.value.code == 143 and capsys.readouterr().err == "interrupted (SIGTERM) in epoch 2; continue with: x\n"
    with pytest.raises(ZeroDivisionError, match="a bug"):
        report_errors(raises(ZeroDivisionError("a bug")))
    assert capsys.readouterr().err == ""  # Hydra prints the traceback of what is re-raised


# --- bugs keep their traceback ----------------------------------------------------------------------------
@pytest.mark.slow
def test_unexpected_exception_keeps_its_traceback_on_stderr_and_in_the_log(data, tmp_path):
    run_dir = tmp_path / "crashed"
    crash = ["+callbacks.crash._target_=crash.RaiseDuringEpoch", "+callbacks.crash.epoch=0"]
    args = [*offline_dataset("fashion_mnist", data), "model=mlp", *FAST, *crash, f"hydra.run.dir={run_dir}"]
    result = run_cli(*args, env={"PYTHONPATH": str(REPO_ROOT / "tests")})
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "RuntimeError: simulated crash in epoch 0" in result.stderr
    log = (run_dir / "train.log").read_text()
    assert "Traceback" in log and "simulated crash in epoch 0" in log
    status = strict_json_load(run_dir / "job_status.json")
    assert status == {**status, "status": "FAILED", "error": "simulated crash in epoch 0"}
    assert os.access(run_dir / "job_status.json", os.R_OK)


def test_a_run_directory_that_holds_a_run_is_continued_never_overwritten(compose_cfg, data, tmp_path):
    """What a requeued SLURM job does: the same command in the same directory carries on from last.ckpt."""
    common = [*offline_dataset("fashion_mnist", data), "model=mlp", *NO_FIGURES]
    common += [o for o in FAST if "max_epochs" not in o]
    train(compose_cfg([*common, "trainer.max_epochs=1"], tmp_path / "job"))
    train(compose_cfg([*common, "trainer.max_epochs=2"], tmp_path / "job"))
    assert strict_json_load(tmp_path / "job" / "metrics.json")["epochs"] == 2
    with pytest.raises(ConfigError, match=r"other settings \(optimizer.lr\)"):
        train(compose_cfg([*common, "trainer.max_epochs=3", "optimizer.lr=0.5"], tmp_path / "job"))


class RunsAShellCommand:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_naming_os_system_is_refused_naming_it(tmp_path):
    hostile = tmp_path / "hostile.ckpt"
    torch.save({"hyper_parameters": RunsAShellCommand()}, hostile)
    with pytest.raises(CheckpointError, match=r"refused: loading it would run code \(it names posix.system\)"):
        checkpoint_hparams(hostile)
    garbage = tmp_path / "notes.ckpt"
    garbage.write_text("hello")
    with pytest.raises(CheckpointError, match="is not a readable checkpoint"):
        checkpoint_hparams(garbage)
