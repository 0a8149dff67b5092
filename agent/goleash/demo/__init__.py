"""`make demo`: goleash finds leaking goroutines and degrades a struggling HTTP/2
client to HTTP/1.1, then recovers it (see run.py)."""
