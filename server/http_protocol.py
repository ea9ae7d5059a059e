"""uvicorn's h11 protocol with deadlines for each request's headers and body.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) but has no limit on how long a
client may take to send a request, so a client that trickles its headers in, or sends its headers
and then part of its body, keeps a connection (and a file descriptor) forever. Here a connection
whose next request's headers are not complete within `header_timeout` seconds of the connection
opening, or of the previous response ending, is closed; and a request whose body stops coming for
`body_timeout` seconds (between two reads, as nginx's `client_body_timeout`) is answered 408 and
its connection closed. A timeout of 0 is none (as gunicorn's `--timeout 0`). Header size stays bounded by h11 (`h11_max_incomplete_event_size`); body
size by `server/body_limit.py`.
"""
from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from server.errors import is_anthropic, route_error_body
from server.request_id import ANTHROPIC_HEADER, HEADER, request_id


def with_timeouts(header_timeout: float, body_timeout: float) -> type[H11Protocol]:
    class TimeoutH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._timed_cycle = None  # the request whose headers have arrived last
            self._header_deadline: asyncio.TimerHandle | None = None
            self._body_deadline: asyncio.TimerHandle | None = None
            self._arm_header_deadline()

        def _arm_header_deadline(self) -> None:
            self._disarm_header_deadline()
            if header_timeout > 0:  # (0: none)
                self._header_deadline = self.loop.call_later(header_timeout, self._header_deadline_passed,
                                                             self._timed_cycle)

        def _disarm_header_deadline(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _header_deadline_passed(self, cycle_at_arming) -> None:
            if self.cycle is cycle_at_arming and not self.transport.is_closing():
                self.transport.close()  # no new request's headers in time

        def _time_body(self) -> None:
            """From the request's headers to its body's end, a deadline `body_timeout` after its
            last bytes (each arrival moves it)."""
            self._disarm_body_deadline()
            cycle = self.cycle
            if body_timeout > 0 and cycle is not None and cycle.more_body and not cycle.response_complete:
                self._body_deadline = self.loop.call_later(body_timeout, self._body_deadline_passed, cycle)

        def _disarm_body_deadline(self) -> None:
            if self._body_deadline is not None:
                self._body_deadline.cancel()
                self._body_deadline = None

        def _body_deadline_passed(self, cycle) -> None:
            self._body_deadline = None
            if self.cycle is not cycle or not cycle.more_body or self.transport.is_closing():
                return
            if self.flow.read_paused or cycle.waiting_for_100_continue:  # the app has not read what came, or
                self._time_body()  # not yet asked for the body (Expect: 100-continue): not the client's wait
                return
            try:
                if not cycle.response_started:
                    self._write_408(cycle)
            finally:
                cycle.disconnected = True  # the app, which waits for the body, learns that the client left,
                cycle.message_event.set()  # and anything it sends now is dropped
                self.transport.close()

        def _write_408(self, cycle) -> None:
            message = f"the request's body stopped coming for {body_timeout:g} s (--body-timeout)"
            body = b"" if cycle.scope["method"] == "HEAD" else \
                json.dumps(route_error_body(cycle.scope, 408, message, code="request_timeout")).encode()
            stamp = request_id(cycle.scope["headers"])  # (the ids every answer carries: server/request_id.py)
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close"), (HEADER, stamp)]
            if is_anthropic(cycle.scope):
                headers.append((ANTHROPIC_HEADER, stamp))
            if self.access_log:  # (the line uvicorn writes for an answer, through the same filters)
                self.access_logger.info('%s - "%s %s HTTP/%s" %d', get_client_addr(cycle.scope),
                                        cycle.scope["method"], get_path_with_query_string(cycle.scope),
                                        cycle.scope["http_version"], 408)
            cycle.response_started = True
            try:
                for event in (h11.Response(status_code=408, headers=headers, reason=b"Request Timeout"),
                              h11.Data(data=body), h11.EndOfMessage()):
                    self.transport.write(self.conn.send(event))
            except h11.LocalProtocolError:  # a state h11 cannot answer from: the close alone
                pass

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and self.cycle is not self._timed_cycle:  # a request's headers are in
                self._timed_cycle = self.cycle
                self._disarm_header_deadline()
            self._time_body()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # may already start a pipelined request
            self._time_body()
            if self.cycle is not self._timed_cycle:
                self._timed_cycle = self.cycle
            elif not self.transport.is_closing():
                self._arm_header_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_deadline()
            self._disarm_body_deadline()
            super().connection_lost(exc)

    return TimeoutH11Protocol
