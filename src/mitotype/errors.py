"""User-facing errors.

Every problem a user can cause (a bad path, a missing column, a corrupt image, an unknown config
key) is raised as :class:`MitotypeError` with a one-line message naming the file, row or option.
The CLI prints that line and exits 2; anything else is a bug and keeps its traceback.
"""


class MitotypeError(Exception):
    """A problem with the user's input, described in one line."""
