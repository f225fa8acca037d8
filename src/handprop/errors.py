"""The one exception type for mistakes a user can make (bad file, flag or checkpoint)."""


class UserError(Exception):
    """A problem the user can fix; the CLI prints its message as one line and exits 2."""

    def _render_traceback_(self):
        """What IPython shows when it ends a notebook cell: the one line, not handprop's frames (IPython's hook)."""
        return [f"handprop: error: {self}"]
