"""Loading modules by name at start-up, and building each listener's chain.

A name is a built-in (``validate``, ``rewrite``), a path to a ``.py`` file
(it contains ``/`` or ends in ``.py``), or ``NAME`` for ``NAME.py`` in one of
the ``[modules] path`` directories, first found wins. The file runs once per
proxy and must define ``create(options) -> module``; the object it returns
needs a ``name`` (str) and at least one hook (``proxytap.modules.api``). Any
failure (no such file, an exception while importing or creating, no hooks) is
a ``ConfigError`` naming the listener key: start-up stops, nothing half-runs.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxytap.errors import ConfigError
from proxytap.modules.api import HOOKS
from proxytap.modules.builtin import Rewrite, Validate
from proxytap.modules.chain import Chain
from proxytap.policy.headers import HeaderRules

if TYPE_CHECKING:
    from proxytap.config import Config

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
DIRECTIONS = ("client_to_server", "server_to_client")


def find_module(name: str, path: tuple[str, ...], key: str) -> Path:
    """The file a module name stands for."""
    if name.endswith(".py") or "/" in name:
        file = Path(name)
        if not file.is_file():
            raise ConfigError(key, f"module file {name} does not exist")
        return file
    if _NAME.fullmatch(name) is None:
        raise ConfigError(key, f"{name!r} is neither a module name nor a path to a .py file")
    for directory in path:
        file = Path(directory) / f"{name}.py"
        if file.is_file():
            return file
    raise ConfigError(key, f"no module {name!r}: no {name}.py in {', '.join(path) or '(none)'}")


def load_module(name: str, config: Config, key: str) -> Any:
    """Import a user module's file and call its ``create(options)``."""
    file = find_module(name, config.modules.path, key)
    stem = file.stem
    options = dict(config.modules.options.get(name, config.modules.options.get(stem, {})))
    qualified = f"proxytap_addons.{stem}"
    try:
        spec = importlib.util.spec_from_file_location(qualified, file)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {file}")
        code = importlib.util.module_from_spec(spec)
        sys.modules[qualified] = code  # dataclasses and pickling look their module up
        spec.loader.exec_module(code)
    except Exception as exc:
        sys.modules.pop(qualified, None)
        raise ConfigError(key, f"module {name!r} ({file}) failed to load: {exc!r}") from exc
    create = getattr(code, "create", None)
    if not callable(create):
        raise ConfigError(key, f"module {name!r} ({file}) defines no create(options) function")
    try:
        module = create(options)
    except Exception as exc:
        raise ConfigError(key, f"module {name!r}: create() failed: {exc!r}") from exc
    module_name = getattr(module, "name", None)
    if not isinstance(module_name, str) or not module_name:
        raise ConfigError(key, f"module {name!r}: create() returned an object without a name")
    hooks = [h for h in HOOKS if getattr(module, h, None) is not None]
    if not hooks:
        raise ConfigError(key, f"module {name!r} defines none of the hooks {', '.join(HOOKS)}")
    for hook in hooks:
        if not callable(getattr(module, hook)):
            raise ConfigError(key, f"module {name!r}: {hook} is not callable")
    return module


def build_chains(config: Config, rules: HeaderRules, errors: Counter[str]) -> dict[str, Chain]:
    """Every listener's chain; each named module is loaded once and shared."""
    loaded: dict[str, Any] = {"validate": Validate(), "rewrite": Rewrite(rules)}
    chains = {}
    used: set[str] = set()
    for i, listener in enumerate(config.listeners):
        lists = []
        for direction in DIRECTIONS:
            modules = []
            for name in listener.chain(direction):
                if name not in loaded:
                    loaded[name] = load_module(name, config, f"listeners[{i}].{direction}")
                used.add(name)
                modules.append(loaded[name])
            lists.append(modules)
        chains[listener.name] = Chain(listener.name, lists[0], lists[1], rules, errors)
    for name in config.modules.options:
        if name not in used and not any(Path(u).stem == name for u in used):
            raise ConfigError(f"modules.options.{name}", "no listener chain names this module")
    return chains


def header_rules(config: Config) -> HeaderRules:
    """The compiled header rules of a configuration (``[http]`` and ``[limits]``)."""
    limits = config.limits
    return HeaderRules.from_config(
        config.http,
        proxy_name=config.proxy_name,
        max_head=limits.max_head,
        max_request_line=limits.max_request_line,
        max_headers=limits.max_headers,
    )


def check_modules(config: Config) -> None:
    """Load every module the listeners name, as start-up would (``ConfigError`` if one fails)."""
    build_chains(config, header_rules(config), Counter())
