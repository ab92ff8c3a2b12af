"""A non-editable install finds its Hydra configs from any folder (Hydra's "Primary config
dir not found" pitfall): build the wheel, install it into a target dir, run it elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: build with this environment's setuptools, no download needed
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                    "-w", str(tmp / "dist"), "-q"], check=True, capture_output=True, cwd=tmp)
    (wheel,) = (tmp / "dist").glob("resnet_cli-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "resnet_cli/configs/train.yaml" in names and "resnet_cli/configs/model/resnet50.yaml" in names
    assert "resnet_cli/configs/data/fashion_mnist.yaml" in names
    target = tmp / "target"
    subprocess.run([sys.executable, "-m", "pip", "install", str(wheel), "--no-deps", "--target", str(target), "-q"],
                   check=True, capture_output=True, cwd=tmp)
    return target


def test_wheel_runs_summary_from_an_unrelated_folder(installed, tmp_path):
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(installed)}
    where = subprocess.run([sys.executable, "-c", "import resnet_cli; print(resnet_cli.__file__)"], env=env,
                           cwd=elsewhere, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(installed))  # the wheel's copy, not the source tree
    script = installed / "bin" / "resnet-summary"
    assert script.is_file()
    proc = subprocess.run([sys.executable, str(script), "model=resnet50", "data=cifar10", "summary.depth=1"],
                          env=env, cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "25,557,032" not in proc.stdout  # 10 CIFAR classes, not ImageNet's 1000
    assert "layer4" in proc.stdout and "Total params" in proc.stdout
    assert list(elsewhere.iterdir()) == []  # no run folder, no logs


def test_wheel_trains_from_an_unrelated_folder(installed, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    proc = subprocess.run([sys.executable, str(installed / "bin" / "resnet-train"), "data=synthetic",
                           "data.train_size=64", "data.test_size=32", "model=resnet20", "epochs=1",
                           "trainer.progress=none"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(list(tmp_path.glob("outputs/*/*/results.json"))) == 1
