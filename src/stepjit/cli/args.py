"""What every subcommand shares: one-line usage errors (exit status 2) and checked values."""

from __future__ import annotations

import argparse
from collections.abc import Callable


class UsageError(Exception):
    """A bad flag, value or combination: reported in one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit status 2), no usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        message = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def checked(parse: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse `type` whose ValueError message reaches the user as is."""

    def convert(text: str) -> object:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def positive_int(text: str) -> int:
    """`text` as an integer >= 1, else ValueError."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"must be a positive integer, got {text}")
    return value


def optimizer_class(spec: str) -> type:
    """The optimizer class `spec` names (see `stepjit.optim.resolve`); ValueError, with the reason,
    when it cannot be loaded, whatever importing the user's module raised."""
    from ..optim import resolve

    try:
        return resolve(spec)
    except ValueError:
        raise
    except Exception as exc:  # a user's module that fails to import: a SyntaxError, ...
        raise ValueError(f"cannot load optimizer {spec!r}: {type(exc).__name__}: {exc}") from None
