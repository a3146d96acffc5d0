"""One optimizer call at a time, never half done: the guard around step(), accumulate_grad() and
zero_grad().

A second thread calling into an optimizer that is already running gets a clear error instead of
racing on its state (two optimizers still run in parallel: the guard is per optimizer). A SIGINT
(Ctrl-C) that arrives while the guard is held is raised when the call ends, so a
`KeyboardInterrupt` never leaves some groups stepped and others not, a first-step flag uncleared,
or worker threads still writing after `step()` has returned or raised.
"""

from __future__ import annotations

import threading

try:  # the C functions under `signal`: 10x cheaper than its enum-converting wrappers
    import _signal as signal
except ImportError:  # pragma: no cover - not CPython
    import signal


class Exclusive:
    """A context manager held for the duration of one optimizer call."""

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._lock = threading.Lock()
        self._previous = None  # the SIGINT handler to restore, while one is deferred
        self._caught: tuple | None = None

    def __getstate__(self) -> dict:
        return {"owner": self._owner}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["owner"])

    def __enter__(self) -> Exclusive:
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(
                f"this {self._owner} is already running in another thread; step one optimizer "
                "from one thread at a time (or guard the calls with a lock)"
            )
        try:
            self._defer_sigint()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            previous, self._previous = self._previous, None
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
                caught, self._caught = self._caught, None
                if caught is not None:
                    previous(*caught)  # the default handler raises KeyboardInterrupt here
        finally:
            self._lock.release()

    def _defer_sigint(self) -> None:
        # Python runs signal handlers in the main thread only, and only it may replace them
        if threading.current_thread() is not threading.main_thread():
            return
        try:
            previous = signal.getsignal(signal.SIGINT)
            if not callable(previous):  # SIG_IGN or SIG_DFL: nothing is raised in Python
                return
            self._caught = None
            self._previous = previous
            signal.signal(signal.SIGINT, self._catch)
        except ValueError:  # not the main interpreter
            self._previous = None

    def _catch(self, signum: int, frame) -> None:
        self._caught = (signum, frame)
