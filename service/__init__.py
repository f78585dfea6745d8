"""The serving side: broker, worker processes, protocol, and the one-file client."""
