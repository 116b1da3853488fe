"""Fixtures of the isthmus (CLI) tests: a running federation in process (`fed`, `make_fed`)."""

from tests.federation.conftest import fed, make_fed  # noqa: F401
