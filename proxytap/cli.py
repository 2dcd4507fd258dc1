"""Command line: ``proxytap run | check-config | tap | flows``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from collections.abc import Sequence

from proxytap import __version__
from proxytap.config import (
    ADMIN_OFF,
    DEFAULT_ADMIN,
    Config,
    ListenerConfig,
    load,
    parse_hostport,
)
from proxytap.errors import ConfigError

DESCRIPTION = """\
proxytap: an explicit forwarding proxy (HTTP CONNECT, plain HTTP, SOCKS4/4a/5)
that mirrors every decapsulated inner flow, keyed by the true client and the
true destination, to SF-TAP analyzers.
"""

EPILOG = """\
examples:
  proxytap run                                  HTTP on 127.0.0.1:8080, SOCKS on 127.0.0.1:1080
  proxytap run --mixed 0.0.0.0:3128 --sftap-home /tmp/sf-tap
  proxytap run --allow-dest 10.0.0.0/8 --connect-ports 443,8443 --htpasswd /etc/proxytap/users
  proxytap run --config /etc/proxytap/proxytap.toml
  proxytap check-config deploy/proxytap.example.toml
  proxytap run --admin 127.0.0.1:9091 --log-flows /var/log/proxytap/flows.json
  proxytap run --pcap /var/lib/proxytap/pcap   inner flows as TCP/IP packets (Wireshark, Zeek)
  proxytap run --pcap-listen 127.0.0.1:57012    PCAP-over-IP: nc 127.0.0.1 57012 | tshark -r -
  proxytap tap /tmp/sf-tap/tcp/http --hexdump
  proxytap ca init                              the interception CA in certs/ (tls.ca_dir)
  proxytap flows --once                         the live flow table, from the admin API
  proxytap flows --stats                        one line of totals and rates every 2 s
"""


def setup_logging(level: str, fmt: str) -> None:
    """All logging to stderr, batched per event-loop iteration (``proxytap.logstream``)."""
    from proxytap.logstream import install

    install(sys.stderr, level, fmt)


def _hostport(text: str) -> str:
    try:
        parse_hostport(text, "address")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(exc.problem) from None
    return text


ADMIN_TOKEN_ENV = "PROXYTAP_ADMIN_TOKEN"


def _admin_address(text: str) -> str:
    if text == ADMIN_OFF:
        return text
    return _hostport(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxytap",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"proxytap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the proxy", description="Run the proxy.")
    run.add_argument("--config", "-c", metavar="FILE", help="TOML config file")
    for kind, what in (
        ("http", "an HTTP proxy listener (CONNECT and plain HTTP)"),
        ("socks", "a SOCKS4/4a/5 listener"),
        ("mixed", "a listener speaking HTTP and SOCKS, picked by the first byte"),
    ):
        run.add_argument(
            f"--{kind}",
            metavar="HOST:PORT",
            action="append",
            type=_hostport,
            default=[],
            help=f"{what}; repeatable; any listener flag replaces the config's listeners",
        )
    run.add_argument("--sftap-home", metavar="DIR", help="serve SF-TAP flow sockets under DIR")
    run.add_argument("--loopback7", metavar="PATH", help="feed a running abstractor's loopback7")
    run.add_argument(
        "--pcap",
        metavar="DIR",
        help="write every inner flow as TCP/IP packets to pcap files in DIR",
    )
    run.add_argument(
        "--pcap-listen",
        metavar="HOST:PORT",
        type=_hostport,
        help="PCAP-over-IP: stream the packets to every TCP reader of HOST:PORT",
    )
    run.add_argument(
        "--export-overload",
        choices=["drop", "wait"],
        help="when an analyzer or loopback7 is behind: drop export data (default) or "
        "wait: pause the flow, at most export.max_wait seconds (lossless export)",
    )
    run.add_argument("--idle-timeout", type=float, metavar="SECONDS", help="relay idle timeout")
    run.add_argument(
        "--allow-dest",
        metavar="CIDR",
        action="append",
        default=[],
        help="exempt CIDR from the default-denied destinations (loopback, private, "
        "link-local, metadata); repeatable",
    )
    run.add_argument(
        "--connect-ports",
        metavar="PORTS",
        help="ports HTTP CONNECT may open, e.g. 443,8443,9000-9100 (default: 443)",
    )
    run.add_argument("--htpasswd", metavar="FILE", help="require authentication (htpasswd file)")
    run.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="default: info"
    )
    run.add_argument("--log-format", choices=["text", "json"], help="default: text")
    run.add_argument(
        "--admin",
        metavar="HOST:PORT",
        type=_admin_address,
        help=f"admin HTTP server (/metrics, /healthz, /readyz, /flows, ...) or 'off' "
        f"(default: {DEFAULT_ADMIN})",
    )
    run.add_argument(
        "--admin-token",
        metavar="TOKEN",
        help="require 'Authorization: Bearer TOKEN' on the admin API (not on /healthz, "
        f"/readyz); default: ${ADMIN_TOKEN_ENV} if set (keeps the token out of ps)",
    )
    run.add_argument(
        "--log-flows",
        metavar="PATH",
        help="append one JSON object per finished flow to PATH (reopened on SIGHUP)",
    )

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")

    tap = sub.add_parser("tap", help="print the events of an SF-TAP flow socket", add_help=False)
    tap.add_argument("rest", nargs=argparse.REMAINDER)
    sub.add_parser(
        "ca", help="the interception CA: init, show, export (proxytap ca -h)", add_help=False
    )
    flows = sub.add_parser(
        "flows", help="show the live flow table or running totals (admin API)", add_help=False
    )
    flows.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = load(args.config) if args.config else Config()
    listeners = [
        ListenerConfig(kind=kind, address=addr, name=f"{kind}{i if i else ''}")
        for kind in ("http", "socks", "mixed")
        for i, addr in enumerate(getattr(args, kind))
    ]
    if listeners:
        cfg = dataclasses.replace(cfg, listeners=tuple(listeners))
    export = cfg.export
    if args.sftap_home:
        export = dataclasses.replace(export, sftap_home=args.sftap_home)
    if args.loopback7:
        export = dataclasses.replace(export, loopback7=args.loopback7)
    if args.export_overload:
        export = dataclasses.replace(
            export, overload=args.export_overload, loopback7_overload=args.export_overload
        )
    if args.pcap or args.pcap_listen:
        pcap = export.pcap
        if args.pcap:
            pcap = dataclasses.replace(pcap, dir=args.pcap)
        if args.pcap_listen:
            pcap = dataclasses.replace(pcap, listen=args.pcap_listen)
        export = dataclasses.replace(export, pcap=pcap)
    cfg = dataclasses.replace(cfg, export=export)
    access = cfg.access
    if args.allow_dest:
        access = dataclasses.replace(access, allow_dest=(*access.allow_dest, *args.allow_dest))
    if args.connect_ports:
        ports = tuple(p.strip() for p in args.connect_ports.split(",") if p.strip())
        access = dataclasses.replace(access, connect_ports=ports)
    cfg = dataclasses.replace(cfg, access=access)
    if args.htpasswd:
        cfg = dataclasses.replace(cfg, auth=dataclasses.replace(cfg.auth, htpasswd=args.htpasswd))
    if args.idle_timeout is not None:
        cfg = dataclasses.replace(
            cfg, timeouts=dataclasses.replace(cfg.timeouts, idle=args.idle_timeout)
        )
    log = cfg.log
    if args.log_level:
        log = dataclasses.replace(log, level=args.log_level)
    if args.log_format:
        log = dataclasses.replace(log, format=args.log_format)
    if args.log_flows:
        log = dataclasses.replace(log, flows=args.log_flows)
    admin = cfg.admin
    if args.admin:
        admin = dataclasses.replace(admin, address=args.admin)
    elif admin.address is None:
        admin = dataclasses.replace(admin, address=DEFAULT_ADMIN)
    token = args.admin_token or (None if admin.token else os.environ.get(ADMIN_TOKEN_ENV))
    if token:
        admin = dataclasses.replace(admin, token=token)
    return dataclasses.replace(cfg, log=log, admin=admin).validate()


def _run(args: argparse.Namespace) -> int:
    from proxytap.app import App, serve

    try:
        cfg = config_from_args(args)
        app = App(cfg)  # every check run makes before it binds: the same as check-config
    except ConfigError as exc:
        print(f"proxytap: config error: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log.level, cfg.log.format)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency
        runner = asyncio.run
    try:
        return int(runner(serve(app, lambda: config_from_args(args))))
    except KeyboardInterrupt:  # pragma: no cover
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["tap"]:
        from proxytap.export.tapcli import main as tap_main

        return tap_main(argv[1:])
    if argv[:1] == ["ca"]:
        from proxytap.intercept.cacli import main as ca_main

        return ca_main(argv[1:])
    if argv[:1] == ["flows"]:
        from proxytap.flowscli import main as flows_main

        return flows_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command == "check-config":
        from proxytap.app import App

        try:
            App(load(args.file))  # what run checks before it binds: modules, users, sinks
        except ConfigError as exc:
            print(f"proxytap: config error: {exc}", file=sys.stderr)
            return 2
        print(f"{args.file}: ok")
        return 0
    parser.print_help()
    return 2
