"""Config reload (SIGHUP): which keys a running proxytap takes over, which need a restart.

A reload re-reads the config file (with the command line's overrides, as at
start-up), validates it fully and builds everything start-up would build from
it; only then is it swapped in, for new connections and new decisions.
Connections already open keep what they took: their tunnel, their module
chain, the decisions made for them.

Live on reload: ``access`` (client ACL, destination rules, ``via``),
``auth`` (the htpasswd file is read again), ``upstream`` (proxies,
credentials, password files), ``http`` (header rules), ``tls`` interception
lists and checks, ``modules`` (options; modules are loaded again),
``timeouts``, ``limits`` (but ``open_files_reserve``), ``proxy_name``,
``log.level``, and of ``export``: ``classify_timeout``, ``rules`` (when they
keep the same flow sockets, see below), ``overload`` / ``max_wait`` /
``on_gap`` (flow-socket readers that connect after the reload) and
``loopback7_overload`` / ``loopback7_max_wait`` / ``loopback7_on_gap`` (from
the next loopback7 connection).

``RESTART_KEYS`` need a restart: what binds sockets or opens files at
start-up (listeners, the admin server, flow sockets, loopback7, pcap, the
flow log), what the TLS engine reads once, and the open-file budget. A
reload that changes one keeps its running value, and logs a warning naming
it. ``export.rules`` also needs a restart when served flow sockets are on
and the rules would serve another set of sockets (a new rule name or
``balance``); rules that only change what matches are live.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Final

from proxytap.config import Config

RESTART_KEYS: Final = (
    "listeners",
    "admin",
    "limits.open_files_reserve",
    "export.sftap_home",
    "export.sftap_mode",
    "export.format",
    "export.formats",
    "export.reader_buffer",
    "export.reader_sndbuf",
    "export.chunk",
    "export.loopback7",
    "export.loopback7_format",
    "export.loopback7_buffer",
    "export.loopback7_sndbuf",
    "export.loopback7_vlan",
    "export.pcap",
    "log.format",
    "log.flows",
    "log.flows_max_bytes",
    "log.flows_backups",
    "log.flows_buffer",
    "tls.ca_dir",
    "tls.keylog_file",
    "tls.verify_upstream",
    "tls.upstream_ca",
    "tls.http2",
)


def get(config: object, key: str) -> Any:
    """The value at dotted ``key`` (``export.pcap``); a missing field is ``None``."""
    value = config
    for part in key.split("."):
        value = getattr(value, part, None)
    return value


def replace(config: Any, key: str, value: Any) -> Any:
    """``config`` with the value at dotted ``key`` replaced (frozen dataclasses)."""
    head, _, rest = key.partition(".")
    if not hasattr(config, head):
        return config
    if rest:
        value = replace(getattr(config, head), rest, value)
    return dataclasses.replace(config, **{head: value})


def keep_restart_keys(running: Config, new: Config) -> tuple[Config, list[str]]:
    """``new`` with every restart-only key at its running value; the keys that differed."""
    applied = new
    changed = []
    for key in RESTART_KEYS:
        if get(new, key) != get(running, key):
            changed.append(key)
            applied = replace(applied, key, get(running, key))
    return applied, changed


def changed_keys(running: Config, new: Config) -> list[str]:
    """The top-level sections (and ``proxy_name``) whose values differ."""
    return [
        f.name
        for f in dataclasses.fields(Config)
        if getattr(running, f.name) != getattr(new, f.name)
    ]
