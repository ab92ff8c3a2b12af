"""`resnet-export`: a checkpoint's model as a standalone file (TorchScript, ONNX, or a
`torch.export` program).

The file holds the eval-mode network in fp32, on CPU, with a dynamic batch dimension:
input float32 N x C x H x W, already preprocessed; output the logits. What preprocessing
means for this model (size, channels, mean/std) and the class names go into OUTPUT.json
beside it, so a consumer needs neither this package nor the checkpoint.
"""

from __future__ import annotations

import io
import json
import sys
import warnings
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from .config import ConfigError
from .data.transforms import Preprocess

USAGE = """
usage: resnet-export checkpoint=PATH [format=torchscript|onnx|export] [output=FILE]

Write the checkpoint's model as a standalone file, and FILE.json with its preprocessing.

  checkpoint=PATH       a .pt file, or a run folder (uses its checkpoints/best.pt)
  format=torchscript    torchscript (torch.jit.load) | onnx (needs: pip install 'resnet-cli[onnx]')
                        | export (a torch.export program, .pt2: torch.export.load)
  output=null           the file to write (a folder: a default name in it);
                        null: RUN/export/<checkpoint name>.torchscript.pt, .onnx or .pt2
  verify=true           compare the exported file's outputs with the checkpoint's model

The model takes float32 N x C x H x W input, preprocessed as FILE.json says, and returns logits.
"""

PATH_KEYS = ("checkpoint", "output")
SUFFIXES = {"torchscript": ".torchscript.pt", "onnx": ".onnx", "export": ".pt2"}
# Suffixes that say which format a file is in; other names (model.bin, no suffix) are the user's call.
FORMAT_OF_SUFFIX = {".pt": "torchscript", ".pth": "torchscript", ".onnx": "onnx", ".pt2": "export"}
FORMAT_NAMES = {"torchscript": "a TorchScript file", "onnx": "an ONNX model", "export": "a torch.export program"}
INPUT_NAME, OUTPUT_NAME = "input", "logits"
LOAD = {"torchscript": "torch.jit.load(FILE)", "export": "torch.export.load(FILE).module()",
        "onnx": "onnxruntime.InferenceSession(FILE)"}
# Exported and eager fp32 models run the same arithmetic; ONNX Runtime may fuse and reorder.
TOLERANCE = {"torchscript": (1e-5, 1e-6), "export": (1e-5, 1e-6), "onnx": (1e-4, 1e-5)}  # (rtol, atol)


@dataclass
class ExportConfig:
    checkpoint: Optional[str] = None
    format: str = "torchscript"
    output: Optional[str] = None
    verify: bool = True


class ExportMismatch(RuntimeError):
    """The exported file computes something else than the model it came from (a bug)."""


def check_format(fmt: str) -> None:
    if fmt not in SUFFIXES:
        raise ConfigError(f"format={fmt}: choose from {', '.join(SUFFIXES)}")
    if fmt == "onnx":
        missing = [m for m in ("onnx", "onnxscript") if find_spec(m) is None]
        if missing:
            raise ConfigError(f"format=onnx: needs the {' and '.join(missing)} package(s); "
                              "pip install 'resnet-cli[onnx]'")


def batch_dim() -> dict:
    from torch.export import Dim

    return {"x": {0: Dim("batch", min=1)}}


def example_input(prep: Preprocess, batch: int = 2, seed: int = 0) -> torch.Tensor:
    # Batch 2, not 1: tracers may specialize a dimension that is 1 (or 0) to a constant.
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, prep.channels, prep.size, prep.size, generator=g)


def export_bytes(model: nn.Module, prep: Preprocess, fmt: str) -> bytes:
    """The exported model file's contents. `model` must be an fp32 CPU module in eval mode."""
    check_format(fmt)
    x = example_input(prep)
    if fmt == "torchscript":
        # Tracing records the ops run on x; a ResNet has no data-dependent control flow, so
        # that is the whole network. (torch.jit is deprecated upstream but still what C++
        # and mobile runtimes load; the warning says so on every call.)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            traced = torch.jit.trace(model, x, check_trace=False)
            buf = io.BytesIO()
            torch.jit.save(traced, buf)
        return buf.getvalue()
    if fmt == "export":
        buf = io.BytesIO()
        torch.export.save(torch.export.export(model, (x,), dynamic_shapes=batch_dim()), buf)
        return buf.getvalue()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        program = torch.onnx.export(model, (x,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=batch_dim(), verbose=False)
    return program.model_proto.SerializeToString()


def run_exported(data: bytes, fmt: str, x: torch.Tensor) -> torch.Tensor | None:
    """Outputs of the exported file on x; None when nothing here can run it (no onnxruntime)."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
        with torch.inference_mode():
            return module(x)
    if fmt == "export":
        program = torch.export.load(io.BytesIO(data))
        with torch.inference_mode():
            return program.module()(x)
    if find_spec("onnxruntime") is None:
        return None
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])


def verify_export(model: nn.Module, data: bytes, fmt: str, prep: Preprocess) -> float | None:
    """Max |exported - eager| on a batch of a size not used for export. Raises ExportMismatch."""
    x = example_input(prep, batch=3, seed=1)
    got = run_exported(data, fmt, x)
    if got is None:
        return None
    with torch.inference_mode():
        want = model(x)
    if not torch.isfinite(want).all():
        raise ExportMismatch("the checkpoint's model gives non-finite outputs (NaN or inf) on a random batch, "
                             "so nothing can be verified; are its weights damaged?")
    if got.shape != want.shape:
        raise ExportMismatch(f"the exported {fmt} model's outputs have shape {tuple(got.shape)}, "
                             f"the checkpoint's model's {tuple(want.shape)}")
    rtol, atol = TOLERANCE[fmt]
    diff = float((got - want).abs().max())
    if not torch.allclose(got, want, rtol=rtol, atol=atol):
        raise ExportMismatch(f"the exported {fmt} model's outputs differ from the checkpoint's model "
                             f"(max |diff| {diff:.3g})")
    return diff


def export_metadata(prep: Preprocess, fmt: str, output: Path, model_name: str, class_names: list[str],
                    checkpoint: Path, epoch: int) -> dict[str, Any]:
    """OUTPUT.json: everything a consumer needs to feed the model and read its answer."""
    return {
        "format": fmt, "file": output.name, "load": LOAD[fmt].replace("FILE", repr(output.name)), "model": model_name,
        "source_checkpoint": str(checkpoint.resolve()), "epoch": epoch,
        "input_name": INPUT_NAME if fmt == "onnx" else None, "output_name": OUTPUT_NAME if fmt == "onnx" else None,
        "input_shape": ["N", prep.channels, prep.size, prep.size], "input_dtype": "float32",
        "channels": prep.channels, "color": "grayscale (PIL mode L)" if prep.channels == 1 else "RGB",
        "input_size": prep.size, "mean": list(prep.mean) if prep.mean else None,
        "std": list(prep.std) if prep.std else None,
        "preprocessing": [
            f"decode; convert to {'L (grayscale)' if prep.channels == 1 else 'RGB'}; uint8 C x H x W",
            "divide by 255 (floats in [0, 1])",
            f"resize to {prep.size} x {prep.size}, bilinear (antialiased when shrinking), align_corners=False",
            ("subtract mean, divide by std, per channel" if prep.mean else "no normalization"),
        ],
        "output": f"logits, float32 N x {len(class_names)}; softmax gives class probabilities",
        "num_classes": len(class_names), "class_names": class_names,
        "torch_version": torch.__version__,
    }


def export_model(model: nn.Module, prep: Preprocess, fmt: str, output: Path, metadata: Mapping[str, Any],
                 verify: bool = True) -> float | None:
    """Write OUTPUT and OUTPUT.json (each atomically). Returns the verification's max |diff|
    (None when not verified)."""
    from .checkpoint import atomic_write_bytes, atomic_write_json

    model = model.float().cpu().eval()
    data = export_bytes(model, prep, fmt)
    diff = verify_export(model, data, fmt, prep) if verify else None
    atomic_write_bytes(output, data)
    atomic_write_json(sidecar_path(output), dict(metadata))
    return diff


def sidecar_path(output: Path) -> Path:
    return output.with_name(output.name + ".json")


def output_path(output: str | None, ckpt_path: Path, fmt: str) -> Path:
    from .inference import run_dir_of

    default_name = ckpt_path.stem + SUFFIXES[fmt]
    if not output:
        return run_dir_of(ckpt_path) / "export" / default_name
    p = Path(output).expanduser()
    if p.is_dir() or output.endswith(("/", "\\")):
        p = p / default_name
    suffix = p.suffix.lower()
    if suffix in FORMAT_OF_SUFFIX and FORMAT_OF_SUFFIX[suffix] != fmt:  # a .pt file that is ONNX misleads every reader
        base = p.name[:-len(".torchscript.pt")] if p.name.lower().endswith(".torchscript.pt") else p.stem
        right = base + (SUFFIXES[fmt] if fmt != "torchscript" else ".pt")
        raise ConfigError(f"output={output}: a {suffix} name is for format={FORMAT_OF_SUFFIX[suffix]}; "
                          f"format={fmt} writes {FORMAT_NAMES[fmt]}, so name it {right}")
    if p.exists() and p.resolve() == ckpt_path.resolve():
        raise ConfigError(f"output={output}: that is the checkpoint itself; choose another file")
    if p.exists() and not p.is_file():  # a device such as /dev/null would be replaced, not written to
        raise ConfigError(f"output={output}: exists and is not a regular file; choose a file name")
    if sidecar_path(p).exists() and not sidecar_path(p).is_file():  # found before the model is written
        raise ConfigError(f"output={output}: its metadata file {sidecar_path(p)} exists and is not a regular file; "
                          "choose another file name")
    taken = [f for f in (p, sidecar_path(p)) if f.is_file()]
    if taken and not _earlier_export(p):  # another checkpoint, a run's results.json (as the sidecar of RUN/results)
        raise ConfigError(f"output={output}: {taken[0]} exists and is not an earlier export (it would be replaced); "
                          "choose another file name, or remove it first")
    return p


def _earlier_export(p: Path) -> bool:
    """Whether p (with its sidecar) was written by resnet-export: a new export may replace it."""
    try:
        meta = json.loads(sidecar_path(p).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("file") == p.name and "source_checkpoint" in meta


# ---------------------------------------------------------------- the command

def run(argv: list[str]) -> Path:
    from .inference import check_output_folder, open_checkpoint, output_errors, parse_args, require, resolve_checkpoint

    cfg = parse_args("export", ExportConfig, argv, PATH_KEYS, USAGE).cfg
    check_format(cfg["format"])
    path = resolve_checkpoint(require(cfg, "checkpoint", "checkpoint=outputs/DATE/TIME/checkpoints/best.pt"))
    output = output_path(cfg["output"], path, cfg["format"])
    check_output_folder("output", cfg["output"] or output, output.parent)
    loaded = open_checkpoint(path, "cpu")
    meta = export_metadata(loaded.prep, cfg["format"], output, loaded.model_name, loaded.class_names, path,
                           loaded.epoch)
    try:
        with output_errors(output):
            diff = export_model(loaded.model, loaded.prep, cfg["format"], output, meta, bool(cfg["verify"]))
    except ExportMismatch as e:
        print(f"error: {e}; nothing written", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {output} ({cfg['format']}, {output.stat().st_size / 2**20:.1f} MiB) and {sidecar_path(output)}")
    if diff is not None:
        print(f"verified: max |exported - checkpoint model| = {diff:.3g} on a random batch")
    elif cfg["verify"]:
        print("not verified: onnxruntime is not installed")
    return output


def main() -> None:
    from .cli import user_errors

    with user_errors():
        run(sys.argv[1:])


if __name__ == "__main__":
    main()
