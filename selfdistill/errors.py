"""The one exception type that users see as a one-line message instead of a traceback."""


class UserError(Exception):
    """Bad input (file, row, field, flag): the CLI prints `selfdistill: error: <message>` and exits 2."""
