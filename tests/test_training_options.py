"""Training options of issue 13 at function level: the EMA of the weights, flip test-time
augmentation, comparable losses, the lr that an epoch used, time to accuracy, the CPU ETA hint."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnet_cli.engine import Running, StepContext, evaluate, train_one_epoch
from resnet_cli.train import _eta_hint, build_ema, eval_views_per_epoch, time_to_acc

CPU = torch.device("cpu")


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def batches(n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def test_ema_follows_every_step_and_averages_batchnorm_statistics():
    model = tiny_model()
    ema = build_ema(model, 0.75)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = StepContext(opt, None, nn.CrossEntropyLoss(), CPU, "fp32", channels_last=False, ema=ema, ema_source=model)
    expected = None
    for x, y in batches():
        train_one_epoch(model, [(x, y)], ctx, epoch=1)
        now = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        # the first update copies, then ema = 0.75 * ema + 0.25 * weights
        expected = now if expected is None else {k: 0.75 * expected[k] + 0.25 * now[k] for k in now}
    got = ema.module.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
    assert "1.running_mean" in expected  # BatchNorm statistics are averaged, not left at their init
    assert int(ema.n_averaged) == 4


def test_ema_equals_torchs_averaged_model_without_reading_the_device(monkeypatch):
    # AveragedModel.update_parameters reads its counter on the host (a GPU stall per step on
    # CUDA); EMA must compute the same numbers, integer buffers included, without such reads.
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from resnet_cli.ema import EMA

    model = tiny_model()
    ours, torchs = EMA(model, 0.75), AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.75), use_buffers=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = StepContext(opt, None, nn.CrossEntropyLoss(), CPU, "fp32", channels_last=False)

    def host_read(self):
        raise AssertionError("a tensor was read on the host during an EMA update")

    for i, (x, y) in enumerate(batches(5)):
        train_one_epoch(model, [(x, y)], ctx, epoch=1)
        torchs.update_parameters(model)
        with monkeypatch.context() as m:
            if i:  # the first update is torch's own (it copies)
                m.setattr(torch.Tensor, "__bool__", host_read)
            ours.update_parameters(model)
        if i == 2:  # a resume: a fresh EMA from the saved state goes on from there
            saved = ours.state_dict()
            ours = EMA(tiny_model(), 0.75)
            ours.load_state_dict(saved)
            assert ours.started
    a, b = ours.state_dict(), torchs.state_dict()
    assert list(a) == list(b) and any(not v.is_floating_point() for v in a.values())
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_flip_tta_averages_the_probabilities_of_an_image_and_its_mirror():
    model = tiny_model().eval()
    data = batches(2)
    plain = evaluate(model, data, CPU, "fp32", channels_last=False)
    tta = evaluate(model, data, CPU, "fp32", channels_last=False, tta_hflip=True)
    with torch.no_grad():
        x = torch.cat([b[0] for b in data])
        y = torch.cat([b[1] for b in data])
        probs = (model(x).softmax(1) + model(x.flip(3)).softmax(1)) / 2
    assert tta["top1"] == (probs.argmax(1) == y).float().mean().item()
    assert tta["loss"] == pytest.approx(F.nll_loss(probs.log(), y).item(), rel=1e-5)
    assert tta["loss"] != pytest.approx(plain["loss"])


def test_train_loss_is_plain_cross_entropy_even_with_label_smoothing():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the model stays as it is
    data = batches(3)
    ctx = StepContext(opt, None, nn.CrossEntropyLoss(label_smoothing=0.5), CPU, "fp32", channels_last=False)
    run = train_one_epoch(model, data, ctx, epoch=1)
    with torch.no_grad():
        plain = sum(F.cross_entropy(model(x), y).item() * len(y) for x, y in data) / 24
    assert run.loss_sum / run.counted == pytest.approx(plain, rel=1e-5)


def test_logged_lr_is_the_lr_of_the_epochs_last_step():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    ctx = StepContext(opt, sched, nn.CrossEntropyLoss(), CPU, "fp32", channels_last=False)
    run = train_one_epoch(model, batches(4), ctx, epoch=1)
    assert run.last_lr == pytest.approx(1 / 4)  # steps used 1, 1/2, 1/3, 1/4; the next one 1/5
    assert opt.param_groups[0]["lr"] == pytest.approx(1 / 5)


def test_time_to_accuracy_marks_the_first_epoch_that_reached_each_level():
    rows = [{"epoch": 1, "test_acc": 0.85, "elapsed_s": 10.0}, {"epoch": 2, "test_acc": 0.925, "elapsed_s": 21.5},
            {"epoch": 3, "test_acc": 0.91, "elapsed_s": 30.0}, {"epoch": 4, "test_acc": 0.941, "elapsed_s": 40.0}]
    t = time_to_acc(rows)
    assert t["0.90"] == {"epoch": 2, "wall_s": 21.5} and t["0.92"] == {"epoch": 2, "wall_s": 21.5}
    assert t["0.93"] == t["0.94"] == {"epoch": 4, "wall_s": 40.0} and t["0.95"] is None


class _Run:
    def __init__(self, epochs: int, dataset: str):
        self.cfg = {"epochs": epochs, "batch_size": 256, "data": {"name": dataset}}
        self.eta_hint_given = False


@pytest.mark.parametrize("epochs,expect", [(10, True), (1, False)])
def test_cpu_eta_hint_names_the_eta_and_the_cpu_recipe_once(caplog, epochs, expect):
    tr = _Run(epochs, "fashion_mnist")
    run = Running(steps=10, train_seconds=20.0)  # 2 s a step, 235 steps an epoch
    with caplog.at_level(logging.WARNING, logger="resnet_cli"):
        _eta_hint(tr, run, epoch=1, steps_per_epoch=235, eval_views=0)
        _eta_hint(tr, run, epoch=1, steps_per_epoch=235, eval_views=0)
    lines = [r.getMessage() for r in caplog.records]
    if expect:
        assert len(lines) == 1 and "1 h 18 min" in lines[0] and "experiment=cpu" in lines[0]
    else:
        assert lines == []
    assert tr.eta_hint_given


@pytest.mark.parametrize("epoch,steps,expect", [
    (1, 10, "1 h 26 min"),  # (2,340 steps left + 10 x 20,000 / 3 / 256 = 260) x 2 s = 5,201 s
    (4, 100, "57 min"),  # resumed mid-epoch 4: (1,545 left + 7 x 26.04 = 182) x 2 s = 3,455 s
])
def test_cpu_eta_counts_each_epochs_evaluation(caplog, epoch, steps, expect):
    """The default recipe's 10,000 test images with flip TTA, 20,000 forward passes an epoch, at
    a third of a training image's cost each: 26 more steps' time per epoch, for the epochs left
    (this one included). The hint once said 62 min for a run that took 70."""
    run = Running(steps=steps, train_seconds=2.0 * steps)  # 2 s a step of 256 images
    with caplog.at_level(logging.WARNING, logger="resnet_cli"):
        _eta_hint(_Run(10, "fashion_mnist"), run, epoch=epoch, steps_per_epoch=235, eval_views=20_000)
    assert f"needs about {expect} more" in caplog.records[0].getMessage()


@pytest.mark.parametrize("tta,ema,val,world,views", [
    ("false", None, 0, 1, 10_000), ("auto", None, 0, 1, 20_000), ("true", 0.99, 5_000, 1, 60_000),
    ("auto", None, 0, 2, 10_000)])
def test_evaluation_views_per_epoch(tta, ema, val, world, views):
    from types import SimpleNamespace

    tr = SimpleNamespace(cfg={"trainer": {"tta_hflip": tta}, "data": {"hflip": True, "augment": "standard"}},
                         ctx=SimpleNamespace(ema=ema), data=SimpleNamespace(num_test=10_000, num_val=val),
                         dist=SimpleNamespace(world=world))
    assert eval_views_per_epoch(tr) == views


@pytest.fixture(scope="module")
def val_run(tmp_path_factory):
    """3 epochs with a validation split, the EMA of the weights and flip TTA."""
    from conftest import run_cli

    cwd = tmp_path_factory.mktemp("val_run")
    run = cwd / "run"
    run_cli("resnet-train", "data=synthetic", "data.train_size=256", "data.test_size=64", "data.val_size=64",
            "model=resnet20", "model.layers=[1,1,1]", "batch_size=32", "epochs=3", "trainer.progress=none",
            "trainer.ema_decay=0.9", "trainer.tta_hflip=true", "trainer.sync_batchnorm=true", f"hydra.run.dir={run}",
            cwd=cwd, check=True)
    return run


def test_sync_batchnorm_in_one_process_says_it_has_no_effect(val_run):
    """A single process has nobody to sync BatchNorm with; the run says so instead of silently
    ignoring the key the user typed (it still trains)."""
    log = (val_run / "train.log").read_text()
    assert "trainer.sync_batchnorm=true has no effect in a single process" in log
    assert (val_run / "results.json").is_file()


def test_a_validation_split_selects_the_best_checkpoint(val_run):
    """With data.val_size, best.pt is the epoch with the best validation accuracy and the test
    split is only scored (issue 13: selecting on the test set makes its score optimistic)."""
    import json

    from resnet_cli.checkpoint import load_checkpoint

    run = val_run
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((run / "results.json").read_text())
    assert all({"val_acc", "val_loss", "test_acc", "ema_val_acc", "ema_test_acc", "elapsed_s"} <= set(r) for r in rows)
    best = max(rows, key=lambda r: r["val_acc"])  # the first epoch with the best val_acc
    assert results["selection"] == "val_acc" and results["best_epoch"] == best["epoch"]
    assert results["best_val_acc"] == best["val_acc"] and results["best_test_acc"] == best["test_acc"]
    assert results["final_test_acc"] == rows[-1]["test_acc"]
    assert load_checkpoint(run / "checkpoints" / "best.pt")["epoch"] == best["epoch"]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["ema"] is not None


def test_resnet_eval_scores_what_training_scored_with_tta_and_ema(val_run, tmp_path, monkeypatch, capsys):
    """resnet-eval takes the run's TTA setting by default and weights=ema scores the EMA: each
    equals the number training logged for the last epoch."""
    import json

    from conftest import assert_one_error_line, call_main

    from resnet_cli.checkpoint import load_checkpoint, save_checkpoint
    from resnet_cli.evaluate import main

    last = json.loads((val_run / "metrics.jsonl").read_text().splitlines()[-1])
    ckpt = val_run / "checkpoints" / "last.pt"
    scores = {}
    for extra in ([], ["weights=ema"], ["tta_hflip=false"]):
        code, out, err = call_main(main, "resnet-eval", [f"checkpoint={ckpt}", f"output_dir={tmp_path}",
                                                         "trackers=false", *extra], monkeypatch, capsys)
        assert code == 0, err
        scores[" ".join(extra)] = {**json.loads((tmp_path / "eval.json").read_text()), "shown": out}
    assert scores[""]["top1"] == last["test_acc"] and scores[""]["tta_hflip"] is True
    assert "hflip TTA" in scores[""]["shown"] and "EMA weights" in scores["weights=ema"]["shown"]
    assert scores["weights=ema"]["top1"] == last["ema_test_acc"] and scores["weights=ema"]["weights"] == "ema"
    assert scores["tta_hflip=false"]["loss"] != pytest.approx(scores[""]["loss"])  # TTA really off
    plain = load_checkpoint(ckpt)
    plain["ema"] = None
    save_checkpoint(tmp_path / "plain.pt", plain)
    code, _, err = call_main(main, "resnet-eval", [f"checkpoint={tmp_path / 'plain.pt'}", "weights=ema",
                                                   f"output_dir={tmp_path}"], monkeypatch, capsys)
    assert_one_error_line(code, err, "weights=ema", "no EMA weights")
    code, _, err = call_main(main, "resnet-eval", [f"checkpoint={ckpt}", "weights=best"], monkeypatch, capsys)
    assert_one_error_line(code, err, "weights=best: choose from raw, ema")


def test_seeds_preset_sweeps_three_seeds_on_one_validation_split():
    from resnet_cli.cli import compose

    cfg = compose("train", ["experiment=seeds"], with_hydra=True)
    assert cfg.hydra.sweeper.params.seed == "0,1,2"
    assert cfg.data.val_size == 5000 and cfg.model.name == "resnet18"  # the default recipe, validated
