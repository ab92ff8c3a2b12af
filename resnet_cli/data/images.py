"""Reading one image file, the same way for training on an image folder and for resnet-predict.

PIL's own `convert("L")` clips 16-bit images (a 16-bit PNG or TIFF comes out almost all
white), so unsigned 16-bit grayscale is scaled to 8 bits here first, whichever mode PIL opens
it in (`I;16`, or `I` for 16-bit PGM and for PNG before Pillow 10.3). Float images are read
in 0..1 (the usual convention) or 0..255; other 32-bit images are read only when their values
fit 8 bits, and named otherwise rather than clipped.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Callable

from ..errors import DataError, ImageError, first_line

# The PIL mode that gives a model's channel count (ITU-R 601-2 luma for grayscale).
MODES = {1: "L", 3: "RGB"}


def read_image(path: str | os.PathLike, mode: str):
    """The first frame of the file as a PIL image in `mode` ("L" or "RGB"). Raises ImageError."""
    from PIL import Image

    try:
        with Image.open(path) as img:  # the first frame of an animated GIF or multi-page TIFF
            img = _to_8bit(img, _stored_mode(img), path)
            if img.mode == "P" and "transparency" in img.info:
                # Through RGBA, as PIL asks in a two-line warning per file otherwise (in every
                # DataLoader worker too); the L or RGB pixels are the same either way.
                img = img.convert("RGBA")
            return img.convert(mode)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        # UnidentifiedImageError is an OSError; a mode PIL cannot convert is a ValueError
        raise ImageError(f"{path}: cannot be read as an image ({first_line(e, 160) or type(e).__name__})") from None


def _stored_mode(img) -> str:
    """How the pixels are stored in the file (PIL's raw mode, e.g. I;16B), read before decoding:
    PIL opens a 16-bit PGM as mode I, the same mode as a 32-bit TIFF."""
    try:
        args = img.tile[0][3]
        raw = args[0] if isinstance(args, tuple) else args
    except (IndexError, TypeError, AttributeError):
        return img.mode
    return raw if isinstance(raw, str) else img.mode


def _to_8bit(img, stored: str, path):
    import numpy as np
    from PIL import Image

    unsigned_16 = img.mode.startswith("I;16") or (stored.startswith("I;16") and not stored.endswith("S"))
    if img.mode.startswith("I") and unsigned_16:  # 0..65535 -> 0..255, rounded (65535 / 257 = 255)
        return Image.fromarray(((np.asarray(img).astype(np.uint32) + 128) // 257).astype(np.uint8))
    if img.mode not in ("I", "F"):
        return img
    values = np.asarray(img)
    if img.mode == "F":
        if not np.isfinite(values).all():
            raise ImageError(f"{path}: a float image with NaN or infinite values")
        if values.size and values.min() >= 0 and values.max() <= 1:  # the 0..1 convention of float images
            values = values * 255
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low < 0 or high > 255:  # no range to scale from: refused rather than clipped
        kind = "float" if img.mode == "F" else f"integer ({stored})"
        raise ImageError(f"{path}: a 32-bit {kind} image with values {low:g} to {high:g}; resnet-cli reads 8-bit, "
                         "unsigned 16-bit and 0..1 float images, so save it as one")
    return Image.fromarray(np.rint(values).astype(np.uint8))


def image_loader(channels: int) -> Callable:
    """ImageFolder's `loader`: picklable, so DataLoader workers can use it."""
    return partial(read_image, mode=MODES[channels])


def worker_error(e: DataError) -> DataError:
    """A DataError raised in a DataLoader worker comes back with the worker's traceback as its
    message; the last line of that traceback is the original one-line message."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    if len(lines) < 2 or not lines[0].startswith("Caught "):
        return e
    # traceback's last line: "module.Type: message" (or "Type: message" for builtins)
    last, kind = lines[-1], type(e)
    for prefix in (f"{kind.__module__}.{kind.__qualname__}: ", f"{kind.__qualname__}: "):
        if last.startswith(prefix):
            return kind(last[len(prefix):])
    return kind(last)
