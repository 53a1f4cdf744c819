"""The one exception type for mistakes a user can fix.

Command-line entry points catch it and print a single line (exit status 2), so a bad
file, field or argument never shows a traceback.
"""


class UserError(Exception):
    """Bad input: the message names the file, field or argument and what is wrong."""
