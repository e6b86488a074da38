"""Errors that the CLI turns into one-line messages and exit code 2."""


class UserInputError(ValueError):
    """A parameter or file the user gave is not usable; the message names it and what is allowed."""


class DataUnavailableError(UserInputError):
    """A data set is neither on disk nor downloadable."""
