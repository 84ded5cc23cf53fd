"""The one exception type of the data layer.

Every problem a user can fix (a missing or incomplete data folder, an unreadable file, a step
that selects no image) raises :class:`DataError` with a one-line message naming the problem and
the fix; the CLI turns it into exit code 2 instead of a traceback.  The constructor keeps the
plain one-argument form so that a DataLoader worker can re-raise it with its message intact.
"""
from __future__ import annotations

from utils.errors import UserError


class DataError(UserError, RuntimeError):
    """The dataset on disk (or the selection asked of it) cannot be used as it is."""
