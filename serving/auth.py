"""API keys: user keys for /v1/*, a separate admin key for /admin/* (and /v1/*), open public paths.

Replicas hold SHA-256 digests only (`serving.config.resolve_keys`), compared in constant time.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from serving.protocol import PUBLIC_PATHS, digest_key_id, key_digest, openai_error


@dataclass(frozen=True)
class Caller:
    """Who sent an admitted request: a key's digest ("" when unauthenticated) and its role."""

    digest: str
    is_admin: bool = False

    @property
    def key_id(self) -> str:
        return digest_key_id(self.digest)


def may_see_routing_summary(caller: Caller | None, access: str) -> bool:
    """Whether `caller` gets the per-request routing summary under `telemetry.routing_summary`
    (`admin` or `keys`); an unauthenticated caller counts as a user."""
    return access == "keys" or (caller is not None and caller.is_admin)


def route_path(scope) -> str:
    """The path inside the application: Serve keeps the full path in `path` and puts an
    application's route_prefix (e.g. /aligned) in `root_path`; keys and labels judge the rest."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root):] or "/"
    return path


def bearer_token(header: bytes) -> str:
    token = header.decode("latin-1")
    return token[7:].strip() if token[:7].lower() == "bearer " else ""


class KeyChecker:
    def __init__(self, user_key_digests: frozenset[str], admin_key_digest: str | None,
                 allow_unauthenticated: bool = False):
        self.users, self.admin = user_key_digests, admin_key_digest
        self.open = not user_key_digests and allow_unauthenticated

    def check(self, path: str, header: bytes):
        """(caller, None) when admitted, (None, an OpenAI-format 401/403) when not; public paths
        give (None, None). `header` is the raw Authorization header."""
        if path in PUBLIC_PATHS:
            return None, None
        token = bearer_token(header)
        digest = key_digest(token) if token else ""
        is_admin = bool(self.admin) and hmac.compare_digest(digest, self.admin)
        is_user = any(hmac.compare_digest(digest, d) for d in self.users)
        if path.startswith("/admin"):
            if is_admin:
                return Caller(digest, is_admin=True), None
            if self.admin is None:
                return None, openai_error(403, "admin endpoints are disabled: no admin key is configured")
            if is_user:
                return None, openai_error(403, "this endpoint needs the admin key, not a user key")
            return None, openai_error(401, "missing or invalid admin key (Authorization: Bearer <key>)")
        if is_user or is_admin:
            return Caller(digest, is_admin=is_admin), None
        if self.open:  # no user keys at all: one anonymous caller (an unknown token is not an id)
            return Caller(""), None
        return None, openai_error(401, "missing or invalid API key (Authorization: Bearer <key>)",
                                  "invalid_request_error")
