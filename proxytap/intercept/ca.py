"""proxytap's certificate authority: create, load, import and export it.

TLS interception (opt-in per host rule) signs a leaf certificate per host with
this CA; clients must trust it. Everything lives in one directory
(``tls.ca_dir``, ``certs/`` in a checkout):

* ``proxytap-ca.pem``: the private key and the certificate, PEM, mode 0600.
  The same layout as mitmproxy's ``<confdir>/mitmproxy-ca.pem``, so the
  embedded engine reads it as it is.
* ``proxytap-ca-cert.pem`` and ``proxytap-ca-cert.cer``: the certificate alone,
  PEM and DER, mode 0644: what clients install.

``ensure`` creates the CA on first use; ``import_ca`` takes an existing one
(PEM certificate and key, e.g. from an enterprise PKI). Certificate building is
pure (``build_ca`` takes the key and the time); the file functions are a thin
shell around it.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxytap.errors import ConfigError

BASENAME = "proxytap"
KEY_FILE = f"{BASENAME}-ca.pem"  # key + certificate, 0600
CERT_PEM = f"{BASENAME}-ca-cert.pem"
CERT_DER = f"{BASENAME}-ca-cert.cer"
DEFAULT_CN = "proxytap CA"
VALID_DAYS = 3650
FORMATS = ("pem", "der", "p12")

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class CA:
    """A loaded CA: its key, its certificate, and where it lives."""

    key: PrivateKey
    cert: x509.Certificate
    directory: Path

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the DER certificate, as browsers show it (``AB:CD:...``)."""
        return self.cert.fingerprint(hashes.SHA256()).hex(":").upper()

    @property
    def subject(self) -> str:
        return self.cert.subject.rfc4514_string()

    def export(self, fmt: str) -> bytes:
        """The certificate alone, for clients: ``pem``, ``der`` or ``p12`` (no key)."""
        if fmt == "pem":
            return self.cert.public_bytes(serialization.Encoding.PEM)
        if fmt == "der":
            return self.cert.public_bytes(serialization.Encoding.DER)
        if fmt == "p12":
            return pkcs12.serialize_key_and_certificates(
                DEFAULT_CN.encode(), None, self.cert, None, serialization.NoEncryption()
            )
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")


def build_ca(
    key: PrivateKey, now: datetime.datetime, common_name: str = DEFAULT_CN, days: int = VALID_DAYS
) -> x509.Certificate:
    """A self-signed CA certificate for ``key`` (pure: no I/O, ``now`` passed in).

    Valid from a day before ``now`` (clients with a clock behind accept it),
    may sign leaf certificates only (``pathlen=0``), and says what it is for.
    """
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "proxytap"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )


def new_key() -> rsa.RSAPrivateKey:
    """RSA 2048, what every client accepts and what mitmproxy's leaves expect."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def check_ca(cert: x509.Certificate, key: PrivateKey, now: datetime.datetime) -> str | None:
    """Why ``cert``/``key`` cannot serve as proxytap's CA, or None."""
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        return "the key does not belong to the certificate"
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return "the certificate has no basicConstraints: it is not a CA"
    if not bc.ca:
        return "the certificate is not a CA (basicConstraints CA:FALSE)"
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        return f"the certificate is not valid now ({cert.not_valid_after_utc:%Y-%m-%d} expiry)"
    return None


# -- files ------------------------------------------------------------------------------


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode`` from the start (never readable by others)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def save(directory: Path, key: PrivateKey, cert: x509.Certificate) -> CA:
    directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    _write(directory / KEY_FILE, _key_pem(key) + cert_pem, 0o600)
    _write(directory / CERT_PEM, cert_pem, 0o644)
    _write(directory / CERT_DER, cert.public_bytes(serialization.Encoding.DER), 0o644)
    return CA(key, cert, directory)


def load(directory: Path, key_name: str = "tls.ca_dir") -> CA | None:
    """The CA in ``directory``, or None when there is none yet."""
    path = directory / KEY_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(key_name, f"cannot read {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
        cert = x509.load_pem_x509_certificate(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(key_name, f"{path}: not a PEM key and certificate ({exc})") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigError(key_name, f"{path}: the key must be RSA or EC")
    problem = check_ca(cert, key, datetime.datetime.now(datetime.UTC))
    if problem is not None:
        raise ConfigError(key_name, f"{path}: {problem}")
    return CA(key, cert, directory)


def ensure(directory: Path, common_name: str = DEFAULT_CN) -> tuple[CA, bool]:
    """The CA in ``directory``, created if there is none; True when it was created now."""
    ca = load(directory)
    if ca is not None:
        return ca, False
    key = new_key()
    cert = build_ca(key, datetime.datetime.now(datetime.UTC), common_name)
    return save(directory, key, cert), True


def import_ca(directory: Path, cert_file: Path, key_file: Path) -> CA:
    """Take an existing CA (PEM certificate and PEM key, unencrypted) into ``directory``."""
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError("ca", f"cannot read {exc.filename}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError("ca", f"not a PEM certificate and unencrypted key: {exc}") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigError("ca", "the key must be RSA or EC")
    problem = check_ca(cert, key, datetime.datetime.now(datetime.UTC))
    if problem is not None:
        raise ConfigError("ca", problem)
    return save(directory, key, cert)


__all__ = ["CA", "FORMATS", "build_ca", "check_ca", "ensure", "import_ca", "load", "new_key"]
