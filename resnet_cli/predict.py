"""`resnet-predict`: the top-k classes of a checkpoint's model for image files.

Each image goes through evaluation's own preprocessing: decoded with PIL, converted to the
checkpoint's channel count, then `device_batch(..., train=False)` (resize to the training
input size, scale, normalize) -- the function the test split goes through during training.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .config import ConfigError
from .data import DataError
from .data.images import MODES, ImageError, read_image
from .data.transforms import Preprocess, device_batch
from .errors import EXIT_FAILURE

USAGE = """
usage: resnet-predict checkpoint=PATH inputs=FILES_OR_FOLDERS [key=value ...]

Print the most likely classes for each image.

  checkpoint=PATH       a .pt file, or a run folder (uses its checkpoints/best.pt)
  inputs=a.png,b.jpg    image files and/or folders (searched recursively), comma-separated;
                        globs such as 'imgs/*.png' are expanded (quote them)
  topk=5                classes per image (at most the number of classes)
  format=table          table | json (json: a list of {file, topk: [{label, name, prob}]} on stdout)
  device=auto           auto | cpu | cuda | cuda:N | mps
  precision=null        null: the training run's policy; fp32 | bf16 | fp16
  batch_size=64         images per forward pass
  tta_hflip=null        null: as the training run scored (trainer.tta_hflip); true: average each
                        image's probabilities with its mirror image's; false: one view

Files that cannot be read are reported on stderr and skipped (exit code 1 after the others).
"""

PATH_KEYS = ("checkpoint", "inputs")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FORMATS = ("table", "json")


@dataclass
class PredictConfig:
    checkpoint: Optional[str] = None
    inputs: Optional[str] = None
    topk: int = 5
    format: str = "table"
    device: str = "auto"
    precision: Optional[str] = None
    batch_size: int = 64
    tta_hflip: Optional[bool] = None  # null: what the training run's evaluation did


# ---------------------------------------------------------------- finding and reading images

def find_images(inputs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """(image files, problems): files as given (any suffix: decoding decides), folders
    searched recursively for IMAGE_SUFFIXES in sorted order, glob patterns expanded.
    Order is kept and repeats dropped. A folder named without images is a problem; the folders
    a pattern matches are judged with the pattern (`photos/**` matches every subfolder, and
    one empty subfolder among them is no failure): only a pattern that yields nothing is."""
    found: list[Path] = []
    problems: list[tuple[str, str]] = []
    for item in inputs:
        pattern = os.path.expanduser(item)  # ~ in a pattern, as in a plain path
        # A path that exists is taken as it is: `shot [1].png` is a file name, not a pattern.
        literal = os.path.exists(pattern) or not glob.has_magic(pattern)
        matches = [item] if literal else sorted(glob.glob(pattern, recursive=True))
        yielded = []
        for m in matches:
            p = Path(m).expanduser()
            if p.is_dir():
                images = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
                if not images and literal:  # as a pattern that matches nothing: asked for, and nothing came of it
                    problems.append((m, f"a folder without image files ({', '.join(IMAGE_SUFFIXES)})"))
                yielded += images
            elif p.is_file():
                yielded.append(p)
            else:
                problems.append((m, "no such file or folder"))
        if not literal and not yielded:
            problems.append((item, "matches no files" if not matches else
                             f"matches no image files ({', '.join(IMAGE_SUFFIXES)})"))
        found += yielded
    return list(dict.fromkeys(found)), problems


def load_image(path: Path, channels: int) -> torch.Tensor:
    """uint8 C x H x W with the model's channel count, read as training on an image folder
    reads it. Raises ImageError (the caller skips the file)."""
    import numpy as np

    mode = MODES.get(channels)
    if mode is None:
        raise ConfigError(f"checkpoint: {channels}-channel input; prediction from image files supports 1 or 3")
    t = torch.from_numpy(np.array(read_image(path, mode), dtype=np.uint8))
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------- prediction

@torch.inference_mode()
def predict_images(model: nn.Module, prep: Preprocess, paths: Sequence[Path], topk: int,
                   class_names: Sequence[str], device: torch.device | str = "cpu", precision: str = "fp32",
                   channels_last: bool = False, batch_size: int = 64, tta_hflip: bool = False
                   ) -> tuple[list[dict[str, Any]], list[tuple[Path, str]]]:
    """(one {file, topk: [{label, name, prob}]} per readable image in order, skipped files
    with the reason). Probabilities are the softmax over all classes; with tta_hflip the mean
    of the image's and its mirror image's, as evaluation averages them."""
    from .engine import scored_logits

    device = torch.device(device)
    model.eval()
    k = max(1, min(int(topk), len(class_names)))
    results: list[dict[str, Any]] = []
    skipped: list[tuple[Path, str]] = []
    pending: list[tuple[Path, torch.Tensor]] = []

    def flush() -> None:
        x = torch.cat([t for _, t in pending])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        probs = scored_logits(model, x, device, precision, tta_hflip).softmax(1)
        top_p, top_i = probs.topk(k, dim=1)
        for (path, _), ps, ix in zip(pending, top_p.tolist(), top_i.tolist()):
            results.append({"file": str(path),
                            "topk": [{"label": i, "name": class_names[i], "prob": p} for p, i in zip(ps, ix)]})
        pending.clear()

    for path in paths:
        try:
            image = load_image(path, prep.channels)
        except ImageError as e:
            skipped.append((path, str(e)))
            continue
        # One image at a time through device_batch: images of any size all end up at prep.size.
        pending.append((path, device_batch(image[None].to(device), prep, train=False)))
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    return results, skipped


# ---------------------------------------------------------------- output

def show(results: list[dict[str, Any]], stream=None) -> None:
    from rich.markup import escape  # file and class names are the user's: "[draft] a.png" is text

    from .inference import console, table

    stream = stream or sys.stdout
    tty = stream.isatty()
    t = table(stream)
    for col, just in (("file", "left"), ("rank", "right"), ("label", "right"), ("name", "left"), ("prob", "right")):
        t.add_column(col, justify=just)
    for r in results:
        for rank, c in enumerate(r["topk"], 1):
            # a terminal shows each file once; piped output repeats it so that every line stands alone
            name = r["file"] if (rank == 1 or not tty) else ""
            t.add_row(escape(name), str(rank), str(c["label"]), escape(c["name"]), f"{c['prob']:.4f}",
                      end_section=tty and rank == len(r["topk"]))
    console(stream).print(t)


# ---------------------------------------------------------------- the command

def run(argv: list[str]) -> tuple[list[dict[str, Any]], int]:
    """(the predictions printed, how many inputs were skipped with a warning)."""
    from .checkpoint import load_checkpoint
    from .config import tta_hflip_on
    from .inference import as_device, as_precision, load_model, parse_args, require, resolve_checkpoint

    cfg = parse_args("predict", PredictConfig, argv, PATH_KEYS, USAGE).cfg
    path = resolve_checkpoint(require(cfg, "checkpoint", "checkpoint=outputs/DATE/TIME/checkpoints/best.pt"))
    given = str(require(cfg, "inputs", "inputs=cat.png,dog.jpg or inputs=images/"))
    if given.startswith("[") and given.endswith("]") and not Path(given).expanduser().exists():
        given = given[1:-1]  # Hydra's list form, inputs=[a.png,b.png]: the same list
    inputs = [s for s in (s.strip() for s in given.split(",")) if s]
    if cfg["topk"] < 1:
        raise ConfigError(f"topk={cfg['topk']}: must be >= 1")
    if cfg["format"] not in FORMATS:
        raise ConfigError(f"format={cfg['format']}: choose from {', '.join(FORMATS)}")
    if cfg["batch_size"] < 1:
        raise ConfigError(f"batch_size={cfg['batch_size']}: must be >= 1")
    device = as_device(cfg["device"])

    paths, problems = find_images(inputs)
    if not paths:  # one line, naming the first thing that was not there
        why = f"{problems[0][0]}: {problems[0][1]}" if problems else f"looked for {', '.join(IMAGE_SUFFIXES)}"
        raise DataError(f"inputs={cfg['inputs']}: no images found ({why})")
    for item, why in problems:
        print(f"warning: {item}: {why}; skipped", file=sys.stderr)

    ckpt = load_checkpoint(path, map_location="cpu")
    channels_last = bool(ckpt["config"].get("trainer", {}).get("channels_last", True))
    loaded = load_model(ckpt, path, device, channels_last)
    precision = as_precision(cfg["precision"], ckpt["config"], device)
    tta = cfg["tta_hflip"]
    if tta is None:  # as resnet-eval: what the run's own evaluation did
        tta = tta_hflip_on(ckpt["config"].get("trainer", {}), ckpt["config"].get("data", {}))
    results, skipped = predict_images(loaded.model, loaded.prep, paths, cfg["topk"], loaded.class_names, device,
                                      precision, channels_last, cfg["batch_size"], tta)
    for _, why in skipped:
        print(f"warning: {why}; skipped", file=sys.stderr)
    if not results:
        raise DataError(f"inputs={cfg['inputs']}: none of the {len(paths)} file(s) could be read as an image")
    if cfg["format"] == "json":
        print(json.dumps(results, indent=2))
    else:
        show(results)
    return results, len(problems) + len(skipped)


def main() -> None:
    from .cli import user_errors

    with user_errors():
        _, skipped = run(sys.argv[1:])
    if skipped:  # as cat and cp: the others are printed, and a script still learns that some were not
        sys.exit(EXIT_FAILURE)


if __name__ == "__main__":
    main()
