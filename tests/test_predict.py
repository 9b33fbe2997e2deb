"""`python -m src.predict` end to end: a checkpoint from a real (tiny, one-epoch) training run, then the
command on images of other sizes and modes, a folder, unreadable files, a big folder in small batches (equal
to one image at a time), exported models, and a run stopped midway (its CSV keeps the finished rows).

Most cases call `predict(cfg, out)` in-process; the command's own exit status and stderr lines, and the
stopped runs, start `python -m src.predict` (slow tier).
"""

from __future__ import annotations

import csv
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, FASHION_CLASSES, REPO_ROOT, cli_env, one_line_error, write_image
from omegaconf import DictConfig
from PIL import Image

from src.predict import (
    collect_images,
    csv_columns,
    load_image,
    predict,
    to_tensor,
)
from src.utils.config import per_channel
from src.utils.errors import UserError, one_line


@pytest.fixture(scope="module")
def checkpoint(fashion_run) -> Path:
    """last.ckpt of the session's shared one-epoch cnn2 run on Fashion-MNIST-format images (conftest); predict
    and export only read it (exports go to a folder of their own)."""
    return fashion_run.last


def run_predict(ckpt: Path | str, images: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "src.predict", f"ckpt_path={ckpt}", f"images={images}", f"hydra.run.dir={out}"]
    return subprocess.run([*command, *extra], cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)


def compose_predict(*overrides: str) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("predict", overrides=list(overrides))


def as_list(paths: Sequence[Path]) -> str:
    return "[" + ",".join(str(p) for p in paths) + "]"


def prediction_lines(stdout: str) -> dict[str, list[tuple[str, float]]]:
    """`path: Class 97.1%, Class 2.0%, ...` -> {path: [(class, percent), ...]}."""
    lines = {}
    for line in stdout.splitlines():
        if line.startswith("run directory:") or ": " not in line:
            continue
        path, ranked = line.split(": ", 1)
        pairs = []
        for item in ranked.split(", "):
            name, percent = item.rsplit(" ", 1)
            assert percent.endswith("%"), line
            pairs.append((name, float(percent[:-1])))
        lines[path] = pairs
    return lines


def read_predictions(out: Path) -> list[dict[str, str]]:
    """predictions.csv as dicts, after checking it is whole: the header, and every row as wide as it."""
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows, "predictions.csv is empty"
    header = rows[0]
    assert header[:3] == ["path", "class", "probability"] and header[-2:] == ["figure", "error"]
    assert header == csv_columns((len(header) - 3) // 2)
    assert all(len(row) == len(header) for row in rows), "a torn or ragged row"
    return [dict(zip(header, row, strict=True)) for row in rows[1:]]


def ranked(row: dict[str, str]) -> list[tuple[str, float]]:
    """A row's (class, probability) pairs, most probable first."""
    pairs = [(row["class"], float(row["probability"]))]
    r = 2
    while f"top{r}_class" in row:
        pairs.append((row[f"top{r}_class"], float(row[f"top{r}_probability"])))
        r += 1
    return pairs


def check_outputs(
    out: Path, images: Sequence[Path], stdout: str, top_k: int = 3, unreadable: Sequence[Path] = ()
) -> list[dict[str, str]]:
    """One top-k line, one figure and one CSV row per image, with sane probabilities; an unreadable image
    a row with only its path and error. Returns the rows of the images that were read."""
    lines = prediction_lines(stdout)
    assert list(lines) == [str(p) for p in images], stdout
    rows = read_predictions(out)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in [*images, *unreadable])
    for row in rows:
        if row["error"]:
            assert row["path"] in {str(p) for p in unreadable}
            assert all(v == "" for key, v in row.items() if key not in ("path", "error")), row
    predicted = [row for row in rows if not row["error"]]
    assert [row["path"] for row in predicted] == [str(p) for p in images]
    for row, (path, printed) in zip(predicted, lines.items(), strict=True):
        pairs = ranked(row)
        assert len(printed) == top_k and len(pairs) == top_k
        names = [name for name, _ in pairs]
        probs = [p for _, p in pairs]
        assert names == [name for name, _ in printed], path
        assert len(set(names)) == top_k and set(names) <= set(FASHION_CLASSES)
        assert probs == sorted(probs, reverse=True) and all(0.0 <= p <= 1.0 for p in probs)
        assert sum(probs) <= 1.0 + 1e-4 and probs[0] >= 1.0 / len(FASHION_CLASSES) - 1e-6
        for (_, percent), p in zip(printed, probs, strict=True):
            assert percent == pytest.approx(100 * p, abs=0.051)
        figure = out / row["figure"]
        assert figure.is_file() and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(figure) as image:
            assert image.width > 300 and image.height > 200
    assert len(list(out.glob("*.png"))) == len(images)
    return predicted


# --- in-process: preprocessing ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mode", "shape"),
    [("L", (1, 28, 28)), ("RGB", (1, 28, 28)), ("RGBA", (1, 28, 28)), ("P", (3, 32, 24)), ("L", (3, 16, 16))],
)
def test_load_image_converts_to_the_model_input(tmp_path: Path, mode: str, shape: tuple[int, int, int]) -> None:
    path = write_image(tmp_path / "image.png", mode, (40, 50), 0)
    image = load_image(path, shape)
    assert image.mode == ("L" if shape[0] == 1 else "RGB") and image.size == (shape[2], shape[1])
    mean, std = per_channel([0.5], shape[0], "mean"), per_channel([0.25] * shape[0], shape[0], "std")
    tensor = to_tensor(image, mean, std)
    assert tensor.shape == shape and tensor.dtype == torch.float32
    assert tensor.min() >= -2.0 - 1e-6 and tensor.max() <= 2.0 + 1e-6  # (x - 0.5) / 0.25 for x in [0, 1]


def test_collect_images_folder_and_errors(tmp_path: Path) -> None:
    for name in ("b.jpg", "a.PNG", "c.webp", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub" / ".hidden").mkdir(parents=True)
    (tmp_path / "sub" / "d.png").write_bytes(b"x")
    (tmp_path / "sub" / ".hidden" / "e.png").write_bytes(b"x")
    (tmp_path / "sub" / "deeper").mkdir()
    (tmp_path / "sub" / "deeper" / "f.png").write_bytes(b"x")
    found = [(str(p.relative_to(tmp_path)), label) for p, label in collect_images(str(tmp_path))]
    # to any depth, hidden files and folders skipped; labelled by the first folder below the one given
    assert found == [("a.PNG", ""), ("b.jpg", ""), ("c.webp", ""), ("sub/d.png", "sub"), ("sub/deeper/f.png", "sub")]
    missing = tmp_path / "cat" / "missing.png"
    assert collect_images([str(missing)]) == [(missing, "cat")]  # reported later, by name
    with pytest.raises(UserError, match="no images in folder"):
        collect_images(str(_empty(tmp_path)))
    with pytest.raises(UserError, match="images is empty"):
        collect_images([])
    with pytest.raises(UserError, match="mean has 2 values but the images have 3 channels"):
        per_channel([0.1, 0.2], 3, "mean")


def _empty(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    return folder


def test_predict_other_sizes_modes_and_unreadable_files(checkpoint: Path, tmp_path: Path, capsys) -> None:
    """Gray PNG of another size, RGB JPEG, RGBA PNG, palette GIF are converted to 28x28 gray and predicted;
    a corrupt, a missing and a truncated file each get one error line, and the exit status is 1."""
    good = [
        write_image(tmp_path / "in" / "gray.png", "L", (50, 40), 0),
        write_image(tmp_path / "in" / "photo.jpg", "RGB", (48, 64), 1),
        write_image(tmp_path / "in" / "alpha.png", "RGBA", (28, 28), 2),
        write_image(tmp_path / "in" / "palette.gif", "P", (20, 30), 3),
    ]
    corrupt = tmp_path / "in" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    truncated = tmp_path / "in" / "truncated.jpg"
    truncated.write_bytes(good[1].read_bytes()[:300])
    missing = tmp_path / "in" / "missing.png"
    out = tmp_path / "out"
    listed = as_list([good[0], corrupt, good[1], missing, good[2], truncated, good[3]])
    assert predict(compose_predict(f"ckpt_path={checkpoint}", f"images={listed}"), out) == 1  # the exit status
    result = capsys.readouterr()
    errors = [line for line in result.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3, result.err
    assert errors[0].startswith(f"error: {corrupt}: ") and "not an image" in errors[0]
    assert errors[1] == f"error: {missing}: file not found"
    assert errors[2].startswith(f"error: {truncated}: ") and "truncated" in errors[2]
    check_outputs(out, good, result.out, unreadable=[corrupt, missing, truncated])
    assert [r["path"] for r in read_predictions(out)] == [  # input order, unreadable ones included
        str(p) for p in (good[0], corrupt, good[1], missing, good[2], truncated, good[3])
    ]
    assert f"run directory: {out}" in result.out
    assert "3 of 7 images could not be read" in result.err


def test_predict_folder(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """images=FOLDER: every image file in it, sorted; other files ignored; status 0; top_k honoured.
    In-process (compose parses the overrides as the command line does) to spare an interpreter start-up."""
    folder = tmp_path / "folder"
    images = [
        write_image(folder / name, "L", (28, 28), i)
        for i, name in enumerate(["b.png", "a.bmp", "c.jpeg", "a.png"])  # a.bmp and a.png share a stem
    ]
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    status = predict(compose_predict(f"ckpt_path={checkpoint}", f"images={folder}", "top_k=5"), out)
    captured = capsys.readouterr()
    assert status == 0 and captured.err == ""
    rows = check_outputs(out, sorted(images), captured.out, top_k=5)
    assert sorted(row["figure"] for row in rows) == ["a-2.png", "a.png", "b.png", "c.png"]


def test_predict_missing_checkpoint_is_one_line(tmp_path: Path, capsys) -> None:
    image = write_image(tmp_path / "x.png", "L", (28, 28), 0)
    cfg = compose_predict(f"ckpt_path={tmp_path / 'nope.ckpt'}", f"images=[{image}]")
    line = one_line_error(lambda: predict(cfg, tmp_path / "out"), capsys)
    assert line == f"error: checkpoint not found: {tmp_path / 'nope.ckpt'}\n" and capsys.readouterr().out == ""


# --- whole-command errors, in-process (no interpreter start-up per case) ------------------------------
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("garbage", "garbage.ckpt"),  # the wording is src.checkpoints'; the path must be in it
        ("run_folder", "is a folder; give a .ckpt file, e.g. ckpt_path="),
        ("empty_folder", "no images in folder"),
        ("no_ckpt", "ckpt_path is required"),
        ("top_k", "top_k must be a positive integer"),
        ("batch_size", "batch_size must be a positive integer"),
        ("figures", "figures must be true or false"),
        ("device", "is not a torch device"),
    ],
)
def test_predict_bad_options(checkpoint: Path, tmp_path: Path, case: str, expected: str) -> None:
    image = write_image(tmp_path / "x.png", "L", (28, 28), 0)
    overrides = {"ckpt_path": str(checkpoint), "images": f"[{image}]"}
    extra: list[str] = []
    if case == "garbage":
        overrides["ckpt_path"] = str(tmp_path / "garbage.ckpt")
        (tmp_path / "garbage.ckpt").write_bytes(b"definitely not a checkpoint")
    elif case == "run_folder":
        overrides["ckpt_path"] = str(checkpoint.parent.parent)
    elif case == "empty_folder":
        overrides["images"] = str(_empty(tmp_path))
    elif case == "no_ckpt":
        del overrides["ckpt_path"]
    elif case in ("top_k", "batch_size"):
        extra = [f"{case}=0"]
    elif case == "figures":
        extra = ["figures=some"]
    else:
        extra = ["device=gpu"]
    cfg = compose_predict(*(f"{k}={v}" for k, v in overrides.items()), *extra)
    with pytest.raises(UserError) as error:  # report_errors: one line and exit 1, no traceback
        predict(cfg, tmp_path / "out")
    assert re.search(re.escape(expected), one_line(error.value))
    assert isinstance(error.value, UserError) or case == "garbage"
    assert case == "garbage" or "\n" not in str(error.value)


def test_predict_in_process_matches_the_model(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The printed top class is the model's own argmax on the normalized 28x28 tensor."""
    from src.runs.checkpoints import open_run

    image = write_image(tmp_path / "big.png", "RGB", (56, 56), 7)
    status = predict(compose_predict(f"ckpt_path={checkpoint}", f"images={image}", "top_k=20"), tmp_path / "out")
    assert status == 0
    module = open_run(checkpoint)[0]
    x = to_tensor(load_image(image, module.hparams.input_shape), module.hparams.mean, module.hparams.std)
    with torch.no_grad():
        probs = module(x.unsqueeze(0)).softmax(-1)[0]
    (row,) = read_predictions(tmp_path / "out")
    pairs = ranked(row)
    assert len(pairs) == len(FASHION_CLASSES)  # top_k larger than the class count: all classes
    assert sum(p for _, p in pairs) == pytest.approx(1.0, abs=1e-4)
    assert pairs[0] == (FASHION_CLASSES[int(probs.argmax())], pytest.approx(float(probs.max()), abs=1e-6))
    assert capsys.readouterr().out.startswith(f"{image}: {FASHION_CLASSES[int(probs.argmax())]} ")


# --- many images: batches, the streamed CSV, interruption --------------------------------------------
def test_figures_false_writes_one_csv_row_per_image_and_no_figures(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """50 PNGs in batches of 16: a row each, in order, the header for top_k=2, no figure, 0644, and a
    progress line instead of 50 per-image lines."""
    folder = tmp_path / "many"
    images = [write_image(folder / f"img{i:02d}.png", "L", (28, 28), i) for i in range(50)]
    out = tmp_path / "out"
    cfg = compose_predict(f"ckpt_path={checkpoint}", f"images={folder}", "figures=false", "batch_size=16", "top_k=2")
    assert predict(cfg, out) == 0
    captured = capsys.readouterr()
    with open(out / "predictions.csv", newline="") as f:
        assert next(csv.reader(f)) == [
            "path",
            "class",
            "probability",
            "top2_class",
            "top2_probability",
            "figure",
            "error",
        ]
    rows = read_predictions(out)
    assert [row["path"] for row in rows] == [str(p) for p in images]
    assert all(row["class"] in FASHION_CLASSES and row["figure"] == row["error"] == "" for row in rows)
    assert all(1.0 >= float(row["probability"]) >= float(row["top2_probability"]) > 0.0 for row in rows)
    assert not list(out.glob("*.png"))
    assert (out / "predictions.csv").stat().st_mode & 0o777 == 0o644
    assert prediction_lines(captured.out) == {} and "50 of 50 images" in captured.out
    assert f"run directory: {out} (predictions.csv)" in captured.out and captured.err == ""


def test_batched_predictions_equal_per_image_ones(checkpoint: Path, tmp_path: Path) -> None:
    """A mixed folder (sizes, modes, formats, an unreadable file mid-batch) in batches of 3 gives each image
    the class and probabilities it gets alone through load_image + to_tensor + the model."""
    from src.runs.checkpoints import open_run

    folder = tmp_path / "mixed"
    for i in range(12):
        mode, size, ext = [("L", (28, 28), "png"), ("RGB", (40, 64), "jpg"), ("RGBA", (33, 20), "png")][i % 3]
        write_image(folder / f"img{i:02d}.{ext}", mode, size, i)
    write_image(folder / "img04b.gif", "P", (20, 30), 99)
    (folder / "img05b.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    cfg = compose_predict(f"ckpt_path={checkpoint}", f"images={folder}", "figures=false", "batch_size=3", "top_k=10")
    assert predict(cfg, out) == 1  # the unreadable one

    module = open_run(checkpoint)[0]
    hp = module.hparams
    rows = read_predictions(out)
    assert [row["path"] for row in rows] == [str(p) for p in sorted(folder.iterdir())]
    for row in rows:
        if Path(row["path"]).name == "img05b.png":
            assert "not an image" in row["error"]
            continue
        x = to_tensor(load_image(Path(row["path"]), hp.input_shape), hp.mean, hp.std)
        with torch.no_grad():
            alone = module(x.unsqueeze(0)).softmax(-1)[0]
        pairs = ranked(row)
        assert pairs[0][0] == FASHION_CLASSES[int(alone.argmax())], row["path"]
        for name, p in pairs:
            assert p == pytest.approx(float(alone[FASHION_CLASSES.index(name)]), abs=2e-6), (row["path"], name)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_a_stopped_run_keeps_the_rows_it_finished(checkpoint: Path, tmp_path: Path, how: str) -> None:
    """Stopped midway (killed outright, or Ctrl-C), the CSV holds the header and whole rows for a prefix
    of the images, each with its figure; Ctrl-C also says how many and exits 130 without a traceback."""
    folder = tmp_path / "many"
    images = [write_image(folder / f"img{i:03d}.png", "L", (28, 28), i) for i in range(200)]
    out = tmp_path / "out"
    command = [sys.executable, "-m", "src.predict", f"ckpt_path={checkpoint}", f"images={folder}"]
    command += ["batch_size=2", f"hydra.run.dir={out}"]  # figures=true: ~10 ms an image, seconds in all
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 90
        while not (out / "predictions.csv").is_file() or (out / "predictions.csv").read_text().count("\n") < 3:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.02)
        process.send_signal(getattr(signal, how))
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    rows = read_predictions(out)
    assert 2 <= len(rows) < len(images)
    assert [row["path"] for row in rows] == [str(p) for p in images[: len(rows)]]
    assert all(row["class"] in FASHION_CLASSES and (out / row["figure"]).is_file() for row in rows)
    if how == "SIGKILL":
        assert process.returncode == -signal.SIGKILL
    else:
        assert process.returncode == 130 and "Traceback" not in stderr, stderr
        reported = int(re.search(r"interrupted after (\d+) of 200 images; their rows are in ", stderr).group(1))
        assert reported <= len(rows) and stderr.strip().endswith(str(out / "predictions.csv")), stderr


# --- exported models (src.export) ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The module's checkpoint exported by src.export to a format (ONNX, TorchScript), once per format."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from src.export import export

    folder, files = tmp_path_factory.mktemp("exported"), {}

    def export_as(fmt: str) -> Path:
        if fmt not in files:
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                out = folder / ("model.onnx" if fmt == "onnx" else "model.pt")
                files[fmt] = export(
                    compose("export", overrides=[f"ckpt_path={checkpoint}", f"format={fmt}", f"out={out}"])
                )
        return files[fmt]

    return export_as


# ONNX in the slow tier: torch.export's first export in a process takes seconds (TorchScript: a tenth of one)
@pytest.mark.parametrize("fmt", [pytest.param("onnx", marks=pytest.mark.slow), "torchscript"])
def test_predict_on_an_exported_file_equals_predict_on_its_checkpoint(
    checkpoint: Path, exported: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture, fmt: str
) -> None:
    """The same mixed folder (sizes, modes, formats, an unreadable file), in batches of 3: the same rows,
    classes and figures, probabilities within 1e-4, the same exit status."""
    folder = tmp_path / "mixed"
    for i in range(8):
        mode, size, ext = [("L", (28, 28), "png"), ("RGB", (40, 64), "jpg"), ("RGBA", (33, 20), "png")][i % 3]
        write_image(folder / f"img{i:02d}.{ext}", mode, size, i)
    (folder / "img03b.png").write_bytes(b"not a png")
    results = {}
    for name, model in (("checkpoint", checkpoint), (fmt, exported(fmt))):
        cfg = compose_predict(f"ckpt_path={model}", f"images={folder}", "batch_size=3", "top_k=10")
        assert predict(cfg, tmp_path / name) == 1  # the unreadable one
        results[name] = read_predictions(tmp_path / name)
        assert len(list((tmp_path / name).glob("*.png"))) == 8
    assert capsys.readouterr().err.count("error: ") == 2
    for want, got in zip(results["checkpoint"], results[fmt], strict=True):
        assert (got["path"], got["figure"], got["error"]) == (want["path"], want["figure"], want["error"])
        if want["error"]:
            continue
        assert [name for name, _ in ranked(got)] == [name for name, _ in ranked(want)], want["path"]
        for (_, p), (_, q) in zip(ranked(got), ranked(want), strict=True):
            assert p == pytest.approx(q, abs=1e-4)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no_metadata", "has no class_names metadata: only models exported by src.export can be used"),
        ("garbage_onnx", "is not a readable ONNX model"),
        ("garbage_pt", "is not a readable TorchScript model"),
        ("missing", "exported model not found: "),
    ],
)
def test_unusable_exported_file_is_one_line(tmp_path: Path, case: str, expected: str) -> None:
    from onnx import TensorProto, helper, save

    path = tmp_path / ("model.pt" if case == "garbage_pt" else "model.onnx")
    if case == "no_metadata":  # a valid ONNX model (images -> logits), not written by src.export
        io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 10]) for n in ("images", "logits")]
        graph = helper.make_graph([helper.make_node("Identity", ["images"], ["logits"])], "g", io[:1], io[1:])
        # versions any onnxruntime reads (make_model would take the newest onnx knows)
        save(helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)]), path)
    elif case != "missing":
        path.write_bytes(b"definitely not a model")
    image = write_image(tmp_path / "x.png", "L", (28, 28), 0)
    with pytest.raises(UserError) as error:
        predict(compose_predict(f"ckpt_path={path}", f"images=[{image}]"), tmp_path / "out")
    message = one_line(error.value)
    assert message.startswith(str(path) if case != "missing" else expected) and expected in message
    assert "\n" not in message
