"""gunicorn's threaded worker, made safe against idle and slow clients: a connection holds a thread only
while its bytes arrive, and must finish its TLS handshake and request head within a deadline."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time

from gunicorn import http, util
from gunicorn import sock as gunicorn_sock
from gunicorn.http import errors
from gunicorn.workers.gthread import _DEFER, TConn, ThreadWorker


def worker_class(head_timeout_s: float) -> type[ThreadWorker]:
    """The worker class gunicorn is given: HeadTimedWorker with the configured deadline."""
    return type("HeadTimedWorker", (HeadTimedWorker,), {"head_timeout_s": head_timeout_s})


class HeadTimedWorker(ThreadWorker):
    """gunicorn's gthread worker does the TLS handshake in a pool thread, blocking on the client. Here the
    handshake runs non-blocking: whenever it waits for the client, the connection goes back to the
    poller and the thread is free, so idle clients cost no thread. From its first byte to the end of
    its headers a request gets `head_timeout_s` seconds; past that its socket is shut, which also frees
    a thread blocked on reading the head. The body and the answer (an event stream) are not limited."""

    head_timeout_s = 10.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadlines: dict[TConn, float] = {}
        # Guards the deadlines and each connection's socket while it is being wrapped in TLS.
        self._heads_lock = threading.Lock()

    def handle(self, conn: TConn):
        if not conn.initialized:
            # A new connection with nothing to read yet waits in the poller, not in a thread.
            if not conn.wait_for_data(0):
                return _DEFER
            if self.cfg.is_ssl and conn.parser is None and (waiting := self._continue_handshake(conn)) is not None:
                return waiting
        with self._heads_lock:
            self._head_deadlines.setdefault(conn, time.monotonic() + self.head_timeout_s)
        return super().handle(conn)

    def handle_request(self, req, conn: TConn):
        """The head has arrived: from here on the request takes as long as it takes."""
        with self._heads_lock:
            self._head_deadlines.pop(conn, None)
        return super().handle_request(req, conn)

    def murder_pending(self) -> None:
        """Runs on the main loop at least once a second: also end the heads that are overdue."""
        super().murder_pending()
        now = time.monotonic()
        with self._heads_lock:
            overdue = [conn for conn, deadline in self._head_deadlines.items() if deadline <= now]
            for conn in overdue:
                del self._head_deadlines[conn]
                _shut(conn.sock)

    def set_accept_enabled(self, enabled: bool) -> None:
        """Stopping (SIGTERM), also close the listening sockets: gunicorn 27 only stops accepting, so the
        kernel would go on taking connections that no one answers until the grace period ends; closed,
        new clients are refused at once and can go elsewhere."""
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive:
            for listener in self.sockets:
                listener.close()

    def handle_error(self, req, client, addr, exc) -> None:
        """Requests gunicorn refuses before the app sees them get the API's JSON error, saying what to fix,
        rather than gunicorn's HTML page; anything else (a failure of the app itself) is gunicorn's."""
        answer = _refusal(exc, self.cfg)
        if answer is None:
            return super().handle_error(req, client, addr, exc)
        status, reason, message = answer
        self.log.warning("Invalid request from ip=%s: %s", (addr or ("",))[0], exc)
        body = json.dumps({"error": message}).encode()
        head = (
            f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nX-Content-Type-Options: nosniff\r\n\r\n"
        )
        try:
            util.write_nonblock(client, head.encode("latin-1") + body)
        except OSError:
            self.log.debug("Failed to send error message.")

    def _continue_handshake(self, conn: TConn) -> object:
        """Take the TLS handshake as far as the client's bytes allow: None once done (the connection
        then has its HTTP parser), else what `handle` answers: _DEFER to wait for the client in the
        poller, False to close a connection whose handshake failed."""
        with self._heads_lock:
            self._head_deadlines.setdefault(conn, time.monotonic() + self.head_timeout_s)
            if not isinstance(conn.sock, ssl.SSLSocket):
                conn.sock = gunicorn_sock.ssl_wrap_socket(conn.sock, self.cfg)
        conn.sock.setblocking(False)
        try:
            conn.sock.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return _DEFER
        except OSError as error:  # ssl.SSLError included: not TLS, or the client went away
            self.log.debug("TLS handshake failed: %s", error)
            _shut(conn.sock)
            return False
        # Set, the parser tells TConn.init that the socket is ready (it would wrap it once more).
        conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
        # A client may connect ahead of its request (browsers do): it waits in the poller too.
        conn.data_ready = False
        return None if conn.sock.pending() or conn.wait_for_data(0) else _DEFER


_MALFORMED = (
    errors.InvalidRequestLine, errors.InvalidRequestMethod, errors.InvalidHTTPVersion, errors.InvalidHeader,
    errors.InvalidHeaderName, errors.ObsoleteFolding, errors.InvalidChunkSize, errors.ChunkMissingTerminator,
    errors.InvalidChunkExtension, errors.InvalidSchemeHeaders, errors.InvalidProxyLine,
)


def _refusal(exc: Exception, cfg) -> tuple[int, str, str] | None:
    """Status, reason and message for a request gunicorn's parser refused; None for other failures."""
    if isinstance(exc, (errors.InvalidResponseHeader, errors.InvalidResponseHeaderName)):
        return None  # the app's answer was bad, not the request
    if isinstance(exc, errors.LimitRequestLine):
        return 414, "URI Too Long", (
            f"The request line is too long ({exc}): URLs are limited to {cfg.limit_request_line} bytes; "
            "send the fields in the form body instead of the query string."
        )
    if isinstance(exc, errors.LimitRequestHeaders):
        return 431, "Request Header Fields Too Large", (
            f"The request headers are too large ({exc}): at most {cfg.limit_request_fields} headers of "
            f"{cfg.limit_request_field_size} bytes each; drop the large or repeated ones (cookies?)."
        )
    if isinstance(exc, errors.UnsupportedTransferCoding):
        return 501, "Not Implemented", f"{exc}; send the body with Content-Length or chunked encoding."
    if isinstance(exc, errors.ExpectationFailed):
        return 417, "Expectation Failed", f"{exc}; the only Expect this server takes is 100-continue."
    if isinstance(exc, _MALFORMED):
        return 400, "Bad Request", f"Malformed HTTP request ({exc}); send a valid HTTP/1.1 request."
    return None


def _shut(connection: socket.socket) -> None:
    """End a connection at the TCP level, from any thread: a read blocked on it returns, and the
    graceful close that follows does not wait for the client. The TLS layer is bypassed on purpose."""
    try:
        socket.socket.shutdown(connection, socket.SHUT_RDWR)
    except OSError:
        pass
