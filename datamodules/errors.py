"""The data's error type, in a module of its own so that every reader can raise it."""


class DataError(ValueError):
    """Bad input data, found before training; the message names the culprit (file, row, column, option)."""
