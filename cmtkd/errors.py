"""User-facing errors: one line naming the problem and the fix; the CLI prints them without a traceback."""


class UserError(Exception):
    """A problem the user can fix (bad option, missing data, corrupt checkpoint, ...)."""


def did_you_mean(word: str, choices) -> str:
    """" (did you mean 'x'?)" for the closest of ``choices`` to a mistyped ``word``, else ""."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
