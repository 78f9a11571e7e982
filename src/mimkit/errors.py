"""Errors a user can fix: the CLI prints them as one line (`mimkit <command>: error: ...`) and exits 2.

Raise a `MimkitError` (or a subclass) for anything the person running mimkit caused and can correct: a bad
config value, an output folder that cannot be written, a dataset with no readable image. The message says
what was wrong and what to do. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MimkitError(Exception):
    """A user error with a one-line message that says what was wrong and what to do."""

    def __str__(self) -> str:
        return one_line(super().__str__())


class ConfigError(MimkitError, ValueError):
    """A config key with a value of the wrong type or out of range, or an unreadable config file."""


class DataError(MimkitError, RuntimeError):
    """The data cannot be read (e.g. a folder where no file is a readable image)."""


class OutputError(MimkitError, OSError):
    """The run directory or a checkpoint cannot be written (read-only, a file in the way, disk full)."""


class NonFiniteLossError(MimkitError, RuntimeError):
    """The loss became NaN or infinite; training stopped before writing the corrupted weights."""


# Why a loss or the weights stop being finite, most likely first; every NonFiniteLossError ends with this.
LIKELY_CAUSES = (
    "likely causes: a learning rate too high for this batch (lower optim.base_lr or optim.lr), no gradient "
    "clipping (set optim.clip_grad, e.g. 3.0), too short a warmup (raise optim.warmup_epochs), bf16 overflow "
    "(train.precision=fp32), or input values far from normal (data.mean / data.std); change one and resume "
    "with train.resume=auto"
)


def one_line(message: str) -> str:
    """The user-facing line of an error message.

    A DataLoader worker re-raises its exception in the main process with the worker's traceback in front
    ("Caught X in DataLoader worker process 0.\\nOriginal Traceback ...\\nmodule.X: message"); keep only
    the original message. Other multi-line messages keep their first line.
    """
    lines = [line for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return message
    if lines[0].startswith("Caught ") and "Traceback" in message:
        last = lines[-1]
        head, sep, rest = last.partition(": ")
        return rest if sep and " " not in head else last
    return lines[0]
