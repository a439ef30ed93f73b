"""The error vqim raises for a user's mistake: bad input, a bad flag, a file that cannot be used.

`InputError` is a `ValueError`, so code that already catches `ValueError` keeps working. Its message names
the file or flag and says what to do; the CLI prints it as one line `error: ...` and exits with status 2.
"""

from __future__ import annotations


class InputError(ValueError):
    """A user's input (file, folder, flag or value) that vqim cannot use; the message says why and what to do."""
