"""Checkpoints and result files: written atomically, read without unpickling code.

A checkpoint is a dict of tensors and plain containers (torchvision references' layout:
model, optimizer, lr_scheduler, epoch, plus the resolved config), so a checkpoint alone can
rebuild its model and is always loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import CheckpointError, OutputError

FORMAT = "resnet-cli/1"


def writable_folder_error(folder: str | os.PathLike) -> str | None:
    """Why `folder` (existing or to be made) cannot hold a run's files, or None if it can."""
    probe = Path(folder).expanduser().absolute()
    while not probe.exists():
        if probe == probe.parent:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"no permission to write in {probe}"
    # access() says yes to root everywhere, also in /proc and /sys, where mkdir then fails:
    # only a real folder made (and removed) in the deepest existing parent tells.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".resnet-cli-probe-", dir=probe))
    except OSError as e:
        return f"cannot create folders in {probe}: {e.strerror or e}"
    return None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Temp file in the same folder, flush + fsync, rename: a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would have
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def remove_stale_temp_files(folder: str | os.PathLike) -> None:
    """Temp files of writes that a killed process never finished (atomic_write_bytes's
    `.NAME.*.tmp`): they are never read, only in the way."""
    for tmp in Path(folder).glob(".*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def save_checkpoint(path: str | os.PathLike | Sequence[str | os.PathLike], state: dict[str, Any]) -> None:
    """Serialize once, write atomically to one path or several (best.pt and last.pt of one epoch)."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    data = buf.getvalue()
    for p in paths:
        try:
            atomic_write_bytes(p, data)
        except OSError as e:
            kept = " the previous one is intact" if Path(p).exists() else ""
            raise OutputError(f"cannot write checkpoint {p}: {e.strerror or e};{kept}") from None


def to_host(obj: Any) -> Any:
    """A snapshot of a state dict: every tensor copied to CPU memory, containers copied, so that
    training can go on changing the originals while the copy is written."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints off the training thread (issue 12): the caller snapshots the state to
    host memory, one background thread serializes it and writes it atomically. At most one
    write is in flight: `submit` waits for the previous one, and so must the owner at exit or on
    a signal (`wait`). A write error is raised, as OutputError, by the next `submit` or `wait`.
    Since every file goes through atomic_write_bytes, a crash at any moment leaves either the
    old file or the new one, never a torn one."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.busy_seconds = 0.0  # time the training thread spent here (snapshots and waits)

    def submit(self, paths: Sequence[str | os.PathLike], state: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        self.wait()
        snapshot = to_host(state)
        self._thread = threading.Thread(target=self._write, args=(list(paths), snapshot),
                                        name="checkpoint-writer", daemon=False)
        self._thread.start()
        self.busy_seconds += time.perf_counter() - t0

    def _write(self, paths: list, snapshot: dict[str, Any]) -> None:
        try:
            save_checkpoint(paths, snapshot)
        except BaseException as e:  # handed to the training thread at its next submit/wait
            self._error = e

    def wait(self) -> None:
        t0 = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.busy_seconds += time.perf_counter() - t0
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def exported_format(p: Path) -> str | None:
    """"a TorchScript file", "a torch.export (.pt2) file" or "an ONNX file" for what
    resnet-export writes (compiled programs, not checkpoints); None otherwise."""
    if p.suffix.lower() == ".onnx":
        return "an ONNX file"
    try:
        with zipfile.ZipFile(p) as z:
            # The archive's records sit under one top folder; torch.load spots TorchScript by its
            # constants.pkl, torch.export writes archive_format.
            records = {n.split("/", 1)[-1] for n in z.namelist()}
    except (zipfile.BadZipFile, OSError):
        return None  # a torch.save file before torch 1.6, or no weights at all: torch.load tells
    if "constants.pkl" in records:
        return "a TorchScript file"
    if "archive_format" in records:
        return "a torch.export (.pt2) file"
    return None


def unpickler_detail(e: BaseException) -> str:
    """The telling line of a torch.load(weights_only=True) failure: torch wraps every one in the
    same long text; the line after "WeightsUnpickler error:" says whether the file is damaged or
    holds foreign objects."""
    text = str(e).strip()
    if "WeightsUnpickler error:" in text:
        return text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0]
    return text.splitlines()[0] if text else ""


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    exported = exported_format(path)
    if exported:  # torch.load would print a UserWarning, then fail with a text cut mid-word
        raise CheckpointError(f"checkpoint {path}: is {exported} (an exported model, as resnet-export writes), "
                              "not a checkpoint; give the run's checkpoint (RUN/checkpoints/best.pt) or its folder")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # the unpickler fails in many ways (even IndexError) on damaged input
        detail = unpickler_detail(e)
        if "global" in detail.lower():
            first = "it holds pickled objects other than tensors and plain data (refused for safety)"
        else:
            first = f"not a PyTorch checkpoint, or damaged ({type(e).__name__}: {detail})"
        raise CheckpointError(f"checkpoint {path}: cannot be read ({first[:160]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: not a resnet-cli checkpoint (no '{FORMAT}' format tag)")
    for key in ("model", "config", "epoch"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path}: incomplete (no '{key}')")
    for key in ("model", "data"):  # every reader rebuilds the network and its input from these
        if not isinstance(state["config"], dict) or not isinstance(state["config"].get(key), dict):
            raise CheckpointError(f"checkpoint {path}: incomplete (no '{key}' in its config)")
    return state


def resolve_resume(target: str | os.PathLike) -> tuple[Path, Path]:
    """(run dir, checkpoint file) for `resume=` given a run dir or a checkpoint file."""
    p = Path(target).expanduser().resolve()
    if p.is_dir() and p.name == "checkpoints" and (p / "last.pt").is_file():
        # RUN/checkpoints: the folder that holds last.pt, given for the run folder
        return p.parent, p / "last.pt"
    if p.is_dir():
        ckpt = p / "checkpoints" / "last.pt"
        if not ckpt.is_file():
            raise CheckpointError(f"resume={target}: {ckpt} not found (is this a resnet-train run folder?)")
        return p, ckpt
    if not p.exists():
        raise CheckpointError(f"resume={target}: no such file or folder")
    run_dir = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    return run_dir, p
