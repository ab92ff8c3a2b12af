"""resnet-eval on a checkpoint trained in the test: it must score exactly what training scored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_one_error_line, call_main, run_cli

from resnet_cli.config import ConfigError
from resnet_cli.data.transforms import Preprocess

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_run(tmp_path_factory) -> Path:
    """One tiny training run per test session, shared by the eval/predict/export tests
    (trained once, found again by path; a subprocess, as users run it)."""
    run_dir = tmp_path_factory.getbasetemp() / "after_training" / "run"
    if not (run_dir / "results.json").is_file():
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        run_cli("resnet-train", "data=synthetic", "model=resnet20", "epochs=2", "trainer.progress=plain",
                "data.train_size=256", "data.test_size=128", "batch_size=64", f"hydra.run.dir={run_dir}",
                cwd=run_dir.parent, check=True, timeout=300)
    return run_dir


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="session")
def best_eval(run_dir, tmp_path_factory) -> tuple[dict, Path, str]:
    out = tmp_path_factory.mktemp("eval_best")
    proc = run_cli("resnet-eval", f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}", f"output_dir={out}",
                   check=True, timeout=300)
    return json.loads((out / "eval.json").read_text()), out, proc.stdout


def test_best_checkpoint_scores_the_runs_best_test_acc(run_dir, best_eval):
    result, _, _ = best_eval
    results = json.loads((run_dir / "results.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    best_row = max(rows, key=lambda r: r["test_acc"])
    assert result["top1"] == results["best_test_acc"] == best_row["test_acc"]  # exactly: same computation
    assert result["loss"] == pytest.approx(best_row["test_loss"], rel=1e-9)
    assert result["epoch"] == results["best_epoch"]
    assert result["images"] == 128


def test_eval_json_and_confusion_png(best_eval):
    result, out, stdout = best_eval
    for key in ("checkpoint", "epoch", "model", "dataset", "images", "top1", "top5", "loss", "device", "precision",
                "class_names", "per_class", "confusion", "data"):
        assert key in result
    assert result["model"] == "resnet20" and result["dataset"] == "synthetic"
    assert 0 <= result["top1"] <= result["top5"] <= 1
    n = len(result["class_names"])
    conf = torch.tensor(result["confusion"])
    assert conf.shape == (n, n) and int(conf.sum()) == result["images"]
    per = result["per_class"]
    assert [p["name"] for p in per] == result["class_names"]
    assert [p["correct"] for p in per] == conf.diag().tolist()
    assert [p["images"] for p in per] == conf.sum(1).tolist()
    assert sum(p["correct"] for p in per) / result["images"] == pytest.approx(result["top1"], abs=1e-12)
    for p in per:
        assert p["accuracy"] is None or p["accuracy"] == pytest.approx(p["correct"] / p["images"])
    assert (out / "confusion.png").read_bytes()[:8] == PNG_MAGIC
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files
    # the terminal report (plain: stdout is a pipe here)
    assert f"top-1 {result['top1']:.4f}" in stdout
    assert "per-class accuracy" in stdout and "confusion matrix" in stdout
    assert "class_0" in stdout and "\x1b[" not in stdout


def test_default_output_is_the_run_folder_and_last_pt_matches_its_epoch(run_dir, monkeypatch, capsys):
    from resnet_cli.evaluate import main

    code, out, err = call_main(main, "resnet-eval", [f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}",
                                                     "device=cpu"], monkeypatch, capsys)
    assert code == 0, err
    result = json.loads((run_dir / "eval.json").read_text())
    assert (run_dir / "confusion.png").read_bytes()[:8] == PNG_MAGIC
    last_row = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert result["epoch"] == last_row["epoch"] == 2
    assert result["top1"] == last_row["test_acc"]


def test_data_override_and_run_folder_argument(run_dir, tmp_path, monkeypatch, capsys):
    from resnet_cli.evaluate import main

    code, out, err = call_main(main, "resnet-eval", [f"checkpoint={run_dir}", "data.limit_test=50",
                                                     f"output_dir={tmp_path}"], monkeypatch, capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["images"] == 50 and result["checkpoint"].endswith("best.pt")
    assert result["data"]["limit_test"] == 50 and result["data"]["train_size"] == 256  # the rest: as stored


def test_eval_data_config_keeps_the_stored_data_and_the_checkpoints_preprocessing(tmp_path, monkeypatch):
    from resnet_cli.evaluate import eval_data_config

    prep = Preprocess(channels=1, size=96, mean=(0.25,), std=(0.5,))
    stored = {"name": "fashion_mnist", "root": "data", "limit_test": 300, "resize": 96, "mean": None, "std": None,
              "normalize": True, "download": True}
    composed = {**stored, "root": "/elsewhere", "limit_test": None, "download": False}
    cfg = eval_data_config(stored, composed, {"data.root"}, prep)
    assert cfg["root"] == "/elsewhere" and cfg["limit_test"] == 300 and cfg["download"] is True
    assert (cfg["resize"], cfg["mean"], cfg["std"], cfg["normalize"]) == (96, [0.25], [0.5], True)
    # a relative root that is not here is looked up where training ran
    (tmp_path / "train_cwd" / "data").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = eval_data_config(stored, composed, set(), prep, train_cwd=tmp_path / "train_cwd")
    assert cfg["root"] == str(tmp_path / "train_cwd" / "data")
    assert eval_data_config(stored, composed, set(), prep, train_cwd=None)["root"] == "data"
    with pytest.raises(ConfigError, match="data.mean: preprocessing comes from the checkpoint"):
        eval_data_config(stored, composed, {"data.mean"}, prep)


def test_bad_input_subprocess_one_line(tmp_path):
    proc = run_cli("resnet-eval", f"checkpoint={tmp_path / 'missing.pt'}")
    assert_one_error_line(proc.returncode, proc.stderr, "missing.pt", "no such file")
    assert proc.stdout == ""


@pytest.mark.parametrize("case", ["no_checkpoint_key", "foreign", "corrupt", "unknown_key", "preprocessing",
                                  "bad_device", "channels", "misfit", "exported", "training_only"])
def test_bad_input_in_process(case, run_dir, tmp_path, monkeypatch, capsys):
    from resnet_cli.evaluate import main

    best = run_dir / "checkpoints" / "best.pt"
    foreign, corrupt = tmp_path / "foreign.pt", tmp_path / "corrupt.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip archive")
    misfit = tmp_path / "misfit.pt"  # its config names one more block per stage than its weights have
    state = torch.load(best, weights_only=True)
    state["config"]["model"]["layers"] = [n + 1 for n in state["config"]["model"]["layers"]]
    torch.save(state, misfit)
    exported = tmp_path / "exported.pt"  # what resnet-export writes: a program, not a checkpoint
    if case == "exported":
        import warnings

        with warnings.catch_warnings():  # torch deprecates torch.jit (resnet-export silences it too)
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), exported)
    argv, needles = {
        "no_checkpoint_key": ([], ("checkpoint: required",)),
        "foreign": ([f"checkpoint={foreign}"], ("not a resnet-cli checkpoint",)),
        "corrupt": ([f"checkpoint={corrupt}"], ("corrupt.pt", "cannot be read")),
        "unknown_key": ([f"checkpoint={best}", "chekpoint=x"], ("chekpoint: unknown key", "did you mean checkpoint")),
        "preprocessing": ([f"checkpoint={best}", "data.resize=64"], ("data.resize",)),
        "bad_device": ([f"checkpoint={best}", "device=tpu"], ("device=tpu",)),
        "channels": ([f"checkpoint={best}", "data.channels=3"], ("3-channel", "1 channel")),
        "misfit": ([f"checkpoint={misfit}"], ("weights do not fit its model config (Missing key(s) in state_dict",)),
        "exported": ([f"checkpoint={exported}"], ("exported.pt: is a TorchScript file (an exported model",)),
        "training_only": ([f"checkpoint={best}", "data.limit_train=5"], ("data.limit_train: has no effect on "
                                                                          "evaluation",)),
    }[case]
    code, out, err = call_main(main, "resnet-eval", argv, monkeypatch, capsys)
    assert_one_error_line(code, err, *needles)


@pytest.mark.parametrize("module", ["evaluate", "predict", "export"])
def test_help_lists_the_keys(module, monkeypatch, capsys):
    import importlib

    main = importlib.import_module(f"resnet_cli.{module}").main
    code, out, err = call_main(main, f"resnet-{module}", ["--help"], monkeypatch, capsys)
    assert code == 0 and out.startswith("usage: resnet-") and "checkpoint=PATH" in out and err == ""


def test_an_unwritable_output_dir_is_refused_before_evaluating(run_dir, tmp_path, monkeypatch, capsys):
    from resnet_cli.evaluate import main

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, out, err = call_main(main, "resnet-eval", [f"checkpoint={run_dir}", f"output_dir={blocker / 'sub'}"],
                               monkeypatch, capsys)
    assert_one_error_line(code, err, f"output_dir={blocker / 'sub'}", f"{blocker} is not a folder")
    assert out == ""  # refused before the evaluation ran


def test_a_full_disk_while_writing_the_report_is_one_line(run_dir, tmp_path):
    import subprocess

    from conftest import command
    from test_export import assert_failed_in_one_line, limited_file_size

    (tmp_path / "eval.json").write_text("{}")
    proc = subprocess.run([command("resnet-eval"), f"checkpoint={run_dir}", f"output_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300, preexec_fn=limited_file_size(1000))
    assert_failed_in_one_line(proc.returncode, proc.stderr, "cannot write", "File too large")
    assert (tmp_path / "eval.json").read_text() == "{}"  # atomic: the old file is intact


def test_class_names_print_as_they_are(run_dir, tmp_path, monkeypatch, capsys):
    """Class names are text, not rich markup: "[unlabeled]" printed blank and "cat [old]" as "cat"."""
    from resnet_cli.evaluate import main

    state = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    state["class_names"] = ["[unlabeled]", "cat [old]"] + [f"class_{i}" for i in range(2, 10)]
    renamed = tmp_path / "renamed.pt"
    torch.save(state, renamed)
    code, out, err = call_main(main, "resnet-eval", [f"checkpoint={renamed}", f"output_dir={tmp_path}"],
                               monkeypatch, capsys)
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()[:1].isdigit()}
    assert "[unlabeled]" in rows["0"] and "cat [old]" in rows["1"]


def test_a_reader_that_goes_away_does_not_cost_the_report(run_dir, tmp_path):
    """`resnet-eval ... | head -2`: the report files are written before the tables are printed."""
    import os
    import subprocess

    from conftest import command

    read, write = os.pipe()
    os.close(read)
    subprocess.run([command("resnet-eval"), f"checkpoint={run_dir}", f"output_dir={tmp_path}"], stdout=write,
                   stderr=subprocess.PIPE, text=True, timeout=300)
    os.close(write)
    assert json.loads((tmp_path / "eval.json").read_text())["images"] == 128
    assert (tmp_path / "confusion.png").is_file()


def test_a_mid_epoch_checkpoint_is_named_as_the_stop_message_names_it():
    """A last.pt saved at step 40 of epoch 1 has done 0 epochs: `epoch 1, step 40`, not `epoch 0`."""
    from resnet_cli.inference import Loaded

    def when(epoch: int, step: int) -> str:
        return Loaded(None, None, [], 10, 1, "resnet20", {}, Path("last.pt"), epoch, step).when()

    assert when(0, 40) == "epoch 1, step 40"
    assert when(2, 0) == "epoch 2"


def test_a_runs_checkpoints_folder_names_its_best_checkpoint(tmp_path):
    """checkpoint=RUN/checkpoints, as resume=RUN/checkpoints: the folder that holds best.pt."""
    from resnet_cli.inference import resolve_checkpoint

    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.pt").write_bytes(b"x")
    assert resolve_checkpoint(ckpts) == resolve_checkpoint(tmp_path / "run") == ckpts / "last.pt"
    (ckpts / "best.pt").write_bytes(b"x")
    assert resolve_checkpoint(ckpts) == resolve_checkpoint(tmp_path / "run") == ckpts / "best.pt"
