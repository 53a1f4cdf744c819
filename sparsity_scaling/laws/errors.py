"""The error raised for inputs the laws cannot be fitted to or inverted on.

It is a `UserError`, so any command-line entry point of the project prints it as one line;
it is also a `ValueError`, because every case is a bad value (file, field, argument, data).
"""

from ..errors import UserError


class LawError(UserError, ValueError):
    """Bad data, bad argument or a fit that failed: the message says which and why."""
