"""Fixtures every test gets."""

import pytest

from federation.logs import LogLimiter


@pytest.fixture(autouse=True)
def _fresh_log_budgets():
    """Rate-limited log lines are per process: a test must not spend the next test's budget."""
    LogLimiter.reset_all()
    yield
