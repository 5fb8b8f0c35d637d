"""Idle and slow clients against a live server: connections that send nothing, half a TLS handshake or
a trickle of headers never keep others from being served; slow clients are cut off at
REQUEST_HEAD_TIMEOUT_S, while slow bodies are not."""

from __future__ import annotations

import socket
import ssl
import time
from contextlib import ExitStack

import pytest
import requests

from tests.conftest import API_KEY, LiveServer
from tests.figures import record
from tests.images import png_bytes

THREADS = 4
HEAD_TIMEOUT_S = 2
IDLE_CONNECTIONS = 4 * THREADS


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = LiveServer(
        tmp_path_factory.mktemp("slow"), HTTP_THREADS=str(THREADS), REQUEST_HEAD_TIMEOUT_S=str(HEAD_TIMEOUT_S)
    )
    server.wait_until_healthy()
    yield server
    server.stop()


def health_seconds(server: LiveServer) -> float:
    started = time.monotonic()
    assert requests.get(f"{server.url}/health", verify=server.cert, timeout=10).ok
    return time.monotonic() - started


def tls_connection(server: LiveServer) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=server.cert)
    connection = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return context.wrap_socket(connection, server_hostname="localhost")


def test_idle_connections_do_not_hold_the_server(server):
    """The issue's attack, four times the threads over: each connection sends the first byte of a TLS
    handshake (or nothing) and waits. /health answers within a second all along."""
    with ExitStack() as stack:
        for index in range(IDLE_CONNECTIONS):
            idle = stack.enter_context(socket.create_connection(("127.0.0.1", server.port), timeout=10))
            if index % 2:
                idle.sendall(b"\x16")
        slowest = max(health_seconds(server) for _ in range(5))
    record(idle_connections=IDLE_CONNECTIONS, idle_http_threads=THREADS, idle_health_max_ms=round(slowest * 1000))
    assert slowest < 1, slowest


def test_a_trickled_request_head_is_cut_off_at_the_deadline_and_others_are_served(server):
    tricklers = [tls_connection(server) for _ in range(THREADS)]
    started = time.monotonic()
    for trickler in tricklers:
        trickler.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
    cut_off_after = None
    while cut_off_after is None and time.monotonic() - started < HEAD_TIMEOUT_S + 5:
        time.sleep(0.25)
        try:
            for trickler in tricklers:
                trickler.sendall(b"X")
        except OSError:
            cut_off_after = time.monotonic() - started
    assert cut_off_after is not None and HEAD_TIMEOUT_S - 0.5 < cut_off_after < HEAD_TIMEOUT_S + 2.5, cut_off_after
    for trickler in tricklers:
        trickler.close()
    assert health_seconds(server) < 1


def test_a_slow_body_is_not_cut_off(server):
    """The deadline is on the head only: an upload that takes longer than it still gets its answer."""
    boundary = "slowbody"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"p.png\"\r\n"
        "Content-Type: image/png\r\n\r\n"
    ).encode() + png_bytes() + f"\r\n--{boundary}--\r\n".encode()
    head = (
        f"POST /preprocess HTTP/1.1\r\nHost: localhost\r\nx-api-key: {API_KEY}\r\nConnection: close\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with tls_connection(server) as connection:
        connection.sendall(head)
        pieces = 6
        for index in range(pieces):
            connection.sendall(body[index * len(body) // pieces:(index + 1) * len(body) // pieces])
            time.sleep((HEAD_TIMEOUT_S + 1) / pieces)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
