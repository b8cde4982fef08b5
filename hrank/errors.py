"""One exception type for problems the user can fix; the CLI turns it into one line and exit code 2."""

from __future__ import annotations


class HRankError(Exception):
    """A user-facing error: bad input, a missing file, a mismatch. Its message is one clear line."""
