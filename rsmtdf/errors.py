"""The one exception type the CLI reports as a single line instead of a traceback."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class RsmtdfError(Exception):
    """A problem with the user's input (a file, a cache, a checkpoint), said in one line.

    The message names the file and the problem; the CLI prints it and exits non-zero.
    """


def worker_errors_as_lines(loader: Iterable) -> Iterator:
    """Iterate a DataLoader; an RsmtdfError raised in one of its worker processes comes back from
    torch as "Caught RsmtdfError in DataLoader worker N" plus the worker's traceback: re-raise it
    as the worker's own line."""
    items = iter(loader)
    while True:
        try:
            item = next(items)
        except StopIteration:
            return
        except RsmtdfError as exc:
            text = str(exc)
            if text.startswith("Caught ") and f"{RsmtdfError.__name__}: " in text:
                text = text.rsplit(f"{RsmtdfError.__name__}: ", 1)[1].strip()
            raise RsmtdfError(text) from None
        yield item
