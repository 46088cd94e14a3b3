"""User-facing errors.

Every problem a user can cause (a bad path, a missing column, a corrupt image, an unknown config
key) is raised as :class:`MitotypeError` with a one-line message naming the file, row or option.
The CLI prints that line and exits 2; anything else is a bug and keeps its traceback.

The library never names a command-line flag: a message that points at an option writes its
parameter name as ``{name}`` and lists it in ``options``. ``str(err)`` reads ``skip_missing``
there (what a Python caller passes); the CLI renders ``--skip-missing`` with :meth:`render`.
"""

from __future__ import annotations

from typing import Callable


class MitotypeError(Exception):
    """A problem with the user's input, described in one line."""

    def __init__(self, message: str, *, options: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.options = tuple(options)

    def render(self, spell: Callable[[str], str] = str) -> str:
        """The message with each ``{option}`` written as ``spell(option)`` (a flag, for the CLI)."""
        text = self.message
        for name in self.options:
            text = text.replace("{" + name + "}", spell(name))
        return text

    def __str__(self) -> str:
        return self.render()
