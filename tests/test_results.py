"""`python -m benchmarks.results` (make results): README regions between markers, rows from a run's
metrics.json and a measured time, --dry-run, --only, the throughput parser and the CIFAR-10 folder helper.
Nothing here trains: a "command" is a one-line Python script that writes metrics.json."""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from conftest import REPO_ROOT, write_image_folder

from benchmarks import results
from benchmarks.results import Job, Measurement, Row, Table

README_TEXT = f"""# Title

Intro text | with a pipe.

<!-- results:demo -->

| command | test accuracy | wall time |
|---|---|---|
| `one` | 50.00% | 10 s |
| `two` | 60.00% | 20 s* |

A note that stays.

Measured earlier on some machine: `one`, `two` (shared cores*).

{results.STAR_NOTE}

<!-- /results:demo -->

## After

Other text.
"""

DEMO = Table(
    "demo",
    ["command", "test accuracy", "wall time"],
    [
        Row("one", "`one`", "job-one", lambda m, _: [results.percent(m.metrics["test/acc"]), results.seconds(m)]),
        Row("two", "`two`", "job-two", lambda m, _: [results.percent(m.metrics["test/acc"]), results.seconds(m)]),
    ],
)


def args_for(tmp_path: Path, **kw) -> argparse.Namespace:
    defaults = dict(fashion_mnist=str(tmp_path), cifar_dir=None, mnist_dir=None, dry_run=False)
    return argparse.Namespace(**{**defaults, **kw})


def test_replace_region_is_exact_and_idempotent():
    new = results.replace_region(README_TEXT, "demo", "\n\nNEW\n\n")
    start, end = results.markers("demo")
    assert new == README_TEXT.split(start)[0] + start + "\n\nNEW\n\n" + end + README_TEXT.split(end)[1]
    assert results.region(new, "demo") == "\n\nNEW\n\n"
    assert results.replace_region(new, "demo", "\n\nNEW\n\n") == new
    assert results.replace_region(new, "demo", results.region(README_TEXT, "demo")) == README_TEXT


@pytest.mark.parametrize(
    "text",
    [
        "no markers",
        "<!-- results:demo -->\nonly a start",
        "<!-- /results:demo -->\n<!-- results:demo -->\nreversed",
        "<!-- results:demo -->\n<!-- /results:demo -->\n<!-- results:demo -->\n<!-- /results:demo -->",
    ],
)
def test_replace_region_refuses_missing_or_repeated_markers(text):
    with pytest.raises(ValueError, match="results:demo"):
        results.replace_region(text, "demo", "x")


def test_render_without_measurements_keeps_the_region():
    content = results.region(README_TEXT, "demo")
    assert results.render_region(content, DEMO, {}) == content


def test_row_is_built_from_a_run_directorys_metrics_and_a_measured_time(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({"test/acc": 0.8695, "val/acc": 0.9}))
    quiet = Measurement(694.4, 0.02, results.read_metrics(run_dir), when="2026-01-02", machine="CPU X, 2 cores")
    content = results.render_region(results.region(README_TEXT, "demo"), DEMO, {"job-one": quiet})
    lines = content.splitlines()
    assert "| `one` | 86.95% | 694 s |" in lines
    assert "| `two` | 60.00% | 20 s* |" in lines  # not measured: kept as it was
    assert "A note that stays." in lines
    assert "Measured earlier on some machine: `two` (shared cores*)." in lines  # `one` moved to the new line
    assert "Measured 2026-01-02 on CPU X, 2 cores: `one` (other processes added 0.02 cores)." in lines
    assert results.STAR_NOTE in lines  # `two` still has a starred wall time
    # Measuring again with the same figures gives the same text.
    assert results.render_region(content, DEMO, {"job-one": quiet}) == content

    busy = Measurement(700.0, 0.9, {"test/acc": 0.87}, when="2026-01-02", machine="CPU X, 2 cores")
    both = results.render_region(content, DEMO, {"job-one": quiet, "job-two": busy})
    assert "| `two` | 87.00% | 700 s* |" in both.splitlines()
    assert "Measured earlier" not in both
    assert (
        "Measured 2026-01-02 on CPU X, 2 cores: `one` (other processes added 0.02 cores), "
        "`two` (other processes added 0.90 cores*)." in both.splitlines()
    )
    calm = results.render_region(
        both, DEMO, {"job-two": Measurement(20, 0.0, {"test/acc": 0.6}, when="d", machine="m")}
    )
    assert results.STAR_NOTE not in calm  # no starred wall time left


def test_missing_metrics_json_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="metrics.json"):
        results.read_metrics(tmp_path)


def test_evaluate_row_says_whether_it_matches_training():
    row = next(r for r in results.TABLES[0].rows if r.name == "evaluate")
    trained = {"fashion_cnn_adam": Measurement(100, None, {"test/acc": 0.8805})}
    same = row.cells(Measurement(12.3, None, {"test/acc": 0.88051}), trained)
    assert same == ["real Fashion-MNIST", "88.05% (same as training)", "12 s"]
    other = row.cells(Measurement(12.3, None, {"test/acc": 0.8700}), trained)
    assert other[1] == "87.00% (training gave 88.05%)"


def test_ablation_rows_show_each_variants_change_against_the_recipe():
    table = next(t for t in results.TABLES if t.name == "ablation")
    assert table.together and table.rows[0].job == "ablation-recipe"
    measured = {row.job: Measurement(100, None, {"test/acc": 0.80}) for row in table.rows}
    measured["ablation-no-tta"] = Measurement(90.4, None, {"test/acc": 0.7925})
    cells = {row.job: row.cells(measured[row.job], measured) for row in table.rows}
    assert cells["ablation-recipe"] == ["80.00%", "", "100 s"]  # the base of the comparison
    assert cells["ablation-no-tta"] == ["79.25%", "-0.75", "90 s"]
    base = results.JOBS["ablation-recipe"].args
    assert {"scheduler.warmup=0.23", "ema_decay=null"} <= set(base)  # spelled out: later recipe changes keep it
    for name, _, change in results.ABLATIONS[1:]:  # each variant is the base command with one setting changed
        args = results.JOBS[f"ablation-{name}"].args
        assert set(args) - set(base) == {f"{key}={value}" for key, value in change.items()}
        added = set(change) - set(results.ABLATION_BASE)
        assert len(args) == len(base) + len(added) == len({arg.split("=")[0] for arg in args})  # no key twice


def test_every_results_table_has_its_markers_and_renders_unchanged():
    text = (REPO_ROOT / "RESULTS.md").read_text()
    for table in results.TABLES:
        content = results.region(text, table.name)
        assert results.render_region(content, table, {}) == content
        old_rows, _, _ = results.parse_region(content)
        assert [row.label for row in table.rows] == list(old_rows)  # every row found by its label


def test_dry_run_lists_the_commands_of_each_table(tmp_path, capsys):
    cifar = tmp_path / "cifar"
    (cifar / "train").mkdir(parents=True)
    readme = tmp_path / "RESULTS.md"
    readme.write_text((REPO_ROOT / "RESULTS.md").read_text())
    before = readme.read_text()
    assert (
        results.main(["--dry-run", "--results", str(readme), "--cifar-dir", str(cifar), "--output", str(tmp_path)]) == 0
    )
    out = capsys.readouterr().out
    assert readme.read_text() == before
    for table in results.TABLES:
        assert f"== {table.name}" in out
    for expected in [
        "make-train: make train ARGS=hydra.run.dir=",
        "fashion_cnn_adam: python -m src.train experiment=fashion_cnn_adam ",
        "fashion_cnn_dropout_sgd: python -m src.train experiment=fashion_cnn_dropout_sgd ",
        "fashion_mlp_adam: python -m src.train experiment=fashion_mlp_adam ",
        f"cifar_cnn3_sgd: python -m src.train experiment=cifar_cnn3_sgd dataset=image_folder dataset.data_dir={cifar}",
        "evaluate: python -m src.evaluate 'ckpt_path=<best checkpoint of fashion_cnn_adam>'",
        "fast_fashion_mnist-seed0: python -m src.train experiment=fast_fashion_mnist seed=0 ",
        "fast_fashion_mnist-seed1: python -m src.train experiment=fast_fashion_mnist seed=1 ",
        f"fast_cifar10-seed0: python -m src.train experiment=fast_cifar10 seed=0 dataset=image_folder "
        f"dataset.data_dir={cifar}",
        "fast_mnist-seed0: skipped, kept as it is: no real MNIST",
        "fast_mnist_7200: skipped, kept as it is: no real MNIST",
        "per-sample: python -m src.train experiment=fast_fashion_mnist dataset.in_memory=false seed=0 ",
        "throughput-cnn2-64: python -m benchmarks.throughput --data-dir ",
        "startup-whole: python -m benchmarks.startup --fashion-mnist ",
    ]:
        assert expected in out, expected
    for line in out.splitlines():
        if "python -m src.train" in line:
            assert "hydra.run.dir=" in line  # every run goes to its own folder, read back from there

    results.main(["--dry-run", "--results", str(readme), "--output", str(tmp_path), "--only", "seed-experiments"])
    out = capsys.readouterr().out
    assert "== recipes" not in out
    assert "cifar_cnn3_sgd: skipped, kept as it is: no CIFAR-10 image folder (--cifar-dir DIR" in out


def test_only_picks_tables_and_rows_and_the_runs_they_read():
    tables, jobs = results.selected("evaluate")
    assert jobs == {"evaluate", "fashion_cnn_adam"}
    assert [t.name for t in tables] == ["seed-experiments"]
    recipes = {
        *(f"fast_{name}-seed{seed}" for name in ("fashion_mnist", "mnist") for seed in (0, 1)),
        "fast_mnist_7200",
    }
    tables, jobs = results.selected("data-paths")  # a comparison: both rows; its seed-0 run is half of recipes
    assert jobs == {*recipes, "fast_fashion_mnist_per_sample"}
    assert [t.name for t in tables] == ["recipes", "data-paths"]
    tables, jobs = results.selected("fast_fashion_mnist-seed0")  # its data-paths row is half a comparison
    assert jobs == {*recipes, "fast_fashion_mnist_per_sample"}
    with pytest.raises(SystemExit, match="nope"):
        results.selected("nope")


def test_a_comparison_table_is_rewritten_only_when_all_its_rows_were_measured():
    table = next(t for t in results.TABLES if t.name == "data-paths")
    content = results.region((REPO_ROOT / "RESULTS.md").read_text(), "data-paths")
    m = Measurement(100.0, 0.0, {"test/acc": 0.9}, when="d", machine="M")
    assert results.render_region(content, table, {"fast_fashion_mnist-seed0": m}) == content
    both = results.render_region(content, table, {"fast_fashion_mnist-seed0": m, "fast_fashion_mnist_per_sample": m})
    assert both.count("| 90.00% | 100.0 s |") == 2


def test_an_older_wording_of_the_star_note_is_replaced():
    old = results.region(README_TEXT, "demo").replace(results.STAR_NOTE, "\\* measured while other processes did X.")
    assert "did X" not in results.render_region(old, DEMO, {})
    assert results.STAR_NOTE in results.render_region(old, DEMO, {})


def test_a_command_is_timed_and_its_metrics_read_back(tmp_path, monkeypatch):
    """The whole loop on a fake command: run, time, read metrics.json, rewrite the README's region."""
    script = (
        "import json, pathlib, sys; p = pathlib.Path(sys.argv[1]); p.mkdir(parents=True); "
        "(p / 'metrics.json').write_text(json.dumps({'test/acc': 0.75}))"
    )
    jobs = {
        "job-one": Job("job-one", ["python", "-c", script, "{run_dir}"]),
        "job-two": Job("job-two", ["python", "-c", "import sys; sys.exit(3)"]),
    }
    monkeypatch.setattr(results, "JOBS", jobs)
    monkeypatch.setattr(results, "TABLES", [DEMO])
    readme = tmp_path / "README.md"
    readme.write_text(README_TEXT)
    code = results.main(["--results", str(readme), "--output", str(tmp_path / "out")])
    assert code == 1  # job-two failed: its row stays as it was
    text = readme.read_text()
    assert "| `one` | 75.00% | " in text
    assert "| `two` | 60.00% | 20 s* |" in text
    assert text.split("<!-- results:demo -->")[0] == README_TEXT.split("<!-- results:demo -->")[0]
    assert text.split("<!-- /results:demo -->")[1] == README_TEXT.split("<!-- /results:demo -->")[1]
    run_dirs = list((tmp_path / "out").glob("*/job-one/metrics.json"))
    assert len(run_dirs) == 1
    wall = float(text.split("| `one` | 75.00% | ")[1].split(" s")[0])
    assert 0 <= wall < 60


def test_parse_throughput_output():
    header = ["(a) seed loop", "(b) in-memory", "(b') +NHWC", "(l) Lightning", "(c) ours", "c/a", "c/b", "c/b'", "c/l"]
    printed = [f"\n{'case':32}" + "".join(f"{h:>15}" for h in header[:5]) + "".join(f"{h:>7}" for h in header[5:])]
    for name, (a, b, bc, lit, c) in [
        ("cnn2 Fashion-MNIST batch 64", (10166, 14313, 18263, 16000, 17148)),
        ("cnn2 Fashion-MNIST batch 256", (13909, 21646, 26579, 24000, 22719)),
        ("cnn3 CIFAR-10-shaped batch 128", (5065, 5868, 7656, 6500, 6739)),
    ]:
        ratios = "".join(f"{c / x:7.2f}" for x in (a, b, bc, lit))
        printed.append(f"{name:32}{a:15.0f}{b:15.0f}{bc:15.0f}{lit:15.0f}{c:15.0f}{ratios}")
    printed += ["images/second, median of 3 rounds of 100 timed steps, torch 2.14.1, 2 threads",
                "worst c/l = 0.95", "worst c/b' at batch >= 256 = 0.85"]  # fmt: skip
    m = Measurement(300, None, output="\n".join(printed))
    assert results.throughput_cells("cnn2 Fashion-MNIST batch 64")(m) == [
        "10,166", "14,313", "18,263", "16,000", "17,148", "1.69", "1.20", "0.94", "1.07"
    ]  # fmt: skip
    assert results.throughput_cells("cnn3 CIFAR-10-shaped batch 128")(m)[4] == "6,739"
    with pytest.raises(RuntimeError, match="batch 256"):  # the run then counts as failed: rows kept
        results.throughput_cells("cnn2 Fashion-MNIST batch 256")(Measurement(300, output=printed[1]))
    m.note, m.other_load, m.when, m.machine = "median of 3 rounds of 100 timed steps, 2 threads", 0.5, "d", "M"
    table = next(t for t in results.TABLES if t.name == "throughput")
    content = results.render_region("\n\n", table, {"throughput": m})
    assert (
        "| cnn2, Fashion-MNIST, batch 64 | 10,166 | 14,313 | 18,263 | 16,000 | 17,148 | 1.69 | 1.20 | 0.94 | 1.07 |"
        in (content)
    )
    assert "| worst c/l (target >= 0.95) | 0.95 |" in content
    assert "| worst c/b' at batch >= 256 (target >= 0.95) | 0.85 |" in content
    assert (
        "`throughput-cnn2-64` (median of 3 rounds of 100 timed steps, 2 threads; other processes added 0.50 cores)"
        in content
    )
    assert results.STAR_NOTE not in content  # no wall time here


def test_recipe_rows_give_each_seed_its_epochs_and_the_mean_of_two(tmp_path):
    table = next(t for t in results.TABLES if t.name == "recipes")
    metrics = {"epochs": 5, "val/acc_per_epoch": [0.99, 0.995]}
    runs = {
        f"fast_mnist-seed{s}": Measurement(100 + s, None, {**metrics, "test/acc": 0.995 + s / 1000}) for s in (0, 1)
    }
    rows = {row.name: row.cells(runs[row.job], runs) for row in table.rows if row.job in runs}
    assert rows["fast_mnist-seed0"][2:] == ["5", "99.0 99.5", "99.50%", "100 s"]
    assert rows["fast_mnist-mean"][4:] == ["**99.55%**", "100 s"]
    assert results.per_epoch_val_acc(tmp_path) == []  # no TensorBoard events: no per-epoch figures


def test_the_7200_digit_subset_keeps_the_first_training_digits_and_the_whole_test_split(tmp_path):
    from conftest import write_idx

    write_idx(tmp_path / "mnist", n_train=20, gz=True)
    results.write_mnist_subset(tmp_path / "mnist", tmp_path / "subset", 7)
    from torchvision.datasets.mnist import read_image_file, read_label_file

    full = read_image_file(str(tmp_path / "subset" / "t10k-images-idx3-ubyte"))
    train, labels = (read(str(tmp_path / "subset" / f"train-{kind}")) for read, kind in
                     ((read_image_file, "images-idx3-ubyte"), (read_label_file, "labels-idx1-ubyte")))  # fmt: skip
    assert train.shape == (7, 28, 28) and labels.tolist() == list(range(7)) and len(full) == 30


def test_missing_data_skips_rows(tmp_path):
    fashion = Job("f", [], ("fashion",))
    assert "no Fashion-MNIST" in results.missing(fashion, args_for(tmp_path))
    for name in results.IDX_FILES:
        (tmp_path / f"{name}.gz").write_bytes(b"")
    assert results.missing(fashion, args_for(tmp_path)) is None
    assert "--cifar-dir" in results.missing(Job("c", [], ("cifar",)), args_for(tmp_path))
    assert "--make-cifar-dir" in results.missing(Job("c", [], ("cifar",)), args_for(tmp_path, cifar_dir="nowhere"))
    assert "MNIST" in results.missing(Job("m", [], ("mnist",)), args_for(tmp_path))


def test_make_cifar_dir_holds_out_the_last_images_of_each_class(tmp_path):
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for cls in ("cat", "dog"):
            for i in reversed(range(5)):  # archive order must not matter
                data = f"{cls}{i}".encode()
                info = tarfile.TarInfo(f"train/{cls}/{i:04d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    target = tmp_path / "cifar"
    results.make_cifar_dir(target, archive, test_per_class=2)
    for cls in ("cat", "dog"):
        assert sorted(p.name for p in (target / "train" / cls).iterdir()) == ["0000.jpg", "0001.jpg", "0002.jpg"]
        assert sorted(p.name for p in (target / "test" / cls).iterdir()) == ["0003.jpg", "0004.jpg"]
        assert (target / "test" / cls / "0004.jpg").read_bytes() == f"{cls}4".encode()
    assert not (tmp_path / ".cifar.tmp").exists()
    results.make_cifar_dir(target, archive, test_per_class=2)  # already there: left alone
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file").write_text("x")
    with pytest.raises(SystemExit, match="not empty"):
        results.make_cifar_dir(tmp_path / "other", archive, test_per_class=2)


def test_machine_line_names_cpu_cores_torch_and_commit():
    line = results.machine()
    assert f"{os.cpu_count()} cores" in line
    assert "torch " in line and "commit " in line
    assert ": " not in line  # the measurement line's own separator


@pytest.mark.slow  # warm_cache decodes in a subprocess, as `make results` runs it
def test_cifar_rows_decode_their_images_untimed_into_the_cache_the_timed_run_reads(tmp_path, caplog, compose_cfg):
    from hydra.utils import instantiate

    data = write_image_folder(tmp_path / "images", mode="RGB", size=(32, 32))
    overrides = ["experiment=fast_cifar10", "dataset=image_folder", f"dataset.data_dir={data}", "seed=1"]
    results.warm_cache(["python", "-m", "src.train", *overrides, f"hydra.run.dir={tmp_path / 'run'}"])
    assert sorted(p.name.split("-")[1] for p in (data / ".cache").glob("*.pt")) == ["test", "train"]
    datamodule = instantiate(compose_cfg(overrides).dataset)
    with caplog.at_level("INFO", logger="src.data.in_memory"):
        datamodule.prepare_data()
        datamodule.setup()
    assert len(datamodule.train_set) + len(datamodule.val_set) == 60 and "decoding" not in caplog.text
