"""Reading Hydra's command line back: an override's key and value, and the config folder and
name a run was started with (from the record Hydra writes into .hydra/ and multirun.yaml).
Shared by the entry point, resume, the key=value commands and the sweep summary, which all
read the same strings."""

from __future__ import annotations

from typing import Any, Mapping


def split_override(override: str) -> tuple[str, str]:
    """`+model.freeze=[stem]` -> ("model.freeze", "[stem]"): the key without Hydra's add/delete
    prefix, the value as typed ("" when there is none, as in `~key`)."""
    key, _, value = str(override).partition("=")
    return key.lstrip("+~").strip(), value


def override_key(override: str) -> str:
    return split_override(override)[0]


def recorded_config(hydra: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(--config-dir, --config-name) from Hydra's record of a run or sweep (its `hydra` node as
    a plain mapping): the folder only when the command line gave one (Hydra records it
    absolute), the name only when it is not our own `train`."""
    sources = (hydra.get("runtime") or {}).get("config_sources") or []
    folders = [s.get("path") for s in sources
               if isinstance(s, Mapping) and s.get("provider") == "command-line" and s.get("path")]
    name = (hydra.get("job") or {}).get("config_name")
    return (str(folders[0]) if folders else None), (str(name) if name and name != "train" else None)
