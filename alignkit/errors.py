"""The one exception type for mistakes a user can fix (bad path, bad column, bad flag value)."""


class UserError(Exception):
    """A problem with the user's input. The command line prints its message on one line and exits 2."""
