"""Running a step in a forked child, with a hang turned into a failure rather than a stuck CI."""

from __future__ import annotations

import multiprocessing


def run_forked(target, *args, timeout: float = 60.0):
    """Run `target(*args, conn)` in a forked child; return what it sent through `conn`. Fails
    the test if the child is still running after `timeout` seconds, or exits with an error."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, child))
    proc.start()
    proc.join(timeout)
    hung = proc.is_alive()
    if hung:
        proc.kill()
        proc.join()
    assert not hung, "the forked child hung in step()"
    assert proc.exitcode == 0
    return parent.recv()
