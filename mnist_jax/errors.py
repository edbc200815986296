"""The one exception type that reaches users as a one-line message."""


class UserError(Exception):
    """Bad input (flag, file, config, data): the message says what is wrong and what to do.

    The CLI prints it as one line without a traceback and exits with `exit_code`.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
