"""The built-in header rules as modules: ``validate`` and ``rewrite``.

They are thin: the rules live in ``proxytap.policy.headers``. ``validate`` is
always first in both chains and never runs as a hook: the plain-HTTP
forwarder judges every head through ``HeaderRules.prepare_request`` /
``prepare_response`` (memoized), and the CONNECT handshake through
``HeaderRules.validate_request``, before any module sees it. So ``Validate``
only marks the chain's first place. ``rewrite`` directly after it is fused
into those calls too; anywhere later in a chain its hooks run in turn, like
any module's (``proxytap.modules.chain``).
"""

from __future__ import annotations

from typing import Final

from proxytap.modules.api import Context
from proxytap.policy.headers import HeaderRules
from proxytap.policy.message import RequestHead, ResponseHead

VALIDATE: Final = "validate"
REWRITE: Final = "rewrite"


class Validate:
    """Marks where validation runs (first in each chain); it has no hooks of its own."""

    name = VALIDATE


class Rewrite:
    """Forwarded / X-Forwarded-For, the user header rules and Via."""

    name = REWRITE

    def __init__(self, rules: HeaderRules) -> None:
        self.rules = rules

    def request(self, ctx: Context | None, req: RequestHead) -> None:
        self.rules.rewrite_request(req)

    def response(self, ctx: Context | None, resp: ResponseHead) -> None:
        self.rules.rewrite_response(resp)
