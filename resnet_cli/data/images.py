"""Reading one image file, the same way for training on an image folder and for resnet-predict.

PIL's own `convert("L")` clips 16-bit images (a 16-bit PNG or TIFF comes out almost all
white), so 16-bit grayscale is scaled to 8 bits here first; 32-bit integer and float images
are read only when their values fit 8 bits, and named otherwise rather than clipped.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Callable

from ..errors import DataError, ImageError, first_line

# The PIL mode that gives a model's channel count (ITU-R 601-2 luma for grayscale).
MODES = {1: "L", 3: "RGB"}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def read_image(path: str | os.PathLike, mode: str):
    """The first frame of the file as a PIL image in `mode` ("L" or "RGB"). Raises ImageError."""
    from PIL import Image

    try:
        with Image.open(path) as img:  # the first frame of an animated GIF or multi-page TIFF
            return _to_8bit(img, path).convert(mode)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        # UnidentifiedImageError is an OSError; a mode PIL cannot convert is a ValueError
        raise ImageError(f"{path}: cannot be read as an image ({first_line(e, 160) or type(e).__name__})") from None


def _to_8bit(img, path):
    import numpy as np
    from PIL import Image

    if img.mode in _SIXTEEN_BIT:  # 0..65535 -> 0..255, rounded (65535 / 257 = 255)
        values = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.rint(values / 257.0).astype(np.uint8), "L")
    if img.mode in ("I", "F"):  # 32-bit: no range to scale from; read as is only when it fits
        values = np.asarray(img)
        low, high = float(values.min()), float(values.max())
        if low < 0 or high > 255:
            kind = "integer" if img.mode == "I" else "float"
            raise ImageError(f"{path}: a 32-bit {kind} image with values {low:g} to {high:g}; resnet-cli reads "
                             "8- and 16-bit images, so save it as one")
        return Image.fromarray(np.rint(values).astype(np.uint8), "L")
    return img


def image_loader(channels: int) -> Callable:
    """ImageFolder's `loader`: picklable, so DataLoader workers can use it."""
    return partial(read_image, mode=MODES[channels])


def worker_error(e: DataError) -> DataError:
    """A DataError raised in a DataLoader worker comes back with the worker's traceback as its
    message; the last line of that traceback is the original one-line message."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    if len(lines) < 2 or not lines[0].startswith("Caught "):
        return e
    last = lines[-1]
    original = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    return type(e)(original)
