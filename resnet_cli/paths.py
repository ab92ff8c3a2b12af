"""Where the shipped Hydra configs live.

In a wheel they are package data (`resnet_cli/configs`); in a source checkout or an editable
install they are the repository's top-level `configs/`. Hydra gets an absolute path either
way, which avoids its "Primary config dir not found" pitfall outside the source tree.
"""

from __future__ import annotations

from pathlib import Path


def config_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"resnet-cli configs not found next to {here}; reinstall the package")
