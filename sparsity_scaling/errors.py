"""The exceptions for mistakes a user can fix.

Command-line entry points catch them and print a single line (exit status 2), so a bad
file, field or argument never shows a traceback.
"""

from __future__ import annotations

from typing import Any, Callable


class UserError(Exception):
    """Bad input: the message names the file, field or argument and what is wrong."""


class SettingError(UserError):
    """A setting with a bad value, named as the library calls it (`p`, `site`, `tp`, ...).

    The library describes the value ("p 150: must be in (0, 100]") without knowing where it
    came from; a front end that does know renders the name as the user wrote it, e.g. the
    command line as a flag (`--p 150: must be in (0, 100]`).
    """

    def __init__(self, setting: str, value: Any, reason: str):
        self.setting, self.value, self.reason = setting, value, reason
        super().__init__(self.render(lambda name: name))

    def render(self, name: Callable[[str], str]) -> str:
        where = name(self.setting)
        return f"{where}: {self.reason}" if self.value is None else f"{where} {self.value}: {self.reason}"


class MissingSetting(SettingError):
    """A setting that another setting's value needs ("metric topk needs value")."""

    def __init__(self, setting: str, needed_by: str, needed_by_value: Any):
        self.needed_by, self.needed_by_value = needed_by, needed_by_value
        super().__init__(setting, None, f"needed by {needed_by} {needed_by_value}")

    def render(self, name: Callable[[str], str]) -> str:
        return f"{name(self.needed_by)} {self.needed_by_value} needs {name(self.setting)}"


class NonFiniteError(UserError):
    """A value that must be finite is not: a training step's loss or gradient norm, a
    checkpoint's weights, a perplexity. Deterministic: running again from the last
    checkpoint meets it again, so nothing retries it."""


class WriteFailed(UserError, OSError):
    """A write that failed (a full disk, a quota, a read-only file system), in one line
    naming the path and the system's reason. Still an OSError for code that expects one."""

    def __init__(self, path: Any, error: OSError):
        reason = error.strerror or str(error) or type(error).__name__
        super().__init__(f"{path}: cannot write: {reason}" + (f" (errno {error.errno})" if error.errno else ""))
        self.errno = error.errno
