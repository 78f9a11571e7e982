"""Stopping a run cleanly on SIGTERM / SIGINT: finish the step, checkpoint, then exit (the trainer's `fit`)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from typing import Any

from .distributed import DistInfo, host_max

__all__ = ["StopSignals", "stopped_message"]


def stopped_message(signum: int, step: int, total_steps: int, out_dir: Any) -> str:
    return (
        f"stopped by {signal.Signals(signum).name} at step {step} of {total_steps}; checkpoint written to "
        f"{out_dir}/checkpoint.pt. Resume with: mimkit pretrain --config {out_dir}/config.yaml --resume auto"
    )


class StopSignals:
    """While active (`with StopSignals():`), SIGTERM and SIGINT only set `signum`: the training loop stops at
    the end of its step and checkpoints. A second signal terminates the data-loader workers and the process
    at once. Handlers are installed only from the main thread and restored on exit.

    A second signal within `same_request_s` of the first counts as the same request: a Ctrl-C reaches every
    process of the terminal's group, and torchrun then forwards it to its workers a few milliseconds later.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, verbose: bool = True, same_request_s: float = 1.0):
        self.signum: int | None = None
        self.verbose = verbose
        self.same_request_s = same_request_s
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def agreed(self, info: DistInfo) -> int:
        """The stop signal any process received (0: none); a collective on the CPU (no device sync), so every
        process gets the same answer after the same step."""
        return int(host_max(float(self.signum or 0), info))

    def _say(self, text: str) -> None:
        if self.verbose:  # os.write: print() is not safe inside a signal handler
            os.write(2, f"[mimkit] {text}\n".encode())

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
            self._say(
                f"{name}: finishing this step, then writing a checkpoint (send it again to exit at once)"
            )
            return
        if time.monotonic() - self._first_at < self.same_request_s:
            return  # the same stop request, delivered twice (terminal + launcher)
        self._say(f"second {name}: exiting now, without a checkpoint; the previous one is kept")
        for child in multiprocessing.active_children():
            child.terminate()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
