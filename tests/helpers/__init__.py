"""Reusable pieces of the test suite (processes, backends, traffic, loops)."""
