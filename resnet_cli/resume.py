"""Which config a resumed run continues with: the keys that may change on resume, the values
it keeps from its checkpoint, and the one-line refusal when the user changes what it computes.
No torch here: `resnet-train` decides this before anything heavy is imported."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

from .config import ConfigError, schema_defaults, tta_hflip_on

# Keys that may differ between a checkpoint and the run that resumes it: they change how
# (or how long) the run goes on, not what it computes up to the checkpoint.
RESUMABLE = ("epochs", "resume", "trainer.device", "trainer.progress", "trainer.checkpoint_every_steps",
             "trainer.eval_batch_size", "trainer.compile", "trainer.cuda_graphs", "trainer.prefetch", "data.root",
             "data.cache_dir", "data.download", "data.num_workers", "summary", "logger")

# Groups in the global package: typing one may change any key.
_GLOBAL_GROUPS = ("experiment", "hparams_search")


def flat_items(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_items(v, key + "."))
        else:
            out[key] = v
    return out


def _under(key: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


class _Unset:
    def __repr__(self) -> str:
        return "unset"

    __str__ = __repr__


# A key a config does not have: in a checkpoint written before an optimizer or scheduler key
# was added to its preset (their keys are not in the schema), or deleted from the run (~key).
UNSET = _Unset()


def differences(now: dict[str, Any], then: dict[str, Any]) -> Iterator[tuple[str, Any, Any]]:
    """(key, the checkpoint's value, the value now) for each key, in order, that would change
    what the run computes. A schema key added since the checkpoint was written ran as its
    schema default (a new key's default keeps the behaviour from before it existed), so it is
    compared as that; flip TTA by whether it was on (no key: off). Other keys missing from
    either side are UNSET."""
    a, b = flat_items(then), flat_items(now)
    defaults = flat_items(schema_defaults())
    for key in sorted(set(a) | set(b)):
        if _under(key, RESUMABLE):
            continue
        old = a[key] if key in a else defaults.get(key, UNSET)
        new = b.get(key, UNSET)
        if key == "trainer.tta_hflip":  # by what it did: an older checkpoint holds a bool where `auto` is now
            old = tta_hflip_on(then.get("trainer", {}), then.get("data", {}))
            differs = old != tta_hflip_on(now["trainer"], now["data"])
        else:
            differs = old != new
        if differs:
            yield key, old, new


def check_compatible(now: dict[str, Any], then: dict[str, Any], ckpt: Path) -> None:
    for key, old, new in differences(now, then):
        if old is UNSET:
            raise ConfigError(f"{key}={new}: the checkpoint being resumed ({ckpt}) ran without this key; "
                              f"resume with ~{key}, or start a new run")
        raise ConfigError(
            f"{key}={new}: differs from the checkpoint being resumed ({ckpt}: {key}={old}); "
            f"resume with the same value, or start a new run")


def check_length(epochs: int, state: dict[str, Any]) -> None:
    """A resumed run may go on longer or stop where it is, not end before its checkpoint."""
    done, step = int(state["epoch"]), int(state.get("step", 0))
    need = done + (1 if step else 0)
    if epochs < need:
        at = f"{done} epochs and {step} steps" if step else f"{done} epochs"
        raise ConfigError(f"epochs={epochs}: the run being resumed has done {at} already; "
                          f"give epochs >= {need}, or start a new run")


def kept_from_checkpoint(now: dict[str, Any], then: dict[str, Any],
                         typed: list[str]) -> list[tuple[str, Any, Any]]:
    """The differences the user did not ask for: keys not typed on the resume command line,
    whose default changed, or that were added to a preset, since the checkpoint was written
    (flip TTA became `auto`; the cosine preset gained max_warmup_fraction). The run keeps the
    checkpoint's value, or leaves such a new key unset (its code default is the old
    behaviour): a new release must not change a run halfway. A typed key that differs, or a
    key the config no longer has, is left to `check_compatible`, which refuses it."""
    if any(_under(t, _GLOBAL_GROUPS) for t in typed):
        return []  # a recipe typed again may set anything: only the strict check is safe
    return [(k, old, new) for k, old, new in differences(now, then)
            if not _under(k, typed) and new is not UNSET]


def override_text(key: str, value: Any) -> str:
    """`key=value` in Hydra's override grammar, read back as exactly `value` (UNSET: `~key`,
    which deletes the key)."""
    return f"~{key}" if value is UNSET else f"{key}={_value_text(value)}"


def kept_line(key: str, old: Any, new: Any) -> str:
    """What resume tells the user about a key it kept as the checkpoint had it."""
    # the new default as a user would type it (true, [2,2], null), a plain string unquoted
    now = new if isinstance(new, str) else _value_text(new)
    if old is UNSET:
        return f"{key}: left unset, as in the checkpoint (the default is {now} now)"
    return f"{override_text(key, old)}: kept from the checkpoint (the default is {now} now)"


def _value_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_value_text(v)}" for k, v in value.items()) + "}"
    # Quoted, so that 'true' or '10' stay strings. In Hydra's quoted strings a backslash is
    # literal except in a run that ends at a quote (or the closing quote): double those runs.
    # `${` would be read as an interpolation: OmegaConf's escape `\${` keeps it text, and the
    # backslashes right before it are escapes there too: double them.
    text = re.sub(r"(\\*)('|\Z)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), str(value))
    text = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)
    return "'" + text + "'"
