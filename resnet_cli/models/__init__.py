"""Model zoo: `build_model(name_or_config, in_channels, num_classes, **overrides)`."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Mapping

from torch import nn

from ..paths import config_dir
from .blocks import BLOCKS
from .resnet import ModelConfigError, ModelSpec, ResNet, make_stage, stage_sizes
from .stems import STEMS

__all__ = ["BLOCKS", "STEMS", "ModelConfigError", "ModelSpec", "ResNet", "build_model",
           "list_presets", "load_preset", "make_stage", "stage_sizes"]


def list_presets() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "model").glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    import yaml  # PyYAML comes with omegaconf

    path = config_dir() / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ModelConfigError(f"model={name}: unknown preset; choose from {', '.join(list_presets())}")
    return {k: v for k, v in (yaml.safe_load(path.read_text()) or {}).items() if k != "defaults"}


def resolve_spec(name_or_config: str | Mapping[str, Any] | ModelSpec, **overrides: Any) -> ModelSpec:
    if isinstance(name_or_config, str):
        data = load_preset(name_or_config)
    elif isinstance(name_or_config, ModelSpec):
        data = asdict(name_or_config)
    else:
        data = dict(name_or_config)
    data.update(overrides)
    return ModelSpec.from_mapping(data)


def build_model(name_or_config: str | Mapping[str, Any] | ModelSpec, in_channels: int | None = None,
                num_classes: int | None = None, **overrides: Any) -> nn.Module:
    """Build a ResNet from a preset name, a mapping of model keys, or a ModelSpec.

    Channels and classes: the explicit argument, else the config's value, else 3 and 1000
    (torchvision's defaults, so presets compare directly)."""
    spec = resolve_spec(name_or_config, **overrides)
    cin = in_channels or spec.in_channels or 3
    ncls = num_classes or spec.num_classes or 1000
    return ResNet(spec, cin, ncls)
