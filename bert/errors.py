"""Errors raised while turning a checkpoint folder into an encoder."""


class CheckpointError(ValueError):
    """A model folder is missing, incomplete, corrupt, or holds an unsupported architecture.

    The message always names the file (or folder) and what is wrong with it, because it is
    printed to the operator before the server opens any socket.
    """
