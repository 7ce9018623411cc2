"""User-facing errors: one line naming the problem and the fix; the CLI prints them without a traceback."""


class UserError(Exception):
    """A problem the user can fix (bad option, missing data, corrupt checkpoint, ...)."""
