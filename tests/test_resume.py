"""Never lose a run: exact resume after a real SIGINT, atomic writes, non-finite losses,
bad checkpoints, unwritable folders, and one-line errors for bad command lines."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from resnet_cli import checkpoint as ckpt_mod
from resnet_cli.checkpoint import CheckpointError, OutputError, load_checkpoint, save_checkpoint

from conftest import call_main, command, run_cli

# 32 steps per epoch: long enough for a signal to land mid-epoch. With augmentation, so that
# exact resume also covers the per-step reseeding of crops and flips (issue 11).
TINY = ["data=synthetic", "data.train_size=512", "data.test_size=64", "batch_size=16", "model=resnet20",
        "model.layers=[1,1,1]", "trainer.progress=plain", "epochs=3", "trainer.eval_batch_size=64",
        "data.augment=standard"]
# The DataLoader path, with persistent worker processes.
LOADER = ["data.pipeline=loader", "data.num_workers=2"]
TIMING = {"epoch_time_s", "train_images_per_s", "eval_time_s", "elapsed_s"}


def only_run(root: Path) -> Path:
    (run,) = [p.parent for p in root.glob("outputs/*/*/.hydra")]
    return run


def untimed(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("straight")
    run_cli("resnet-train", *TINY, cwd=cwd, check=True)
    return only_run(cwd)


@pytest.fixture(scope="module")
def uninterrupted_loader(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("straight-loader")
    run_cli("resnet-train", *TINY, *LOADER, cwd=cwd, check=True)
    return only_run(cwd)


def _step_reached(cwd: Path, epoch: int, step: int) -> bool:
    """Whether the run's mid-epoch checkpoint shows it is past (epoch, step)."""
    for ckpt in cwd.glob("outputs/*/*/checkpoints/last.pt"):
        try:
            state = torch.load(ckpt, weights_only=True)
        except Exception:  # being replaced right now
            return False
        return (state["epoch"] + 1, state["step"]) >= (epoch, step) or state["epoch"] >= epoch
    return False


def _interrupt(cwd: Path, sig: int, epoch: int, step: int, extra: list[str]) -> subprocess.CompletedProcess:
    # Checkpoints every 4 steps show where the run is; the signal lands right after (epoch,
    # step), with at least one more epoch to go: the run cannot finish first.
    proc = subprocess.Popen([command("resnet-train"), *TINY, *extra, "trainer.checkpoint_every_steps=4"], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not _step_reached(cwd, epoch, step):
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("sig,code,epoch,step,pipeline", [
    (signal.SIGINT, 130, 2, 8, "memory"),   # during epoch 2
    (signal.SIGTERM, 143, 1, 4, "memory"),  # during epoch 1
    (signal.SIGINT, 130, 1, 12, "loader"),  # DataLoader with persistent workers
])
def test_interrupt_then_resume_equals_an_uninterrupted_run(request, tmp_path, sig, code, epoch, step, pipeline):
    extra = LOADER if pipeline == "loader" else []
    straight = request.getfixturevalue("uninterrupted_loader" if pipeline == "loader" else "uninterrupted")
    proc = _interrupt(tmp_path, sig, epoch, step, extra)
    run = only_run(tmp_path)
    assert proc.returncode == code, proc.stderr  # a run that ended before the signal fails the test
    assert f"resume with: resnet-train resume={run}" in proc.stderr
    assert (run / "checkpoints" / "last.pt").is_file()
    assert (run / "curves.png").is_file() or not untimed(run)  # drawn on the interrupt
    done = len(untimed(run))
    assert done < 3

    resumed = run_cli("resnet-train", f"resume={run}", cwd=tmp_path, check=True)
    # the resume names the point the stop message named (epoch counted from 1, steps done in it)
    stopped = re.search(r"stopped at epoch (\d+), step (\d+/\d+)", proc.stdout)
    assert stopped and f"resumed at epoch {stopped[1]}, step {stopped[2]}" in resumed.stdout, resumed.stdout
    assert untimed(run) == untimed(straight)
    a, b = weights(run), weights(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the log was appended to, not replaced
    log = (run / "train.log").read_text()
    assert "stopping after this step" in log and "resumed at epoch" in log
    # the run's original record is kept
    assert "resume=" not in (run / ".hydra" / "overrides.yaml").read_text()


def test_resume_with_a_different_model_names_the_difference(uninterrupted, tmp_path):
    before = (uninterrupted / "metrics.jsonl").read_bytes()
    proc = run_cli("resnet-train", f"resume={uninterrupted}", "model=resnet32", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: model.") and "differs from the checkpoint" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert (uninterrupted / "metrics.jsonl").read_bytes() == before


def test_a_checkpoint_from_before_a_key_existed_resumes_as_its_default():
    from omegaconf import OmegaConf

    from resnet_cli.cli import compose
    from resnet_cli.config import ConfigError
    from resnet_cli.resume import check_compatible as check_resume_compatible

    now = OmegaConf.to_container(compose("train", []), resolve=True)
    then = json.loads(json.dumps(now))
    del then["data"]["erase_prob"]  # keys added since: they ran as their defaults
    del then["trainer"]["prefetch"]
    then["trainer"]["tta_hflip"] = False  # a bool before `auto` existed
    now["trainer"]["tta_hflip"] = "false"  # a command-line false
    check_resume_compatible(now, then, Path("last.pt"))
    now["trainer"]["prefetch"] = False  # how batches are made, not which: may change
    check_resume_compatible(now, then, Path("last.pt"))
    for key, value, needle in [("tta_hflip", "auto", "trainer.tta_hflip=auto: differs from the checkpoint being "
                                "resumed (last.pt: trainer.tta_hflip=False)"),
                               ("erase_prob", 0.25, "data.erase_prob=0.25: differs from the checkpoint being "
                                "resumed (last.pt: data.erase_prob=0.0)")]:
        changed = json.loads(json.dumps(now))
        changed["trainer" if key == "tta_hflip" else "data"][key] = value
        with pytest.raises(ConfigError, match=re.escape(needle)):
            check_resume_compatible(changed, then, Path("last.pt"))


def test_a_changed_default_keeps_the_checkpoints_value_unless_typed():
    from omegaconf import OmegaConf

    from resnet_cli.cli import compose
    from resnet_cli.resume import UNSET, kept_from_checkpoint, override_text

    now = OmegaConf.to_container(compose("train", []), resolve=True)
    then = json.loads(json.dumps(now))
    then["trainer"]["tta_hflip"] = False  # the default before `auto`
    then["trainer"]["label_smoothing"] = 0.05  # as if that default had changed too
    kept = kept_from_checkpoint(now, then, typed=["lr"])
    assert kept == [("trainer.label_smoothing", 0.05, now["trainer"]["label_smoothing"]),
                    ("trainer.tta_hflip", False, "auto")]
    older = json.loads(json.dumps(then))
    del older["trainer"]["tta_hflip"]  # before the key existed: no TTA
    del older["scheduler"]["max_warmup_fraction"]  # added to the preset since: left unset (no cap)
    kept = kept_from_checkpoint(now, older, typed=[])
    assert [(k, o) for k, o, _ in kept] == [("scheduler.max_warmup_fraction", UNSET),
                                            ("trainer.label_smoothing", 0.05), ("trainer.tta_hflip", False)]
    assert [override_text(k, o) for k, o, _ in kept] == ["~scheduler.max_warmup_fraction",
                                                         "trainer.label_smoothing=0.05", "trainer.tta_hflip=false"]
    from resnet_cli.config import ConfigError
    from resnet_cli.resume import check_compatible

    with pytest.raises(ConfigError, match=re.escape("scheduler.max_warmup_fraction=0.1: the checkpoint being resumed "
                                                    "(last.pt) ran without this key; resume with "
                                                    "~scheduler.max_warmup_fraction")):
        check_compatible(now, older, Path("last.pt"))
    # typed now: the user's value stands (and check_compatible refuses it)
    assert [k for k, _, _ in kept_from_checkpoint(now, then, typed=["trainer.tta_hflip"])] == [
        "trainer.label_smoothing"]
    assert kept_from_checkpoint(now, then, typed=["trainer"]) == []
    assert kept_from_checkpoint(now, then, typed=["experiment"]) == []  # a recipe may set anything


@pytest.mark.parametrize("value", [None, True, False, 3, 0.1, 1e-05, "auto", "true", "10", "it's", "a\\b",
                                   "ends\\", "q\\'", "${lr}", "a\\${x}", "\\\\${", "\\'${a}'\\", "a\\\n",
                                   [1, "b", None], [0.5, [2, 3]]])
def test_override_text_reads_back_as_the_value(value):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from resnet_cli.resume import override_text

    parsed = OverridesParser.create().parse_overrides([override_text("a", value)])[0].value()
    cfg = OmegaConf.create({"a": parsed})
    assert OmegaConf.to_container(cfg, resolve=True)["a"] == value


@pytest.mark.parametrize("new,shown", [(True, "true"), ([2, 2], "[2,2]"), (None, "null"), ("auto", "auto"),
                                       (0.1, "0.1")])
def test_kept_line_shows_the_default_as_typed(new, shown):
    from resnet_cli.resume import UNSET, kept_line

    assert kept_line("a.b", False, new) == f"a.b=false: kept from the checkpoint (the default is {shown} now)"
    assert kept_line("a.b", UNSET, new) == f"a.b: left unset, as in the checkpoint (the default is {shown} now)"


def test_resume_of_a_run_from_before_a_default_changed(uninterrupted, tmp_path):
    import shutil

    run = tmp_path / "old"
    shutil.copytree(uninterrupted, run)
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    default = state["config"]["trainer"]["label_smoothing"]
    state["config"]["trainer"]["label_smoothing"] = 0.05  # as if written when the default was 0.05
    del state["config"]["trainer"]["prefetch"]  # nor did this key exist
    del state["config"]["scheduler"]["max_warmup_fraction"]  # nor this one of the cosine preset
    save_checkpoint(last, state)
    # scheduler=cosine typed again: the option the run had, so nothing the user changed
    proc = run_cli("resnet-train", f"resume={run}", "epochs=4", "scheduler=cosine", cwd=tmp_path, check=True)
    assert proc.stderr == ("scheduler.max_warmup_fraction: left unset, as in the checkpoint (the default is 0.1 now)\n"
                           f"trainer.label_smoothing=0.05: kept from the checkpoint (the default is {default} now)\n")
    config = load_checkpoint(last)["config"]
    assert config["trainer"]["label_smoothing"] == 0.05 and "max_warmup_fraction" not in config["scheduler"]
    assert [r["epoch"] for r in untimed(run)] == [1, 2, 3, 4]
    # typed on the command line, the new value is refused: the run's first epochs trained without it
    proc = run_cli("resnet-train", f"resume={run}", "epochs=5", f"trainer.label_smoothing={default}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: trainer.label_smoothing={default}: differs from the checkpoint")


def test_a_primary_config_of_the_users_is_the_one_validated(tmp_path):
    # --config-dir with --config-name: the user's own file, built on train.yaml, is checked
    # before anything runs (not train.yaml in its place).
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "mine.yaml").write_text("defaults:\n  - train\n  - _self_\nepochs: 0\n")
    proc = run_cli("resnet-train", "--config-dir", "conf", "--config-name", "mine", "data=synthetic", cwd=tmp_path)
    _assert_refused(proc.returncode, proc.stdout, proc.stderr, "epochs=0: must be >= 1", tmp_path)


def test_a_primary_config_of_the_users_names_the_folders(tmp_path):
    # Its hydra.run.dir is the folder checked: a second new run there is refused, resume= goes
    # on in it; a sweep goes to its hydra.sweep.dir, and a second sweep there is refused.
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "mine.yaml").write_text(
        "defaults:\n  - train\n  - _self_\nhydra:\n  run:\n    dir: runs/fixed\n"
        "  sweep:\n    dir: sweeps/mine\n")
    mine = ["--config-dir", "conf", "--config-name", "mine"]
    run = tmp_path / "runs" / "fixed"
    run_cli("resnet-train", *mine, *TINY, "epochs=1", cwd=tmp_path, check=True)
    before = (run / "metrics.jsonl").read_text()
    proc = run_cli("resnet-train", *mine, *TINY, "epochs=1", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith(
        "error: hydra.run.dir=runs/fixed: holds a run already (checkpoints/last.pt)"), proc.stderr
    assert (run / "metrics.jsonl").read_text() == before
    run_cli("resnet-train", f"resume={run}", "epochs=2", cwd=tmp_path, check=True)
    assert [r["epoch"] for r in untimed(run)] == [1, 2]

    sweep = ["-m", *mine, *TINY, "epochs=1", "seed=0,1"]
    run_cli("resnet-train", *sweep, cwd=tmp_path, check=True)
    assert (tmp_path / "sweeps" / "mine" / "summary.csv").is_file()
    rows = {p: p.read_text() for p in (tmp_path / "sweeps" / "mine").glob("*/metrics.jsonl")}
    assert len(rows) == 2
    proc = run_cli("resnet-train", *sweep, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith(
        "error: hydra.sweep.dir=sweeps/mine: holds a sweep's jobs already (0/checkpoints/last.pt)"), proc.stderr
    assert {p: p.read_text() for p in rows} == rows


def test_resume_alone_continues_a_run_made_from_the_users_configs(tmp_path):
    # --config-dir and --config-name come from the run's .hydra record: resume=DIR is enough.
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "tiny.yaml").write_text("defaults:\n  - resnet20\n  - _self_\nlayers: [1, 1, 1]\n")
    (tmp_path / "conf" / "mine.yaml").write_text("defaults:\n  - train\n  - _self_\nepochs: 1\n")
    tiny = [o for o in TINY if not o.startswith(("model", "epochs"))]
    run_cli("resnet-train", "--config-dir", "conf", "--config-name", "mine", "model=tiny", *tiny, cwd=tmp_path,
            check=True)
    run = only_run(tmp_path)
    run_cli("resnet-train", f"resume={run}", "epochs=2", cwd=tmp_path, check=True)
    assert [r["epoch"] for r in untimed(run)] == [1, 2]
    (tmp_path / "conf").rename(tmp_path / "moved")
    proc = run_cli("resnet-train", f"resume={run}", "epochs=3", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: resume={run}: the run read configs from {tmp_path / 'conf'} (--config-dir)")
    # as the message says: the new folder alone (the config's name still comes from the record)
    proc = run_cli("resnet-train", "--config-dir", "moved", f"resume={run}", "epochs=3", cwd=tmp_path, check=True)
    assert [r["epoch"] for r in untimed(run)] == [1, 2, 3] and "kept from the checkpoint" not in proc.stderr
    # Resumed again without epochs=: the run's length is its checkpoint's 3 (its recorded
    # overrides still say 1), so the finished run just ends, its results.json untouched.
    results = (run / "results.json").read_text()
    proc = run_cli("resnet-train", "--config-dir", "moved", f"resume={run}", cwd=tmp_path, check=True)
    assert "nothing left to train: the run has done its 3 epochs" in proc.stdout
    assert [r["epoch"] for r in untimed(run)] == [1, 2, 3] and (run / "results.json").read_text() == results


def test_a_run_without_its_hydra_record_resumes_only_as_it_was(uninterrupted, tmp_path):
    # No .hydra/overrides.yaml (hydra.output_subdir=null): the command line cannot rebuild the
    # run's config, and what differs from today's defaults is refused, not silently adopted.
    import shutil

    run = tmp_path / "bare"
    shutil.copytree(uninterrupted, run)
    shutil.rmtree(run / ".hydra")
    proc = run_cli("resnet-train", f"resume={run}", "data=synthetic", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: batch_size=256: differs from the checkpoint being resumed")
    run_cli("resnet-train", f"resume={run}", *TINY, "epochs=4", cwd=tmp_path, check=True)
    assert [r["epoch"] for r in untimed(run)] == [1, 2, 3, 4]


def test_only_numbered_job_folders_block_a_sweep(tmp_path):
    from resnet_cli.cli import check_output_folder

    (tmp_path / "sw" / "seed=0").mkdir(parents=True)
    (tmp_path / "sw" / "seed=0" / "metrics.jsonl").write_text("{}\n")
    named = ["hydra.sweep.dir=" + str(tmp_path / "sw"), "hydra.sweep.subdir=${hydra.job.override_dirname}",
             "seed=1,2", "data=synthetic"]
    assert check_output_folder(named, True) == str(tmp_path / "sw")  # new jobs go to seed=1, seed=2
    assert check_output_folder(named[:1] + named[2:], True) == str(tmp_path / "sw")  # numbered: 0, 1 are free


def test_resume_may_extend_epochs(uninterrupted, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(uninterrupted, run)
    run_cli("resnet-train", f"resume={run}", "epochs=4", cwd=tmp_path, check=True)
    rows = untimed(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[:3] == untimed(uninterrupted)
    # the run's wall time spans both processes, on the clock of metrics' elapsed_s
    wall = json.loads((run / "results.json").read_text())["wall_time_s"]
    assert wall > json.loads((uninterrupted / "results.json").read_text())["wall_time_s"]
    assert wall >= json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["elapsed_s"]
    proc = run_cli("resnet-train", f"resume={run}", "epochs=2", cwd=tmp_path)  # shorter than done
    assert proc.returncode == 2 and proc.stderr == (
        "error: epochs=2: the run being resumed has done 4 epochs already; give epochs >= 4, or start a new run\n")
    assert untimed(run) == rows


def test_resume_from_an_earlier_checkpoint_says_what_it_replaces(uninterrupted, tmp_path):
    # A rewind (resume=RUN/checkpoints/best.pt after the run went further) is allowed, as the
    # trackers expect (docs/integrations.md), and says in one line what it replaces.
    import shutil

    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    state["epoch"], state["history"] = 1, state["history"][:1]  # as best.pt of epoch 1 would be
    save_checkpoint(run / "checkpoints" / "best.pt", state)
    damaged = tmp_path / "damaged"  # a damaged last.pt is nothing to replace
    shutil.copytree(run, damaged)
    (damaged / "checkpoints" / "last.pt").write_bytes(b"garbage")
    proc = run_cli("resnet-train", f"resume={damaged / 'checkpoints' / 'best.pt'}", cwd=tmp_path, check=True)
    assert "rewinds" not in proc.stderr and [r["epoch"] for r in untimed(damaged)] == [1, 2, 3]
    proc = run_cli("resnet-train", f"resume={run / 'checkpoints' / 'best.pt'}", cwd=tmp_path, check=True)
    assert proc.stderr == (f"resume={run / 'checkpoints' / 'best.pt'}: rewinds the run from epoch 3 step 0 (last.pt) "
                           "to epoch 1 step 0; last.pt and the later rows of metrics.jsonl will be replaced (copy the "
                           "run folder first to keep them)\n")
    assert [r["epoch"] for r in untimed(run)] == [1, 2, 3]


@pytest.mark.parametrize("content,needle", [
    (b"this is not a checkpoint", "cannot be read"),
    ("truncated", "cannot be read"),
    ("foreign", "refused for safety"),
    ("plain", "not a resnet-cli checkpoint"),
    ("no data config", "incomplete (no 'data' in its config)"),
])
def test_bad_checkpoints_are_refused_in_one_line(uninterrupted, tmp_path, content, needle):
    path = tmp_path / "bad.pt"
    if content == "truncated":
        data = (uninterrupted / "checkpoints" / "last.pt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif content == "foreign":
        import datetime

        torch.save({"model": datetime.datetime.now()}, path)  # a pickled class, not plain data
    elif content == "plain":
        torch.save({"weights": torch.zeros(3)}, path)
    elif content == "no data config":  # tagged as ours, but its config was cut down
        state = torch.load(uninterrupted / "checkpoints" / "last.pt", weights_only=True)
        del state["config"]["data"]
        torch.save(state, path)
    else:
        path.write_bytes(content)
    before = path.read_bytes()
    proc = run_cli("resnet-train", f"resume={path}", "data=synthetic", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: checkpoint {path}") and needle in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert path.read_bytes() == before
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_atomic_save_survives_a_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "config": {"model": {}, "data": {}}, "epoch": 1})

    def crash(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.os, "fsync", crash)
    with pytest.raises(OutputError, match="No space left on device.*previous one is intact"):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "config": {"model": {}, "data": {}}, "epoch": 2})
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_non_finite_loss_stops_with_a_useful_message(tmp_path):
    proc = run_cli("resnet-train", *TINY, "lr=1e6", "scheduler=none", "trainer.precision=fp32",
                   "trainer.checkpoint_every_steps=1", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and " became nan at epoch 1, step" in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert "lower lr" in proc.stderr and "Traceback" not in proc.stderr
    run = only_run(tmp_path)
    # the reason is in the run's log too, not only on a terminal that may be gone; once on stdout+stderr
    assert (run / "train.log").read_text().splitlines()[-1].endswith(proc.stderr.strip())
    assert " became nan " not in proc.stdout
    state = load_checkpoint(run / "checkpoints" / "last.pt")  # the last good step, intact
    assert state["step"] >= 1 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_skip_nonfinite_skips_bad_steps_without_a_trace():
    from torch import nn

    from resnet_cli.engine import StepContext, train_one_epoch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    good = [(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))) for _ in range(3)]
    bad = (torch.full((8, 1, 8, 8), float("nan")), torch.zeros(8, dtype=torch.int64))
    ctx = StepContext(opt, None, nn.CrossEntropyLoss(), torch.device("cpu"), "fp32", skip_nonfinite=True,
                      channels_last=False)
    run = train_one_epoch(model, [good[0], bad, good[1], bad, good[2]], ctx, epoch=1)
    assert run.skipped == 2 and run.steps == 5 and run.counted == 24
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())

    ctx.skip_nonfinite = False
    from resnet_cli.engine import NonFiniteLoss

    with pytest.raises(NonFiniteLoss, match="epoch 2, step 2"):
        train_one_epoch(model, [good[0], bad], ctx, epoch=2)


def test_unwritable_output_folder_is_refused_before_running(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = run_cli("resnet-train", "data=synthetic", f"hydra.run.dir={blocker}/run", cwd=tmp_path)
    assert proc.returncode == 2 and "cannot create the run folder" in proc.stderr
    assert proc.stderr.count("\n") == 1 and blocker.read_text() == "x"


BAD_COMMAND_LINES = [
    (["lr=0"], "lr=0"),
    (["lr=-0.1"], "lr=-0.1"),
    (["lr=fast"], "lr=fast"),
    (["epochs=0"], "epochs=0"),
    (["epochs=1.5"], "epochs=1.5"),
    (["batch_size=0"], "batch_size=0"),
    (["lrr=0.1"], "did you mean lr"),
    (["trainer.precison=bf16"], "trainer.precison"),
    (["model=resnet19"], "choose from"),
    (["data=imagenet"], "unknown option for data"),
    (["optimizer=lamb"], "unknown option for optimizer"),
    (["data.limit_train=0"], "data.limit_train=0"),
    (["data.limit_test=-5"], "data.limit_test=-5"),
    (["optimizer.momentum=1.0"], "optimizer.momentum=1.0"),
    (["trainer.label_smoothing=1.0"], "trainer.label_smoothing=1.0"),
    (["trainer.precision=fp8"], "choose from auto, fp32, bf16, fp16"),
    (["trainer.device=cuda"], "CUDA is not available"),
    (["trainer.device=tpu"], "trainer.device=tpu"),
    (["model.block=fancy"], "model.block=fancy"),
    (["model.layers=[2,2,2]"], "model.layers has 3 stages"),
    (["data.augment=heavy"], "data.augment=heavy"),
    (["data=fashion_mnist", "data.download=false", "data.root=/does/not/exist"], "data.root=/does/not/exist"),
    (["resume=/no/such/run"], "resume=/no/such/run"),
    (["scheduler.warmup_epochs=20"], "scheduler.warmup_epochs=20"),
    (["optimizer.momentum=fast"], "optimizer.momentum=fast: must be a number"),
    (["+optimizer.momentun=0.9"], "did you mean optimizer.momentum"),
    (["scheduler.min_lr_ratio=-5"], "scheduler.min_lr_ratio=-5"),
    (["scheduler.warmup_start=abc"], "scheduler.warmup_start=abc"),
    (["optimizer=adamw", "optimizer.betas=[0.9,1.5]"], "optimizer.betas"),
    (["scheduler=step", "scheduler.milestones=[2]"], "scheduler.milestones"),
    (["hydra.run.dir=/proc/x"], "cannot create the run folder"),
    (["hydra.run.dir=/sys/x"], "cannot create the run folder"),
    (["--config-dir"], "--config-dir: give the folder of your configs"),
    (["-cd", "nope"], "-cd nope: not a folder"),
    (["--config-name", "nothere"], "--config-name nothere: no nothere.yaml in "),
    (["-cn", "eval"], "-cn eval: that is resnet-eval's config"),
    (["--config-name"], "--config-name: give a value"),
    (["data.num_classes=1"], "data.num_classes=1: must be >= 2"),
    (["data.channels=0"], "data.channels=0: must be >= 1"),
    (["data.resize=0"], "data.resize=0: must be >= 1 (or null for the native size)"),
    (["model.freeze=stem"], "model.freeze=stem: give a list, e.g. model.freeze=[stem]"),
    (["data.train_size=0"], "data.train_size=0: must be >= 1"),
    (["data.test_size=0"], "data.test_size=0: must be >= 1"),
    (["epochs=3", "epochs=abc"], "epochs=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    (["optimizer.momentun=0.9"], "optimizer.momentun: unknown key; did you mean optimizer.momentum? "
                                 "(a new argument for optimizer's _target_ is given as +optimizer.momentun=VALUE)"),
    (["+optimizer.dampening=0.5"], "optimizer.dampening=0.5: must be 0 with optimizer.nesterov=true"),
    # a key of another option: that option is named, not the same key again
    (["scheduler=none", "scheduler.warmup_epochs=1"],
     "scheduler.warmup_epochs: unknown key of scheduler=none (it takes no keys); scheduler=cosine, step have it"),
    (["optimizer=adamw", "optimizer.momentum=0.9"], "optimizer.momentum: unknown key of optimizer=adamw (its keys: lr, "
                                                    "betas, weight_decay, decay_norm_bias); optimizer=sgd has it"),
    (["experiment=d2l", "scheduler.warmup_epochs=1"], "unknown key of scheduler=none (it takes no keys)"),
    # ... and added with +, it would be ignored where nothing is built
    (["scheduler=none", "+scheduler.warmup_epochs=1"], "scheduler.warmup_epochs: this scheduler builds nothing"),
    # asking to see the config checks the overrides too (Hydra answered with a traceback)
    (["--cfg", "job", "lrr=1"], "lrr: unknown key; did you mean lr?"),
    (["--help", "model=resnet99"], "model=resnet99: unknown option for model"),
    (["--cfg", "job", "-m", "lr=0.1,0.2"], "--cfg: shows one run's config, not a sweep's"),
    (["--hydra-help", "-m", "lr=0.1,0.2"], "--hydra-help: composes one config, not a sweep's"),
    (["data.mean=[0.5]"], "data.mean=[0.5]: set data.mean and data.std together"),
    (["data=imagefolder", "data.channels=4"], "data.channels=4: choose 1 (grayscale) or 3 (RGB) for imagefolder"),
    (["model=plain20", "model.zero_init_residual=true"], "model.zero_init_residual=True: needs model.residual=true"),
    # BatchNorm cannot train on one value per channel (a traceback from the first step)
    (["batch_size=1", "model=resnet18"], "batch_size=1: at input size 28 resnet18's layer4 output is 1x1, and "
                                         "BatchNorm needs more than one value per channel to train"),
    (["-m", "lr=0.1,-1"], "lr=-1"),
]


def _assert_refused(code: int, out: str, err: str, needle: str, cwd: Path) -> None:
    assert code == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert needle in err, err
    assert "Traceback" not in err + out
    assert not (cwd / "outputs").exists() and not (cwd / "multirun").exists()


@pytest.mark.parametrize("args,needle", BAD_COMMAND_LINES, ids=[" ".join(a) for a, _ in BAD_COMMAND_LINES])
def test_bad_command_lines_fail_in_one_line(tmp_path, monkeypatch, capfd, args, needle):
    """resnet-train's main() in this process: the same code as the console script, without
    paying a Python and torch start-up per case (the cases below run the script itself)."""
    from resnet_cli.train import main

    prefix = [] if any(a.startswith("data=") for a in args) else ["data=synthetic"]
    monkeypatch.chdir(tmp_path)
    code, out, err = call_main(main, "resnet-train", [*prefix, *args], monkeypatch, capfd)
    _assert_refused(code, out, err, needle, tmp_path)


@pytest.mark.parametrize("launcher,args,needle", [
    ("hydra_plugins.hydra_submitit_launcher", ["hydra/launcher=slurm_gpu"],
     "hydra/launcher=slurm_gpu: no Slurm on this machine (srun is not on PATH)"),
    ("hydra_plugins.hydra_joblib_launcher", ["hydra/launcher=joblib", "hydra.launcher.n_jobs=0"],
     "hydra.launcher.n_jobs=0: give the number of jobs at once"),
])
def test_a_launcher_that_cannot_start_is_refused_before_the_sweep(tmp_path, monkeypatch, capfd, launcher, args,
                                                                 needle):
    """The launchers raise inside Hydra: a traceback, and a sweep folder left half made."""
    pytest.importorskip(launcher)
    from resnet_cli.train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun here, wherever the suite runs
    code, out, err = call_main(main, "resnet-train", ["-m", "data=synthetic", *args, "lr=0.1,0.2"], monkeypatch,
                               capfd)
    _assert_refused(code, out, err, needle, tmp_path)


@pytest.mark.parametrize("args,needle", [BAD_COMMAND_LINES[6], BAD_COMMAND_LINES[-1]], ids=["lrr", "multirun"])
def test_bad_command_lines_fail_in_one_line_from_the_installed_script(tmp_path, args, needle):
    proc = run_cli("resnet-train", "data=synthetic", *args, cwd=tmp_path, timeout=120)
    _assert_refused(proc.returncode, proc.stdout, proc.stderr, needle, tmp_path)


def test_full_error_shows_the_traceback_when_asked(tmp_path):
    proc = run_cli("resnet-train", "data=synthetic", "lr=0", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_a_cuda_run_saves_and_restores_its_own_gpus_random_state(monkeypatch):
    # Saving every visible GPU's state made a resume with fewer visible GPUs fail (IndexError in
    # set_rng_state_all); a run on cuda:1 keeps cuda:1's, and restores it to the GPU it resumes on.
    from resnet_cli.train import rng_state, set_rng_state

    states = {0: torch.tensor([0], dtype=torch.uint8), 1: torch.tensor([1], dtype=torch.uint8)}
    restored = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: states[device.index].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.__setitem__(device.index, s))
    saved = rng_state(torch.device("cuda", 1))
    assert torch.equal(saved["cuda_device"], states[1]) and "cuda" not in saved
    set_rng_state(saved, torch.device("cuda", 0))  # resumed where only one GPU is visible
    assert list(restored) == [0] and torch.equal(restored[0], states[1])
    restored.clear()
    older = {**saved, "cuda": [states[0], states[1]]}  # checkpoints before: one state per visible GPU
    del older["cuda_device"]
    set_rng_state(older, torch.device("cuda", 1))
    assert torch.equal(restored[1], states[1])
    restored.clear()
    set_rng_state(older, torch.device("cuda", 2))  # no saved state for that GPU: left as seeded
    set_rng_state(saved, torch.device("cpu"))
    assert not restored and "cuda_device" not in rng_state(torch.device("cpu"))


def test_resume_from_another_folder_finds_the_data_the_run_trained_on(tmp_path):
    """The recorded overrides hold data.root as typed (relative here; by default
    ${oc.env:RESNET_CLI_DATA,data}): resolved again in another folder or shell they would
    point elsewhere. The run goes on with the folder it trained on, unless data.root is typed."""
    from test_data import _image_folder

    _image_folder(tmp_path / "images", {"cat": 4, "dog": 4}, {"cat": 2, "dog": 2})
    run = tmp_path / "run"
    run_cli("resnet-train", "data=imagefolder", "data.root=images", "data.resize=16", "data.num_workers=0",
            "model=resnet20", "model.layers=[1,1,1]", "batch_size=4", "epochs=1", "trainer.progress=none",
            f"hydra.run.dir={run}", cwd=tmp_path, check=True)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["config"]["data"]["root"] == str(tmp_path / "images")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_cli("resnet-train", f"resume={run}", "epochs=2", cwd=elsewhere, check=True)
    assert [r["epoch"] for r in untimed(run)] == [1, 2]
    assert not (elsewhere / "images").exists()
    # typed, data.root is the user's: a folder that is not there is refused as usual
    proc = run_cli("resnet-train", f"resume={run}", "epochs=3", "data.root=images", cwd=elsewhere)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "images" in proc.stderr, proc.stderr
    assert [r["epoch"] for r in untimed(run)] == [1, 2]


def test_resume_takes_the_checkpoints_folder_for_its_run(tmp_path):
    from resnet_cli.checkpoint import resolve_resume

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"x")
    run = tmp_path / "run"
    assert resolve_resume(run / "checkpoints") == resolve_resume(run) == (run, run / "checkpoints" / "last.pt")


def test_a_single_run_is_refused_in_a_sweeps_folder(tmp_path):
    """Its checkpoints and results.json would sit beside the sweep's summary.csv."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    proc = run_cli("resnet-train", *TINY, f"hydra.run.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"hydra.run.dir={sweep}: is a sweep's folder (multirun.yaml)" in proc.stderr
    assert sorted(p.name for p in sweep.iterdir()) == ["multirun.yaml"]
