"""The one exception type that reaches users as a one-line message."""


class UserError(Exception):
    """Bad input (flag, file, config, data): the message says what is wrong and what to do.

    The CLI prints it as one line without a traceback and exits with `exit_code`.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def first_line(error: BaseException) -> str:
    """An exception's message, first line only, for a one-line problem or note."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def describe(error: BaseException) -> str:
    """The exception's type and the first line of its message (some libraries' run to pages)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
