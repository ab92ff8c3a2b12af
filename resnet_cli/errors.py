"""The errors a user sees, and how a command reports them: one line on stderr, an exit code.

This module sits at the bottom of the package and imports nothing from it, so every layer can
raise these errors and every command (and the sweep code) can report them without importing
upward. Each message is already the line to show: it names the key, value or file and says
what is allowed. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator, NoReturn

EXIT_FAILURE = 1  # a run that started and then failed
EXIT_USAGE = 2  # bad input, refused before anything ran (the convention of argparse and Hydra)


class ConfigError(ValueError):
    """Bad user input. The message is one line: key, value given, what is allowed."""


class ModelConfigError(ValueError):
    """A model config that cannot be built; the message names the key."""


class DataError(RuntimeError):
    """Data that cannot be found or read; the message says where and what to do."""


class ImageError(DataError):
    """An image file that cannot be decoded; the message names it. resnet-predict skips the
    file; a run reading an image folder stops on it, as a run failure."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or not ours; the message names the file."""


class OutputError(RuntimeError):
    """A result that could not be written (folder not writable, disk full)."""


class NonFiniteLoss(RuntimeError):
    def __init__(self, epoch: int, step: int, value: float, what: str = "loss"):
        super().__init__(
            f"{what} became {value} at epoch {epoch}, step {step}; checkpoints written before are kept. "
            "Try a lower lr, trainer.precision=fp32, trainer.grad_clip=1.0, "
            "or trainer.skip_nonfinite=true to skip such steps")
        self.epoch, self.step = epoch, step


KNOWN_ERRORS = (ConfigError, ModelConfigError, DataError, CheckpointError, OutputError, NonFiniteLoss)
# Raised while running rather than at the door: a failure (1), not a usage error (2).
RUN_FAILURES = (OutputError, NonFiniteLoss, ImageError)


def known_error_types() -> tuple[type[BaseException], ...]:
    """Errors whose message is already the one line a user should see."""
    return KNOWN_ERRORS


def exit_code(e: BaseException) -> int:
    return EXIT_FAILURE if isinstance(e, RUN_FAILURES) else EXIT_USAGE


def error_line(e: BaseException) -> str:
    """One line: a known error's own message, else `Type: message` (a bug, named as such)."""
    text = " ".join(str(e).split()) or type(e).__name__
    if not isinstance(e, KNOWN_ERRORS):
        text = f"{type(e).__name__}: {text}"
    return text[:500]


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, cut: libraries' messages (torch's unpickler,
    MLflow, torchvision) run to many lines, and only the first one fits an error line."""
    return (str(e).strip().splitlines() or [""])[0][:limit]


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Known errors -> one line and exit code. Anything else propagates (a real bug).
    HYDRA_FULL_ERROR=1 shows the traceback, as it does for Hydra's own errors."""
    try:
        yield
    except BrokenPipeError:
        quiet_broken_pipe()
    except KNOWN_ERRORS as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        fail(str(e), code=exit_code(e))


def quiet_broken_pipe() -> NoReturn:
    """The reader went away (`resnet-summary | head`): not worth a traceback. stdout goes to
    /dev/null so that the interpreter's own final flush does not fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(1)
