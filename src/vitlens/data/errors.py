"""Errors about a data set: one line each, naming the file, key or class at fault."""
from __future__ import annotations


class DataError(ValueError):
    """Bad data: unreadable image, unknown class, missing column, mismatched mask, ..."""


class CorruptImageError(DataError):
    """An image (or mask) file that cannot be decoded; the message names the file."""


class MissingFileError(DataError, FileNotFoundError):
    """A file the data set lists or needs is not there; the message names it."""


def one_line(error: BaseException | str) -> str:
    """An exception's message squeezed onto one line."""
    return " ".join(str(error).split())
