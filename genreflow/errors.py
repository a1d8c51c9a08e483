"""Errors a user can act on. The command prints them as one line and exits with status 2."""


class GenreflowError(Exception):
    """Bad input or a failed check: the message names the file and the problem."""


class ChecksumMismatch(GenreflowError):
    """A file's checksum is not the one expected."""
