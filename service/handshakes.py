"""Saying, in the server's log, that something speaks the wrong protocol at its ZeroMQ port.

Such a peer never reaches the broker's loop: ZeroMQ ends its connection during the handshake, and
the peer is left waiting (the 2019 client forever, its timeout being -1). A socket monitor on the
port's socket shows it, though not who it was (libzmq 4.3.5, measured):

    bert-serving-client (2019)   its PUSH socket is refused by our ROUTER: HANDSHAKE_FAILED_NO_DETAIL
                                 (errno EPIPE) once it has sent, or a disconnect with no handshake event
    HTTP, or anything not ZMTP   HANDSHAKE_FAILED_NO_DETAIL (ECONNRESET) when it gives up
    a TCP probe, a port scan     the same as HTTP

The errno does not tell them apart reliably, so one line names every likely cause and its fix. It
is logged the first time, then at most once per LOG_INTERVAL with a count: a load balancer's TCP
probe must not fill the log.
"""
from __future__ import annotations

import logging

import zmq

log = logging.getLogger(__name__)

LOG_INTERVAL = 3600.0        # seconds between two lines about the same kind of stranger
EVENTS = (zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
          | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
          | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
          | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
INVALID_METADATA = getattr(zmq, "PROTOCOL_ERROR_ZMTP_INVALID_METADATA", 0x10000018)  # a refused socket type


def wrong_protocol_hint(port: int, v1_ports: tuple[int, int] | None) -> str:
    """The line logged when a peer is turned away during the handshake."""
    if v1_ports:
        v1 = f"point it at -v1_port {v1_ports[0]} and -v1_port_out {v1_ports[1]} instead"
    else:
        v1 = "start the server with -v1_port and -v1_port_out for it"
    return (f"a peer at port {port} was turned away during the ZeroMQ handshake: it does not speak this port's "
            "protocol (service.client.BertClient, one DEALER socket). bert-serving-client (2019) does this "
            f"(PUSH/SUB sockets): {v1}, see the README's 'Coming from bert-serving-client (2019)'. HTTP goes to "
            "-http_port. A load balancer's TCP probe also shows as this")


class HandshakeWatch:
    """Reads the client port's monitor events (handed over by the broker, which owns the socket's one
    monitor) and logs peers turned away during the handshake."""

    def __init__(self, port: int, v1_ports: tuple[int, int] | None = None) -> None:
        self.hint = wrong_protocol_hint(port, v1_ports)
        self.open: dict[int, bool] = {}          # fd -> handshake done, per accepted connection
        self.count = 0                           # peers turned away since the last line
        self.total = 0                           # peers turned away since start (server_status)
        self.logged = -LOG_INTERVAL

    def on_event(self, event: int, value: int, now: float) -> None:
        """`value` is the connection's fd, except for failed handshakes (an error code)."""
        if event == zmq.EVENT_ACCEPTED:
            self.open[value] = False
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED or event & FAILED:
            # No fd in these events: the connections open before one are taken as explained by it
            # (a refused CurveZMQ key is the authenticator's to report, not a wrong protocol).
            self.open.clear()
            if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL or \
                    event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == INVALID_METADATA:
                self.note(now)
        elif event == zmq.EVENT_DISCONNECTED and self.open.pop(value, True) is False:
            self.note(now)  # ended with no handshake event: the peer's socket type was refused

    def note(self, now: float) -> None:
        self.count += 1
        self.total += 1
        if now - self.logged >= LOG_INTERVAL:
            times = f" ({self.count} peers since this was last logged)" if self.count > 1 else ""
            log.warning("%s%s", self.hint, times)
            self.logged, self.count = now, 0
