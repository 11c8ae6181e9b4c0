"""User-facing errors.

Every error a user can cause (bad input, bad configuration, missing data) is an
`AttnflowError`: the CLI prints its message on one line and exits with its
`exit_code`, without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class AttnflowError(Exception):
    """An error caused by input, configuration or environment, not by a bug."""

    exit_code = 2


class ConfigError(AttnflowError):
    """params.yaml or a `--set` override is invalid."""


class DataError(AttnflowError):
    """An input file or table cannot be read or does not fit the schema."""


class DatasetUnavailable(AttnflowError):
    """A dataset is unknown, or no cache, mirror or download can provide it."""


class ChecksumMismatch(DatasetUnavailable):
    """A file's SHA-256 differs from the one the registry or mirror lists."""


class ValidationFailed(AttnflowError):
    """A Great Expectations suite failed: the data version is rejected."""

    exit_code = 3

    def __init__(self, message: str, failures: list[str] | None = None, docs: str | None = None):
        super().__init__(message)
        self.failures = failures or []
        self.docs = docs


class UnknownUser(KeyError):
    """The user id is not among the users the model knows (serving answers 404)."""


class TransientError(AttnflowError):
    """A failure worth retrying (a lock held by another process, a network blip)."""

    exit_code = 75  # EX_TEMPFAIL: orchestrators retry on it
