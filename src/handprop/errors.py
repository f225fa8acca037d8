"""The one exception type for mistakes a user can make (bad file, flag or checkpoint)."""


class UserError(Exception):
    """A problem the user can fix; the CLI prints its message as one line and exits 2."""
