"""Slow and greedy clients cannot hold the server's connections: limits uvicorn does not have, added to its protocol.

uvicorn (vLLM's HTTP server) arms a timer only between requests on a kept-alive connection, and disarms it at the
first byte that arrives: a client that opens connections and sends nothing, or one header line every few seconds,
holds each connection for ever. Production servers bound that (nginx's ``client_header_timeout``, ``limit_conn``).
:func:`apply` adds both to uvicorn's HTTP protocol classes, in vLLM's API server process (lorafoundry's plugin):

- the request head (request line and headers) must be complete within :data:`HEAD_TIMEOUT_S` of the connection
  being opened, or of the first byte of the next request on a kept-alive connection (idle kept-alive connections
  keep uvicorn's own timeout), else the connection is closed;
- one client address holds at most :data:`MAX_CONNECTIONS_PER_CLIENT` open connections; more are closed at once.

The body's own time limit is the guard's (``BODY_TIMEOUT_S`` in serving/settings.py), which answers 408.
"""

from __future__ import annotations

from serving.settings import HEAD_TIMEOUT_S, MAX_CONNECTIONS_PER_CLIENT


def apply(protocol: type) -> None:
    """Add the head timeout and the per-client connection limit to a uvicorn HTTP protocol class (h11 or
    httptools: both keep ``connections``, ``client``, ``transport``, ``loop`` and ``cycle``, and set ``scope`` when
    a request's head is complete). Applying twice changes nothing."""
    if getattr(protocol, "_lorafoundry_limits", False):
        return
    made, received = protocol.connection_made, protocol.data_received

    def connection_made(self, transport) -> None:
        made(self, transport)
        host = self.client[0] if self.client else None
        if host is not None and sum(1 for c in self.connections if c.client and c.client[0] == host) > (
            MAX_CONNECTIONS_PER_CLIENT
        ):
            transport.close()
            return
        _arm(self)  # a new connection owes its first request head

    def data_received(self, data: bytes) -> None:
        between_requests = self.cycle is None or self.cycle.response_complete
        if between_requests and getattr(self, "_lorafoundry_head_timer", None) is None:
            _arm(self)  # the first bytes of the next request on a kept-alive connection: its head is owed
        scope = self.scope
        received(self, data)
        if self.scope is not scope:  # a request's head is complete: the body has the guard's limit
            _disarm(self)

    protocol.connection_made = connection_made
    protocol.data_received = data_received
    protocol._lorafoundry_limits = True


def _arm(conn) -> None:
    _disarm(conn)
    conn._lorafoundry_head_timer = conn.loop.call_later(HEAD_TIMEOUT_S, _close_if_open, conn)


def _disarm(conn) -> None:
    timer = getattr(conn, "_lorafoundry_head_timer", None)
    if timer is not None:
        timer.cancel()
        conn._lorafoundry_head_timer = None


def _close_if_open(conn) -> None:
    if not conn.transport.is_closing():
        conn.transport.close()
