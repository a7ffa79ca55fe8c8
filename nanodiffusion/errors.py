"""The one exception type for user mistakes: the CLI prints its message without a stack trace."""


class UserError(ValueError):
    """Bad input from the user (unknown name, wrong size, missing file...): the message says what to do."""
