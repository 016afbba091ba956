"""SIGTERM and SIGINT during training: stop after the current step, within a grace period.

Kubernetes sends SIGTERM to a pod it preempts and SIGKILLs it 30 s later (``terminationGracePeriodSeconds``). The
first SIGTERM or SIGINT asks the loop to stop after its current step: it checkpoints, flushes the MLflow sender,
ends the MLflow run as KILLED, releases the output_dir lock and exits 128 + the signal (143 for SIGTERM). If that
takes longer than the grace period (``stop_grace_s``, default 25 s), the process exits at its end anyway; a second
signal exits at once. Either way the kernel releases the lock's ``flock``, so the next run takes it over.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Self

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _say(line: str) -> None:
    os.write(2, (line + "\n").encode())  # not print(): a handler may interrupt a print of the main thread


class GracefulStop:
    """A context for the training loop: ``signum`` is set by the first SIGTERM or SIGINT (None before);
    ``remaining()`` is what is left of the grace period. Outside the main thread it installs nothing."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.signum: int | None = None
        self.deadline: float | None = None
        self._previous: dict[int, object] = {}
        self._timer: threading.Timer | None = None
        self._stopped = False  # the stop's work is done: the deadline only ends a slow exit

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        # after a stop the timer stays: the interpreter's own exit (threads, atexit) must end by the deadline too
        self._stopped = True

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            _say(f"tsallis: second {name}: exiting at once (the newest checkpoint is kept; --resume continues)")
            os._exit(128 + signum)
        self.signum, self.deadline = signum, time.monotonic() + self.grace_s
        self._timer = threading.Timer(self.grace_s, self._expire)
        self._timer.daemon = True
        self._timer.start()
        _say(
            f"tsallis: {name}: stopping after the current step (checkpoint, MLflow, lock) within "
            f"{self.grace_s:g} s; a second {name} exits at once"
        )

    def _expire(self) -> None:
        if self._stopped:
            os._exit(128 + self.signum)
        _say(
            f"tsallis: did not stop within stop_grace_s={self.grace_s:g} s: exiting now (the newest checkpoint is "
            f"kept; --resume continues; raise stop_grace_s if the steps are long)"
        )
        os._exit(128 + self.signum)

    def remaining(self) -> float:
        return self.grace_s if self.deadline is None else max(0.0, self.deadline - time.monotonic())
