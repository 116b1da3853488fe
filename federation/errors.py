"""Errors of the federation package. Each says whose fault it is and what to do."""


class IsthmusError(Exception):
    """Base of every error Isthmus raises on purpose."""


class InputError(IsthmusError, ValueError):
    """Input from a user or a peer was malformed; the message quotes the bad value."""


class IdentityError(IsthmusError):
    """A SPIFFE ID, SVID or trust bundle was invalid or did not verify."""


class BundleSequenceError(IdentityError):
    """A trust bundle update carried a lower sequence than the bundle already held."""


class StoreError(IsthmusError):
    """The catalog store failed or refused an operation."""


class CompactedError(StoreError):
    """A watch asked for history older than the store keeps; resync from a snapshot."""

    def __init__(self, requested: int, compacted: int):
        super().__init__(
            f"revision {requested} is compacted (oldest kept: {compacted}); fetch a new snapshot"
        )
        self.requested = requested
        self.compacted = compacted


class FederationError(IsthmusError):
    """The federation answered with an error, or could not be reached."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status
