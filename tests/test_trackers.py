"""logger=tensorboard / logger=mlflow: what each tool's own reader finds equals metrics.jsonl,
also after an extended run, a run resumed from an older checkpoint, and a Ctrl-C.

TensorBoard is read with its EventAccumulator, MLflow with MlflowClient on a file store.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_one_error_line, call_main, command, run_cli

from resnet_cli.config import ConfigError
from resnet_cli.trackers import check, file_store_allowed

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

SPE, EVERY = 4, 2  # steps per epoch (256 images / 64), TensorBoard's log_every_n_steps
TINY = ["data=synthetic", "model=resnet20", "model.layers=[1,1,1]", "data.train_size=256", "data.test_size=64", "batch_size=64",
        "trainer.progress=plain", "trainer.eval_batch_size=64"]
BOTH = ["logger=[tensorboard,mlflow]", f"logger.tensorboard.log_every_n_steps={EVERY}"]


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def mlflow_client(run: Path):
    from mlflow.tracking import MlflowClient

    state = json.loads((run / "trackers.json").read_text())["mlflow"]
    with file_store_allowed(state["tracking_uri"]):
        return MlflowClient(state["tracking_uri"]), state["run_id"]


def assert_tensorboard_matches(run: Path) -> None:
    """Every epoch value at step epoch * SPE, once; every step point once."""
    acc, table = events(run), rows(run)
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "train_images_per_s", "epoch_time_s"):
        got = scalars(acc, f"epoch/{key}")
        assert [s for s, _ in got] == [r["epoch"] * SPE for r in table], key
        assert [v for _, v in got] == pytest.approx([r[key] for r in table], rel=1e-6), key  # float32 in the file
    steps = [s for s, _ in scalars(acc, "step/train_loss")]
    assert steps == list(range(EVERY, len(table) * SPE + 1, EVERY))  # each once, in order: nothing repeated


def mlflow_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> Path:
    """1 epoch; extended to 2 (same runs go on); then resumed from the epoch-1 checkpoint
    again (TensorBoard purges epoch 2's first life; MLflow branches a nested run)."""
    cwd = tmp_path_factory.mktemp("tracked")
    run = cwd / "run"
    run_cli("resnet-train", *TINY, *BOTH, "epochs=1", f"hydra.run.dir={run}", cwd=cwd, check=True)
    shutil.copy(run / "checkpoints" / "last.pt", run / "checkpoints" / "epoch1.pt")
    first_state = json.loads((run / "trackers.json").read_text())
    run_cli("resnet-train", f"resume={run}", "epochs=2", cwd=cwd, check=True)
    extended = json.loads((run / "trackers.json").read_text())
    assert extended == first_state  # the same MLflow run went on
    (run / "extended.json").write_text(json.dumps({"rows": rows(run), "trackers": extended}))
    run_cli("resnet-train", f"resume={run / 'checkpoints' / 'epoch1.pt'}", "epochs=2", cwd=cwd, check=True)
    return run


def test_tensorboard_holds_what_metrics_jsonl_holds(tracked):
    from tensorboard.plugins.hparams import plugin_data_pb2

    assert_tensorboard_matches(tracked)
    acc, table = events(tracked), rows(tracked)
    # the step points are means over their EVERY steps: two equal windows make each epoch's mean
    for r in table:
        window = [v for s, v in scalars(acc, "step/train_loss") if (r["epoch"] - 1) * SPE < s <= r["epoch"] * SPE]
        assert sum(window) / len(window) == pytest.approx(r["train_loss"], rel=1e-5)
    results = json.loads((tracked / "results.json").read_text())
    # final metrics where each life of the run ended: epoch 1, then (extended) epoch 2
    assert scalars(acc, "hparams/best_test_acc")[-1] == (2 * SPE, pytest.approx(results["best_test_acc"], rel=1e-6))
    assert [s for s, _ in scalars(acc, "hparams/best_test_acc")] == [SPE, 2 * SPE]
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["lr"].number_value == 0.05 and hparams["model.name"].string_value == "resnet20"
    assert [e.step for e in acc.Images("curves")] == [SPE, 2 * SPE]


def test_mlflow_run_holds_what_metrics_jsonl_holds(tracked):
    client, run_id = mlflow_client(tracked)
    before = json.loads((tracked / "extended.json").read_text())
    parent_id = before["trackers"]["mlflow"]["run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "run"
    assert client.get_experiment(parent.info.experiment_id).name == "resnet-cli"
    assert parent.data.params["lr"] == "0.05" and parent.data.params["model.name"] == "resnet20"
    assert parent.data.params["epochs"] == "1" and parent.data.tags["resumed.epochs"] == "2"  # params cannot change
    # only what the user changed: not the resume= itself
    assert sorted(k for k in parent.data.tags if k.startswith("resumed.")) == ["resumed.epochs"]
    tags = parent.data.tags
    assert (tags["model"], tags["dataset"], tags["device"]) == ("resnet20", "synthetic", "cpu")
    for key in ("train_loss", "test_acc", "lr", "train_images_per_s"):  # epochs 1 and 2, once each
        assert mlflow_history(client, parent_id, key) == [(r["epoch"], r[key]) for r in before["rows"]], key
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"results.json", "curves.png"} <= artifacts

    # the resume from epoch 1 is a new run under it, holding only what it ran
    assert run_id != parent_id
    child = client.get_run(run_id)
    assert child.data.tags["mlflow.parentRunId"] == parent_id and child.info.status == "FINISHED"
    assert mlflow_history(client, run_id, "test_acc") == [(2, rows(tracked)[1]["test_acc"])]
    local = Path(client.download_artifacts(run_id, "results.json", str(tracked.parent)))
    assert json.loads(local.read_text()) == json.loads((tracked / "results.json").read_text())


def test_resnet_eval_adds_the_confusion_matrix(tracked, monkeypatch, capsys, tmp_path):
    from resnet_cli.evaluate import main

    code, out, err = call_main(main, "resnet-eval", [f"checkpoint={tracked / 'checkpoints' / 'last.pt'}",
                                                     f"output_dir={tmp_path}"], monkeypatch, capsys)
    assert code == 0, err
    assert f"logged to TensorBoard ({tracked / 'tb'}, step {2 * SPE})" in err
    result = json.loads((tmp_path / "eval.json").read_text())
    acc = events(tracked)
    assert [e.step for e in acc.Images("eval/confusion_matrix")] == [2 * SPE]
    assert scalars(acc, "eval/top1") == [(2 * SPE, pytest.approx(result["top1"], rel=1e-6))]
    client, run_id = mlflow_client(tracked)
    assert mlflow_history(client, run_id, "eval_top1") == [(2, result["top1"])]
    assert {a.path for a in client.list_artifacts(run_id, "eval")} == {"eval/eval.json", "eval/confusion.png"}


def test_an_evaluation_of_other_data_leaves_the_runs_trackers_alone(tracked, monkeypatch, capsys, tmp_path):
    """A subset (or another dataset) would replace the run's own evaluation there: same step, same names."""
    from resnet_cli.evaluate import main

    client, run_id = mlflow_client(tracked)
    before = mlflow_history(client, run_id, "eval_top1")
    code, out, err = call_main(main, "resnet-eval", [f"checkpoint={tracked / 'checkpoints' / 'last.pt'}",
                                                     "data.limit_test=10", f"output_dir={tmp_path}"], monkeypatch, capsys)
    assert code == 0, err
    assert "warning: not logged to the run's trackers: data.limit_test changes what is scored" in err
    assert json.loads((tmp_path / "eval.json").read_text())["images"] == 10  # the files are written all the same
    assert mlflow_history(client, run_id, "eval_top1") == before


@pytest.mark.slow
def test_ctrl_c_then_resume_continues_the_same_runs(tmp_path):
    run = tmp_path / "run"
    # 32 steps per epoch: the signal lands inside epoch 2
    long = TINY + BOTH + ["data.train_size=1024", "batch_size=32", "epochs=2", f"hydra.run.dir={run}"]
    proc = subprocess.Popen([command("resnet-train"), *long], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((run / "metrics.jsonl").is_file() and rows(run)):
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err  # stopped mid-run, not finished
    state = json.loads((run / "trackers.json").read_text())
    run_cli("resnet-train", f"resume={run}", cwd=tmp_path, check=True)
    assert json.loads((run / "trackers.json").read_text()) == state
    table, acc = rows(run), events(run)
    assert [r["epoch"] for r in table] == [1, 2]
    for key in ("train_loss", "test_acc"):
        got = scalars(acc, f"epoch/{key}")
        assert [s for s, _ in got] == [32, 64] and [v for _, v in got] == pytest.approx(
            [r[key] for r in table], rel=1e-6)
    steps = [s for s, _ in scalars(acc, "step/train_loss")]
    assert steps == list(range(EVERY, 65, EVERY))  # each point once, none lost at the stop
    client, run_id = mlflow_client(run)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert mlflow_history(client, run_id, "test_acc") == [(r["epoch"], r["test_acc"]) for r in table]


def test_resume_from_another_folder_goes_on_in_the_same_mlflow_run(tmp_path):
    """The default tracking_uri is relative (outputs/mlruns); a resume started in another folder
    still means the store the run began with, not a new one beside that folder."""
    first, elsewhere = tmp_path / "first", tmp_path / "elsewhere"
    first.mkdir(), elsewhere.mkdir()
    run = first / "run"
    run_cli("resnet-train", *TINY, "epochs=1", "logger=mlflow", f"hydra.run.dir={run}", cwd=first, check=True)
    state = json.loads((run / "trackers.json").read_text())
    assert state["mlflow"]["tracking_uri"] == (first / "outputs" / "mlruns").as_uri()
    proc = run_cli("resnet-train", f"resume={run}", "epochs=2", cwd=elsewhere, check=True)
    assert "mlflow: continuing run" in proc.stdout
    assert json.loads((run / "trackers.json").read_text()) == state
    assert not (elsewhere / "outputs").exists()
    client, run_id = mlflow_client(run)
    assert mlflow_history(client, run_id, "test_acc") == [(r["epoch"], r["test_acc"]) for r in rows(run)]


def test_a_tracker_failing_at_the_end_does_not_fail_a_finished_run(tmp_path, caplog):
    """results.json is written before the final logging; if the store then refuses (here the
    MLflow run was deleted meanwhile), the run stays finished and says so in one warning."""
    import logging

    from mlflow.tracking import MlflowClient

    from resnet_cli.trackers import Trackers

    uri = (tmp_path / "mlruns").as_uri()
    cfg = {"model": {"name": "resnet20"}, "data": {"name": "synthetic"}, "resume": None}
    logger = {"mlflow": {"tracking_uri": uri, "experiment_name": "e", "run_name": "r", "log_checkpoint": False}}
    row = {"epoch": 1, "train_loss": 1.0, "test_acc": 0.5}
    results = {"epochs": 1, "final": row, "best_test_acc": 0.5}
    with caplog.at_level(logging.WARNING, logger="resnet_cli"):
        with Trackers(logger, tmp_path) as trackers:
            trackers.start(cfg, steps_per_epoch=4, global_step=0, running=None, device="cpu")
            trackers.log_epoch(row)
            with file_store_allowed(uri):
                MlflowClient(uri).delete_run(trackers.mlflow.run_id)
            trackers.log_results(cfg, results)  # does not raise
    warnings = [r.getMessage() for r in caplog.records]
    assert any(w.startswith("could not log the final results to the trackers (MlflowException") and
               f"complete in {tmp_path}" in w for w in warnings), warnings


def test_a_branch_goes_into_the_experiment_of_the_run_it_branches_from(tmp_path):
    """A sweep job's run lives in the sweep's experiment; resumed alone from an older checkpoint
    (its config now names the default experiment) the new nested run still goes beside it."""
    from mlflow.tracking import MlflowClient

    from resnet_cli.trackers import Mlflow

    uri = (tmp_path / "mlruns").as_uri()
    with file_store_allowed(uri):
        client = MlflowClient(uri)
        sweep_experiment = client.create_experiment("multirun/2026-11-29/10-00-00")
        parent = client.create_run(sweep_experiment).info.run_id
        for epoch in (1, 2):
            client.log_metric(parent, "test_acc", 0.5, step=epoch)
    ml_cfg = {"tracking_uri": uri, "experiment_name": "resnet-cli", "run_name": "run"}
    child = Mlflow.start(ml_cfg, {"tracking_uri": uri, "run_id": parent, "tracking_uri_given": uri}, {"lr": 0.1},
                         {}, epoch=1)
    with file_store_allowed(uri):
        run = client.get_run(child.run_id)
    assert child.run_id != parent and run.data.tags["mlflow.parentRunId"] == parent
    assert run.info.experiment_id == sweep_experiment


@pytest.mark.slow
def test_a_multirun_is_one_experiment_with_one_run_per_job(tmp_path):
    uri = tmp_path / "mlruns"
    proc = run_cli("resnet-train", "-m", *TINY, "epochs=1", "logger=mlflow", f"logger.mlflow.tracking_uri={uri}",
                   "lr=0.05,0.1", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, check=True)
    client, _ = mlflow_client(tmp_path / "sweep" / "0")
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
    assert experiment.name == str(tmp_path / "sweep")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(Path(r.data.tags["run_dir"]).name for r in runs) == ["0", "1"], proc.stdout
    for r in runs:  # named by the job's overrides (Hydra's override_dirname)
        job = Path(r.data.tags["run_dir"])
        assert f"lr={'0.05' if job.name == '0' else '0.1'}" in r.info.run_name.split(",")
        assert mlflow_history(client, r.info.run_id, "test_acc") == [(1, rows(job)[0]["test_acc"])]


@pytest.mark.slow
def test_only_rank_0_logs_under_ddp(tmp_path):
    from test_ddp import torchrun

    torchrun(*TINY, "trainer.device=cpu", "epochs=1", *BOTH, f"logger.mlflow.tracking_uri={tmp_path / 'mlruns'}",
             cwd=tmp_path)
    (run,) = [p for p in tmp_path.glob("outputs/*/*") if p.is_dir()]
    assert len(list((run / "tb").iterdir())) == 1  # one event file: one writer
    client, run_id = mlflow_client(run)
    (experiment,) = [e for e in client.search_experiments() if e.name == "resnet-cli"]
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    # 128 images per rank: 2 steps per epoch, rank 0's points only
    assert [s for s, _ in scalars(events(run), "step/train_loss")] == [2]


# ---------------------------------------------------------------- refused before anything runs

@pytest.mark.parametrize("name", ["tensorboard", "mlflow"])
def test_a_missing_library_names_the_extra(name, monkeypatch, capsys, tmp_path):
    from resnet_cli.train import main

    # None in sys.modules is how Python marks a module as not importable (importlib's own rule)
    monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError, match=rf"pip install 'resnet-cli\[{name}\]'"):
        check({name: {"log_every_n_steps": 1, "flush_secs": 1, "tracking_uri": str(tmp_path)}})
    monkeypatch.chdir(tmp_path)
    code, out, err = call_main(main, "resnet-train", ["data=synthetic", f"logger={name}"], monkeypatch, capsys)
    assert_one_error_line(code, err, f"logger={name}: the {name} package is not installed",
                          f"pip install 'resnet-cli[{name}]'")
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("override,needle", [
    ("logger.mlflow.tracking_uri=/etc/hostname/mlruns", "cannot write there (/etc/hostname is not a folder)"),
    ("logger.mlflow.tracking_uri=file:///etc/hostname/mlruns", "cannot write there (/etc/hostname is not a folder)"),
])
def test_an_unwritable_tracking_uri_is_refused(override, needle, tmp_path):
    proc = run_cli("resnet-train", "data=synthetic", "logger=many", override, cwd=tmp_path)
    assert_one_error_line(proc.returncode, proc.stderr, override, needle)
    assert not (tmp_path / "outputs").exists()


def test_log_every_must_be_positive():
    with pytest.raises(ConfigError, match=r"logger.tensorboard.log_every_n_steps=0: must be >= 1"):
        check({"tensorboard": {"log_every_n_steps": 0, "flush_secs": 30}})


def test_a_tracker_that_cannot_start_is_one_line_naming_the_logger():
    """A library's own error (many lines, its own type) becomes a ConfigError: the logger, where, the first line."""
    from resnet_cli.trackers import _cannot_log

    with pytest.raises(ConfigError) as info:
        with _cannot_log("mlflow", "http://tracker:5000"):
            raise OSError("connection refused\n  retried 5 times\n  giving up")
    assert str(info.value) == "logger=mlflow: cannot log to http://tracker:5000 (OSError: connection refused)"
    with pytest.raises(ConfigError, match="^logger.tensorboard.flush_secs"):  # our own refusals pass unchanged
        with _cannot_log("tensorboard", "tb"):
            raise ConfigError("logger.tensorboard.flush_secs=0: must be >= 1")


def test_a_tracking_server_that_does_not_answer_is_refused_at_once(tmp_path, monkeypatch):
    """MLflow's client retries for minutes, deaf to Ctrl-C, before the first step."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    override = f"logger.mlflow.tracking_uri=http://127.0.0.1:{port}"
    proc = run_cli("resnet-train", "data=synthetic", "logger=mlflow", override, cwd=tmp_path, timeout=120)
    assert_one_error_line(proc.returncode, proc.stderr, override, "no server answers there (Connection refused)")
    assert not (tmp_path / "outputs").exists()
