"""Helpers shared by several test modules (real sockets, real TLS; no mocks)."""
