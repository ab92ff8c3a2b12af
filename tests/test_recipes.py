"""Recipe presets: experiment=cpu (the measured CPU recipe) and experiment=seeds, alone and
combined with another recipe, as a user types them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from resnet_cli import build_model
from resnet_cli.cli import compose
from resnet_cli.config import ConfigError, check_values, tta_hflip_on
from resnet_cli.models import stage_sizes
from resnet_cli.models.resnet import ModelSpec

from conftest import run_cli


def test_cpu_recipe_trains_a_small_resnet_at_native_size():
    cfg = OmegaConf.to_container(compose("train", ["experiment=cpu"]), resolve=True)
    check_values(cfg)
    assert cfg["data"]["name"] == "fashion_mnist" and cfg["data"]["resize"] is None  # 28x28, not 96x96
    spec = ModelSpec.from_mapping(cfg["model"])
    assert spec.stem == "cifar" and stage_sizes(spec, 1, 28)[-1][1][-2:] == (7, 7)  # no early downsampling
    params = sum(p.numel() for p in build_model(spec, in_channels=1, num_classes=10).parameters())
    assert params < 11_000_000 // 10  # far below ResNet-18's 11M: a CPU finishes it while you wait


@pytest.mark.parametrize("overrides, on", [
    ([], True),                                   # the default recipe: Fashion-MNIST, flipped in training
    (["experiment=cpu"], True),
    (["data=mnist"], False),                      # a mirrored digit is another glyph: never flipped
    (["data.augment=none"], False),               # no augmentation asked for: plain evaluation too
    (["experiment=d2l"], False),                  # the reference scores plain images
    (["data=mnist", "trainer.tta_hflip=true"], True),
    (["trainer.tta_hflip=false"], False),
])
def test_flip_tta_follows_the_training_flips_unless_set(overrides, on):
    cfg = OmegaConf.to_container(compose("train", overrides), resolve=True)
    check_values(cfg)
    assert tta_hflip_on(cfg["trainer"], cfg["data"]) is on


def test_flip_tta_reads_old_checkpoints_and_refuses_other_values():
    data = {"hflip": True, "augment": "standard"}
    assert tta_hflip_on({"tta_hflip": True}, {}) and not tta_hflip_on({"tta_hflip": False}, data)
    assert not tta_hflip_on({}, data)  # checkpoints from before TTA: scored plain
    cfg = OmegaConf.to_container(compose("train", ["trainer.tta_hflip=mirror"]), resolve=True)
    with pytest.raises(ConfigError, match=r"^trainer.tta_hflip=mirror: choose from auto, true, false$"):
        check_values(cfg)


@pytest.mark.parametrize("recipe", ["seeds", "[cpu,seeds]", "[depth_lr_sweep,seeds]"])
def test_seeds_preset_sweeps_three_seeds_on_a_fixed_validation_split(recipe):
    cfg = compose("train", [f"experiment={recipe}"], with_hydra=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert params["seed"] == "0,1,2" and cfg.data.val_size == 5000
    alone = compose("train", [f"experiment={recipe.strip('[]').split(',')[0]}"])
    assert cfg.model == alone.model and cfg.lr == alone.lr and cfg.epochs == alone.epochs  # the recipe is kept
    if "depth_lr_sweep" in recipe:
        assert params["model"] == "resnet18,resnet34,resnet50"  # both sweeps' keys: 9 x 3 jobs


@pytest.mark.slow
def test_seeds_sweep_of_the_cpu_recipe_runs(tmp_path: Path):
    proc = run_cli("resnet-train", "-m", "experiment=[cpu,seeds]", "data=synthetic", "data.train_size=96",
                   "data.test_size=32", "data.val_size=32", "batch_size=32", "epochs=1", "trainer.progress=plain",
                   cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (sweep,) = tmp_path.glob("multirun/*/*")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    seeds = [yaml.safe_load((j / ".hydra" / "config.yaml").read_text())["seed"] for j in jobs]
    assert seeds == [0, 1, 2]
    assert proc.stdout.count("64 train / 32 test") == 3  # 32 of 96 held out in every job
    assert (sweep / "summary.csv").is_file()
