"""The built-in header rules as modules: ``validate`` and ``rewrite``.

They are thin: the rules live in ``proxytap.policy.headers``. The plain-HTTP
forwarder does not call these hooks one by one: it runs ``validate`` (and
``rewrite`` when it directly follows) through ``HeaderRules.prepare_request``
/ ``prepare_response``, which memoize heads seen before, and calls the hooks
of the modules after them. Both ways run the same functions, so the result
is the same; the interception path calls these hooks.
"""

from __future__ import annotations

from typing import Final

from proxytap.modules.api import Context
from proxytap.policy.headers import HeaderRules, RequestHead, ResponseHead

VALIDATE: Final = "validate"
REWRITE: Final = "rewrite"


class Validate:
    """Checks heads and puts them in forwarding shape; always first, never optional."""

    name = VALIDATE

    def __init__(self, rules: HeaderRules) -> None:
        self.rules = rules

    def request(self, ctx: Context | None, req: RequestHead) -> None:
        self.rules.validate_request(req)

    def response(self, ctx: Context | None, resp: ResponseHead) -> None:
        self.rules.validate_response(resp)


class Rewrite:
    """Forwarded / X-Forwarded-For, the user header rules and Via."""

    name = REWRITE

    def __init__(self, rules: HeaderRules) -> None:
        self.rules = rules

    def request(self, ctx: Context | None, req: RequestHead) -> None:
        self.rules.rewrite_request(req)

    def response(self, ctx: Context | None, resp: ResponseHead) -> None:
        self.rules.rewrite_response(resp)


BUILTINS: Final = (VALIDATE, REWRITE)
