"""The CA onboarding page: how to trust proxytap's CA on each kind of client (pure HTML)."""

from __future__ import annotations

import html
from pathlib import Path

from proxytap.errors import ConfigError
from proxytap.intercept.ca import CA, load

# (platform, steps): what a person does with the downloaded certificate
STEPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "firefox",
        "Firefox (any system)",
        (
            "Download <a href='ca.pem'>ca.pem</a>.",
            "Settings &rarr; Privacy &amp; Security &rarr; Certificates &rarr; View "
            "Certificates &rarr; Authorities &rarr; Import.",
            "Tick <em>Trust this CA to identify websites</em>, then OK.",
        ),
    ),
    (
        "chromium",
        "Chromium and Chrome on Linux",
        (
            "Download <a href='ca.pem'>ca.pem</a>.",
            "Settings &rarr; Privacy and security &rarr; Security &rarr; Manage certificates "
            "&rarr; Authorities &rarr; Import, and trust it for identifying websites.",
            "Or from a shell: <code>certutil -d sql:$HOME/.pki/nssdb -A -t C,, "
            "-n proxytap -i ca.pem</code> (package libnss3-tools).",
        ),
    ),
    (
        "macos",
        "macOS (Safari, Chrome)",
        (
            "Download <a href='ca.pem'>ca.pem</a> and open it: Keychain Access adds it.",
            "Double-click <em>proxytap CA</em> &rarr; Trust &rarr; <em>When using this "
            "certificate: Always Trust</em>.",
            "Or: <code>sudo security add-trusted-cert -d -r trustRoot -k "
            "/Library/Keychains/System.keychain ca.pem</code>",
        ),
    ),
    (
        "windows",
        "Windows (Edge, Chrome)",
        (
            "Download <a href='ca.der'>ca.der</a> (or <a href='ca.p12'>ca.p12</a>) and open it.",
            "Install Certificate &rarr; Local Machine &rarr; <em>Place all certificates in "
            "the following store</em> &rarr; Trusted Root Certification Authorities.",
            "Or: <code>certutil -addstore root ca.der</code> in an administrator prompt.",
        ),
    ),
    (
        "debian",
        "Debian and Ubuntu (curl, wget, Python, system tools)",
        (
            "<code>sudo cp ca.pem /usr/local/share/ca-certificates/proxytap.crt</code>",
            "<code>sudo update-ca-certificates</code>",
            "Or per command: <code>curl --cacert ca.pem ...</code>, "
            "<code>SSL_CERT_FILE=ca.pem</code>, <code>REQUESTS_CA_BUNDLE=ca.pem</code>.",
        ),
    ),
    (
        "android",
        "Android",
        (
            "Download <a href='ca.der'>ca.der</a> in the browser.",
            "Settings &rarr; Security &rarr; Encryption &amp; credentials &rarr; Install a "
            "certificate &rarr; CA certificate, and pick the file.",
            "Apps targeting Android 7 or later trust user CAs only if they opt in; browsers do.",
        ),
    ),
    (
        "ios",
        "iOS and iPadOS",
        (
            "Open <a href='ca.pem'>ca.pem</a> in Safari and allow the profile download.",
            "Settings &rarr; General &rarr; VPN &amp; Device Management &rarr; install the "
            "<em>proxytap CA</em> profile.",
            "Settings &rarr; General &rarr; About &rarr; Certificate Trust Settings &rarr; "
            "turn on full trust for <em>proxytap CA</em>.",
        ),
    ),
)


def page(ca: CA, base: str = "") -> str:
    """The onboarding page for ``ca``; links are relative to ``base`` (``/`` or ``/ca/``)."""
    fp = html.escape(ca.fingerprint)
    subject = html.escape(ca.subject)
    until = f"{ca.cert.not_valid_after_utc:%Y-%m-%d}"
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        "<title>proxytap CA</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:46em;margin:2em auto;"
        "padding:0 1em;line-height:1.45}code{background:#f3f3f3;padding:0 .2em}"
        ".fp{font-family:monospace;word-break:break-all}</style></head><body>",
        "<h1>Trust proxytap's certificate authority</h1>",
        "<p>This network's proxy (proxytap) inspects TLS for some hosts. It presents "
        "certificates signed by its own CA, which your device must trust. Check the "
        "fingerprint below against the one your administrator gave you before you "
        "install it.</p>",
        f"<p>Subject: {subject}<br>Valid until: {until}<br>SHA-256 fingerprint:<br>"
        f"<span class='fp'>{fp}</span></p>",
        f"<p>Download: <a href='{base}ca.pem'>ca.pem</a> (PEM) &middot; "
        f"<a href='{base}ca.der'>ca.der</a> (DER) &middot; "
        f"<a href='{base}ca.p12'>ca.p12</a> (PKCS#12, certificate only)</p>",
    ]
    for anchor, title, steps in STEPS:
        items = "".join(
            f"<li>{s.replace(chr(39) + 'ca.', chr(39) + base + 'ca.')}</li>" for s in steps
        )
        parts.append(f"<h2 id='{anchor}'>{title}</h2><ol>{items}</ol>")
    parts.append("</body></html>")
    return "\n".join(parts)


__all__ = ["STEPS", "page"]


RESERVED_HOST = "proxytap.ca"  # http://proxytap.ca/ through the proxy: this page
_TYPES = {
    "pem": "application/x-pem-file",
    "der": "application/x-x509-ca-cert",
    "p12": "application/x-pkcs12",
}


def answer(ca_dir: str | Path, path: bytes) -> tuple[int, str, bytes]:
    """``http://proxytap.ca/PATH`` through the proxy: ``/`` the page, ``/ca.pem`` ...
    the certificate; ``(status, content type, body)``."""
    name = path.partition(b"?")[0].decode("latin-1")
    try:
        ca = load(Path(ca_dir))
    except ConfigError:
        ca = None
    if ca is None:
        text = "proxytap has no CA yet: 'proxytap ca init' creates one\n"
        return 404, "text/plain; charset=utf-8", text.encode()
    if name in ("/", "/ca", ""):
        return 200, "text/html; charset=utf-8", page(ca, "/").encode()
    fmt = name.removeprefix("/ca.")
    if name.startswith("/ca.") and fmt in _TYPES:
        return 200, _TYPES[fmt], ca.export(fmt)
    return 404, "text/plain; charset=utf-8", b"not found: try http://proxytap.ca/\n"
