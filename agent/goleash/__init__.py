"""goleash: find leaking goroutines in running Go services from the outside."""

__version__ = "0.1.0"
