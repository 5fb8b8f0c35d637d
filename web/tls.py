"""The HTTPS certificate: used as configured, or made once as a self-signed pair for this machine.

Nothing here ever replaces a file: a pair is made only where both files are missing, each file created
exclusively, and a half pair or an unusable pair stops start-up with a message naming both paths.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_DAYS = 825


class CertificateError(Exception):
    """The configured certificate and key cannot be served; the message names both files and the fix."""


def ensure_certificate(cert_file: Path, key_file: Path) -> bool:
    """Check that the pair can serve TLS, making a self-signed pair first when both files are missing.

    Returns whether a new pair was made.
    """
    present = [path for path in (cert_file, key_file) if path.exists()]
    made = not present
    if made:
        _make_self_signed_pair(cert_file, key_file)
    elif len(present) == 1:
        missing = key_file if present[0] == cert_file else cert_file
        raise CertificateError(
            f"{present[0]} exists but {missing} does not. The server makes a self-signed pair only when both "
            f"are missing and never replaces a file: put the matching file at {missing}, or point TLS_CERT_FILE "
            "and TLS_KEY_FILE at a complete pair (or at two paths that do not exist yet)."
        )
    check_pair(cert_file, key_file)
    return made


def check_pair(cert_file: Path, key_file: Path) -> None:
    """Load the pair as the server will, so a broken one stops start-up instead of every handshake."""
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError(
            f"The certificate {cert_file} and key {key_file} cannot serve HTTPS ({exc.strerror or exc}): "
            "check that both are readable PEM files that belong together, set TLS_CERT_FILE and TLS_KEY_FILE "
            "to such a pair, or to two missing paths to have a self-signed pair made there."
        ) from None


def _make_self_signed_pair(cert_file: Path, key_file: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    alt_names = x509.SubjectAlternativeName(
        [
            x509.DNSName("localhost"),
            x509.DNSName(socket.gethostname()),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(alt_names, critical=False)
        # A self-signed certificate is its own authority: clients trust it by naming the file.
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _create_exclusively(key_file, key_pem, 0o600)
    # Clients name this file to trust the server (curl --cacert), so any local user may read it.
    _create_exclusively(cert_file, certificate.public_bytes(serialization.Encoding.PEM), 0o644)


def _create_exclusively(path: Path, data: bytes, mode: int) -> None:
    """Write a new file; fail rather than replace one that appeared meanwhile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise CertificateError(f"{path} appeared while the server was making it; start again.") from None
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.chmod(path, mode)  # the umask may have narrowed it
    except BaseException:
        path.unlink(missing_ok=True)
        raise
