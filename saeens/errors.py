"""The one exception type users see: its message names the problem and the fix, on one line."""


class SaeensError(Exception):
    """Bad input or state; the CLI prints `saeens: error: <message>` and exits with status 2."""
