"""Exception types for errors a user can fix.

Every error a user can fix (bad spec, bad config, bad data, bad path) raises a subclass of
`UserError`. Its message is one line that names the file, line, key or value at fault and
what was expected. The command line prints such errors without a traceback and exits 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """An error caused by user input; the message says what to fix."""


class SpecError(UserError):
    """An architecture spec is invalid (field and bad value are quoted)."""


class ConfigError(UserError):
    """An experiment config is invalid (key path and bad value are quoted)."""


class DataError(UserError):
    """A data set, split file or image is malformed or missing (file and line are named)."""


class CheckpointError(UserError):
    """A workdir or export holds no usable checkpoint."""


class StoreError(UserError):
    """A search's trial store (journal file or database) is damaged or cannot be opened."""
