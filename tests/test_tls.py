"""The server's certificate: its own settings, never a file it did not make, never an unusable pair."""

from __future__ import annotations

import shutil
import ssl
import stat
from pathlib import Path

import certifi
import pytest
import requests

from tests.conftest import LiveServer

# A CA bundle as machines have one: the system's, or certifi's where the system has none.
_SYSTEM_BUNDLE = Path(ssl.get_default_verify_paths().openssl_cafile)
CA_BUNDLE = _SYSTEM_BUNDLE if _SYSTEM_BUNDLE.is_file() else Path(certifi.where())


def exit_output(server: LiveServer) -> tuple[int, str]:
    try:
        return server.process.wait(timeout=120), server.output()
    finally:
        server.log.close()


def test_ssl_cert_file_of_the_environment_is_left_alone_and_a_pair_is_made_under_tls_names(tmp_path):
    # Machines and conda environments set OpenSSL's SSL_CERT_FILE to the trusted CA bundle.
    bundle = tmp_path / "ca-certificates.crt"
    shutil.copyfile(CA_BUNDLE, bundle)
    before, mode = bundle.read_bytes(), bundle.stat().st_mode
    server = LiveServer(tmp_path, SSL_CERT_FILE=str(bundle), SSL_KEY_FILE=str(tmp_path / "ca-key.pem"))
    try:
        server.wait_until_healthy()
        assert requests.get(f"{server.url}/health", verify=str(server.cert), timeout=10).ok
    finally:
        assert server.stop() == 0
    assert bundle.read_bytes() == before and bundle.stat().st_mode == mode
    assert not (tmp_path / "ca-key.pem").exists()
    assert "created a self-signed certificate" in server.output()


def test_made_certificate_is_readable_by_clients_and_the_key_private(live_server):
    cert_mode = stat.S_IMODE(live_server.cert.stat().st_mode)
    key_mode = stat.S_IMODE((live_server.cert.parent / "key.pem").stat().st_mode)
    assert (cert_mode, key_mode) == (0o644, 0o600)


@pytest.mark.parametrize("present", ["cert.pem", "key.pem"])
def test_half_a_pair_stops_start_up_naming_both_files_and_is_not_replaced(tmp_path, present):
    folder = tmp_path / "ssl_cert"
    folder.mkdir()
    (folder / present).write_bytes(b"someone else's file\n")
    code, output = exit_output(LiveServer(tmp_path))
    assert code != 0 and "Listening" not in output
    assert str(folder / "cert.pem") in output and str(folder / "key.pem") in output
    assert (folder / present).read_bytes() == b"someone else's file\n"
    assert sorted(path.name for path in folder.iterdir()) == [present]


def test_unusable_pair_stops_start_up_instead_of_listening(tmp_path):
    folder = tmp_path / "ssl_cert"
    folder.mkdir()
    shutil.copyfile(CA_BUNDLE, folder / "cert.pem")
    (folder / "key.pem").write_text("not a key\n")
    code, output = exit_output(LiveServer(tmp_path))
    assert code != 0 and "Listening" not in output
    assert "cannot serve HTTPS" in output and "TLS_CERT_FILE" in output
    assert "Traceback" not in output
