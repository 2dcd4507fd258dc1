"""The interception CA: building it (pure), its files, importing one, the CLI and the admin API.

Checked with independent tools where one exists: ``openssl`` reads what the
CLI exports and verifies a leaf signed by the CA; Python's ``ssl`` loads the
certificate as a trust anchor.
"""

from __future__ import annotations

import datetime
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxytap.config import AdminConfig, Config, TlsCheckConfig
from proxytap.errors import ConfigError
from proxytap.intercept import ca as calib
from proxytap.intercept.onboarding import STEPS
from tests.conftest import TEST_ACCESS, ProxyFactory, run

PROXYTAP = (sys.executable, "-m", "proxytap")
NOW = datetime.datetime(2026, 12, 3, 12, 0, tzinfo=datetime.UTC)


@pytest.fixture(scope="module")
def key() -> calib.PrivateKey:
    return calib.new_key()


def test_build_ca_is_a_ca_for_leaves_only(key: calib.PrivateKey) -> None:
    cert = calib.build_ca(key, NOW, "Test CA", days=10)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Test CA"
    assert cert.not_valid_before_utc == NOW - datetime.timedelta(days=1)
    assert cert.not_valid_after_utc == NOW + datetime.timedelta(days=10)
    cert.verify_directly_issued_by(cert)  # self-signed, with SHA-256
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert calib.check_ca(cert, key, NOW) is None


def test_check_ca_names_what_is_wrong(key: calib.PrivateKey) -> None:
    cert = calib.build_ca(key, NOW, days=10)
    other = ec.generate_private_key(ec.SECP256R1())
    assert calib.check_ca(cert, other, NOW) == "the key does not belong to the certificate"
    later = NOW + datetime.timedelta(days=11)
    assert "not valid now" in (calib.check_ca(cert, key, later) or "")
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
        .issuer_name(cert.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    assert "not a CA" in (calib.check_ca(leaf, key, NOW) or "")


def test_ensure_creates_once_with_private_key_0600(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    ca, created = calib.ensure(d)
    assert created
    assert stat.S_IMODE((d / calib.KEY_FILE).stat().st_mode) == 0o600
    for name in (calib.CERT_PEM, calib.CERT_DER):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o644
    assert b"PRIVATE KEY" not in (d / calib.CERT_PEM).read_bytes()
    again, created = calib.ensure(d)
    assert not created and again.fingerprint == ca.fingerprint
    # what clients trust: Python's ssl takes it as a trust anchor
    ssl.create_default_context(cafile=str(d / calib.CERT_PEM))


def test_load_refuses_a_broken_ca(tmp_path: Path) -> None:
    (tmp_path / calib.KEY_FILE).write_text("not a pem\n")
    with pytest.raises(ConfigError) as err:
        calib.load(tmp_path)
    assert err.value.key == "tls.ca_dir" and "not a PEM key and certificate" in err.value.problem


def test_import_an_existing_ca(tmp_path: Path, key: calib.PrivateKey) -> None:
    cert = calib.build_ca(key, datetime.datetime.now(datetime.UTC), "Enterprise Root")
    (tmp_path / "root.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "root.key").write_bytes(calib._key_pem(key))
    ca = calib.import_ca(tmp_path / "certs", tmp_path / "root.pem", tmp_path / "root.key")
    assert ca.cert == cert
    loaded = calib.load(tmp_path / "certs")
    assert loaded is not None and loaded.cert == cert
    other = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "other.key").write_bytes(calib._key_pem(other))
    with pytest.raises(ConfigError, match="does not belong"):
        calib.import_ca(tmp_path / "x", tmp_path / "root.pem", tmp_path / "other.key")


def _openssl(*args: str, data: bytes | None = None) -> str:
    done = subprocess.run(["openssl", *args], input=data, capture_output=True, check=True)
    return done.stdout.decode()


async def test_cli_init_show_export(tmp_path: Path) -> None:
    d = str(tmp_path / "certs")
    rc, out, err = await run(*PROXYTAP, "ca", "show", "--dir", d)
    assert rc == 1 and b"proxytap ca init" in err
    rc, out, err = await run(*PROXYTAP, "ca", "init", "--dir", d, "--cn", "Lab CA")
    assert rc == 0, err
    fingerprint = next(
        line.split()[-1] for line in out.decode().splitlines() if line.startswith("SHA-256")
    )
    rc, _, err = await run(*PROXYTAP, "ca", "init", "--dir", d)
    assert rc == 1 and b"already" in err and b"--force" in err
    for fmt, inform in (("pem", "PEM"), ("der", "DER")):
        out_file = tmp_path / f"ca.{fmt}"
        rc, _, err = await run(*PROXYTAP, "ca", "export", "--dir", d, "--format", fmt,
                               "--out", str(out_file))  # fmt: skip
        assert rc == 0, err
        text = _openssl("x509", "-inform", inform, "-in", str(out_file), "-noout", "-subject",
                        "-fingerprint", "-sha256")  # fmt: skip
        assert "CN = Lab CA" in text and fingerprint in text
    rc, p12, err = await run(*PROXYTAP, "ca", "export", "--dir", d, "--format", "p12")
    assert rc == 0 and p12, err
    text = _openssl("pkcs12", "-nokeys", "-passin", "pass:", data=p12)
    assert "CN = Lab CA" in text or "CN=Lab CA" in text
    assert "PRIVATE KEY" not in text  # the bundle for clients has no key


async def test_admin_serves_the_ca_and_the_page(start_proxy: ProxyFactory, tmp_path: Path) -> None:
    ca, _ = calib.ensure(tmp_path / "certs")
    cfg = Config(
        access=TEST_ACCESS,
        admin=AdminConfig("127.0.0.1:0", token="s3cret-token"),
        tls=TlsCheckConfig(ca_dir=str(tmp_path / "certs")),
    )
    proxy = await start_proxy(cfg)
    assert proxy.app.admin is not None
    host, port = proxy.app.admin.addresses()[0]
    base = f"http://{host}:{port}"
    async with aiohttp.ClientSession() as session:  # no token: the CA is public
        async with session.get(f"{base}/ca.pem") as r:
            assert r.status == 200
            pem = await r.read()
        assert x509.load_pem_x509_certificate(pem) == ca.cert
        assert b"PRIVATE KEY" not in pem
        async with session.get(f"{base}/ca.der") as r:
            assert r.status == 200 and r.content_type == "application/x-x509-ca-cert"
            assert x509.load_der_x509_certificate(await r.read()) == ca.cert
        async with session.get(f"{base}/ca.p12") as r:
            assert r.status == 200 and r.content_type == "application/x-pkcs12"
        async with session.get(f"{base}/ca") as r:
            assert r.status == 200 and r.content_type == "text/html"
            page = await r.text()
        async with session.get(f"{base}/metrics") as r:
            assert r.status == 401  # the rest still needs the token
    assert ca.fingerprint in page
    for anchor, title, _ in STEPS:
        assert f"id='{anchor}'" in page and title in page
    for name in ("Firefox", "Chromium", "macOS", "Windows", "Debian", "Android", "iOS"):
        assert name in page
    assert "href='/ca.pem'" in page and "href='/ca.der'" in page
