"""uvicorn's h11 protocol with a deadline for each request's headers.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) but has no limit on how long a
client may take to send a request's headers, so a client that trickles them in keeps a
connection (and a file descriptor) forever. Here a connection whose next request's headers are
not complete within `header_timeout` seconds of the connection opening, or of the previous
response ending, is closed. Header size stays bounded by h11 (`h11_max_incomplete_event_size`).
"""
from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


def with_header_timeout(header_timeout: float) -> type[H11Protocol]:
    class HeaderTimeoutH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._timed_cycle = None  # the request whose headers have arrived last
            self._header_deadline: asyncio.TimerHandle | None = None
            self._arm_header_deadline()

        def _arm_header_deadline(self) -> None:
            self._disarm_header_deadline()
            self._header_deadline = self.loop.call_later(header_timeout, self._header_deadline_passed,
                                                         self._timed_cycle)

        def _disarm_header_deadline(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _header_deadline_passed(self, cycle_at_arming) -> None:
            if self.cycle is cycle_at_arming and not self.transport.is_closing():
                self.transport.close()  # no new request's headers in time

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and self.cycle is not self._timed_cycle:  # a request's headers are in
                self._timed_cycle = self.cycle
                self._disarm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # may already start a pipelined request
            if self.cycle is not self._timed_cycle:
                self._timed_cycle = self.cycle
            elif not self.transport.is_closing():
                self._arm_header_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_deadline()
            super().connection_lost(exc)

    return HeaderTimeoutH11Protocol
