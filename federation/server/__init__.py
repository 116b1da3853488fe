"""The federation service (see app.py for how its parts compose)."""

from federation.server.app import (
    FEDERATION_TRUST_DOMAIN,
    REAP_INTERVAL,
    FederationServer,
    create_token,
    operator_id,
)

__all__ = [
    "FEDERATION_TRUST_DOMAIN",
    "REAP_INTERVAL",
    "FederationServer",
    "create_token",
    "operator_id",
]
