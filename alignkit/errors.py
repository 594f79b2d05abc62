"""The one exception type for mistakes a user can fix (bad path, bad column, bad flag value)."""


class UserError(Exception):
    """A problem with the user's input. The command line prints its message on one line and exits 2."""


class RunInterrupted(Exception):
    """Training stopped on a signal after writing a checkpoint; the message says how to resume.

    ``exit_code`` is the shell's code for the signal (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
