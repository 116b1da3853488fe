"""Errors of the federation package. Each says whose fault it is and what to do."""


class IsthmusError(Exception):
    """Base of every error Isthmus raises on purpose."""


class PermanentError(IsthmusError):
    """Retrying the same thing cannot succeed: a person must change something (a file, a token).
    Loops that retry (a gateway's join) stop on it; everything else is worth another try."""


class InputError(IsthmusError, ValueError):
    """Input from a user or a peer was malformed; the message quotes the bad value."""


class ApiError(IsthmusError):
    """The federation refuses a request, nearly always for the caller's fault: malformed input,
    no or the wrong identity, a conflict with the stored state (the message says which and what
    to do). `status` is the HTTP status of the answer, `body` its JSON (`{"error": message}`
    plus any `extra` fields a client can act on, such as the held bundle sequence)."""

    def __init__(self, status: int, message: str, **extra: object):
        super().__init__(message)
        self.status = status
        self.body = {"error": message, **extra}


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


class FutureRevisionError(StoreError):
    """A watch asked for changes after a revision the store has not reached (etcd: "required
    revision is a future revision"): the caller's view is from another store, or was restored
    from a newer backup; resync from a snapshot."""

    def __init__(self, requested: int, current: int):
        super().__init__(
            f"revision {requested} is a future revision (the store is at revision {current}); "
            "fetch a new snapshot"
        )
        self.requested = requested
        self.current = current


class FederationError(IsthmusError):
    """The federation answered with an error, or could not be reached. `status` is the HTTP
    status (None: no answer), `body` the answer's JSON object ({} if none), e.g. a refused
    bundle's `held_sequence`."""

    def __init__(self, message: str, status: int | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.status = status
        self.body = body or {}


class JoinRefused(FederationError, PermanentError):
    """The federation refused a join for good (a 4xx answer: the token is unknown, used, expired
    or for another cluster, or it will not take the cluster record): a new token or a changed
    record is needed. `status` is the HTTP status of the refusal."""
