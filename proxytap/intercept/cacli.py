"""``proxytap ca init | show | export``: the interception CA from the command line."""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Sequence
from pathlib import Path

from proxytap.errors import ConfigError
from proxytap.intercept import ca as calib

EPILOG = """\
examples:
  proxytap ca init                          create the CA in certs/ (tls.ca_dir)
  proxytap ca init --cert ca.pem --key ca.key   use an existing CA (e.g. from your PKI)
  proxytap ca show                          subject, validity, SHA-256 fingerprint
  proxytap ca export --format der --out proxytap-ca.cer   for a client to install
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="proxytap ca",
        description="The certificate authority proxytap signs intercepted hosts' "
        "certificates with (clients must trust it).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = argparse.ArgumentParser(add_help=False)
    group = where.add_mutually_exclusive_group()
    group.add_argument("--dir", metavar="DIR", help="the CA directory (default: tls.ca_dir)")
    group.add_argument("--config", "-c", metavar="FILE", help="take tls.ca_dir from this config")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = sub.add_parser("init", parents=[where], help="create the CA (or take an existing one)")
    init.add_argument("--cn", default=calib.DEFAULT_CN, help="the CA's common name")
    init.add_argument("--cert", metavar="PEM", help="an existing CA certificate to use")
    init.add_argument("--key", metavar="PEM", help="its private key (unencrypted PEM)")
    init.add_argument("--force", action="store_true", help="replace a CA that is already there")
    sub.add_parser("show", parents=[where], help="print the CA's subject, validity, fingerprint")
    export = sub.add_parser("export", parents=[where], help="write the certificate for clients")
    export.add_argument("--format", choices=calib.FORMATS, default="pem")
    export.add_argument("--out", metavar="FILE", help="default: standard output")
    return p


def _directory(args: argparse.Namespace) -> Path:
    if args.dir:
        return Path(args.dir)
    if args.config:
        from proxytap.config import load

        return Path(load(args.config).tls.ca_dir)
    from proxytap.config import TlsCheckConfig

    return Path(TlsCheckConfig().ca_dir)


def _describe(ca: calib.CA) -> str:
    c = ca.cert
    return (
        f"directory:   {ca.directory}\n"
        f"subject:     {ca.subject}\n"
        f"valid:       {c.not_valid_before_utc:%Y-%m-%d} to {c.not_valid_after_utc:%Y-%m-%d}\n"
        f"SHA-256:     {ca.fingerprint}\n"
        f"certificate: {ca.directory / calib.CERT_PEM} (PEM), "
        f"{ca.directory / calib.CERT_DER} (DER)\n"
        f"key:         {ca.directory / calib.KEY_FILE} (mode 0600)"
    )


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        directory = _directory(args)
        if args.action == "init":
            return _init(args, directory)
        ca = calib.load(directory)
    except ConfigError as exc:
        print(f"proxytap ca: {exc}", file=sys.stderr)
        return 2
    if ca is None:
        print(
            f"proxytap ca: no CA in {directory}; create one with 'proxytap ca init'",
            file=sys.stderr,
        )
        return 1
    if args.action == "show":
        print(_describe(ca))
        return 0
    data = ca.export(args.format)
    if args.out:
        Path(args.out).write_bytes(data)
        print(f"wrote {args.out} ({args.format}, SHA-256 {ca.fingerprint})", file=sys.stderr)
    else:
        sys.stdout.buffer.write(data)
    return 0


def _init(args: argparse.Namespace, directory: Path) -> int:
    if bool(args.cert) != bool(args.key):
        print("proxytap ca: --cert and --key go together", file=sys.stderr)
        return 2
    existing = calib.load(directory) if not args.force else None
    if existing is not None:
        print(
            f"proxytap ca: a CA is already in {directory} (SHA-256 {existing.fingerprint}); "
            "--force replaces it (clients that trust it then need the new one)",
            file=sys.stderr,
        )
        return 1
    if args.cert:
        ca = calib.import_ca(directory, Path(args.cert), Path(args.key))
    else:
        key = calib.new_key()
        cert = calib.build_ca(key, datetime.datetime.now(datetime.UTC), args.cn)
        ca = calib.save(directory, key, cert)
    print(_describe(ca))
    return 0
