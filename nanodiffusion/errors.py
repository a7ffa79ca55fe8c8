"""The exception types for user mistakes: the CLI prints their message without a stack trace."""


class UserError(ValueError):
    """Bad input from the user (unknown name, wrong size, missing file...): the message says what to do."""


class UserTypeError(UserError, TypeError):
    """An argument of the wrong type (a number where a prompt belongs...): a UserError that Python callers
    can also catch as the TypeError they expect."""
