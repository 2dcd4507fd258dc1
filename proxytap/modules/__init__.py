"""Pluggable modules: small classes with per-direction hooks, chained by name per listener.

The proxy-framework idea (PromethOS): a listener names the modules its traffic
passes through, one chain per direction::

    [[listeners]]
    name = "http"
    kind = "http"
    address = "127.0.0.1:8080"
    client_to_server = ["validate", "rewrite", "strip_tracking"]
    server_to_client = ["validate", "rewrite"]

``validate`` and ``rewrite`` are the built-in header rules
(``proxytap.policy.headers``) in module shape; ``validate`` always runs first
(named or not) and a listener that names no chain gets both. Any other name
is a user module: ``NAME.py`` in a ``[modules] path`` directory (default
``addons/``), or a path to a ``.py`` file. The file defines
``create(options) -> module``; ``options`` is the ``[modules.options.NAME]``
table (``{}`` without one). A module that fails to load stops start-up with a
config error. The hook contract is in ``proxytap.modules.api`` and in the
README ("Modules").
"""

from proxytap.modules.api import (
    HOOKS,
    Context,
    HttpRequest,
    HttpResponse,
    Module,
    ModuleError,
    Refuse,
)

__all__ = [
    "HOOKS",
    "Context",
    "HttpRequest",
    "HttpResponse",
    "Module",
    "ModuleError",
    "Refuse",
]
