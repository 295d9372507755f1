"""ets: test-time compute scaling by tree search against a process reward model."""

__version__ = "0.1.0"
