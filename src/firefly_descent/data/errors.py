"""The one exception the data layer raises, so callers can catch data problems separately."""

from __future__ import annotations

from collections.abc import Iterable
from os import PathLike

__all__ = ["DatasetError", "DatasetNotFoundError", "one_line", "paths_text"]


class DatasetError(ValueError):
    """A dataset is unknown, missing or malformed; the message is one line naming the path(s) involved."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class DatasetNotFoundError(DatasetError):
    """None of the folders searched holds the dataset's files (a download may still get them)."""


def one_line(text: str) -> str:
    """Collapse whitespace runs (newlines included) so error messages stay on one line in logs."""
    return " ".join(str(text).split())


def paths_text(paths: Iterable[str | PathLike[str]]) -> str:
    """Join paths for an error message, without duplicates and in the order they were tried."""
    seen: list[str] = []
    for p in paths:
        s = str(p)
        if s not in seen:
            seen.append(s)
    return ", ".join(seen)
