"""Errors of the server process (the client's exceptions live in `service/client.py`)."""


class StartupError(RuntimeError):
    """The server could not start: the message says why (bad model, port in use, ...)."""
