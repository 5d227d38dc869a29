"""Client-API tokens: HS256 JWTs signed with ``[storage-proxy] secret``.

The claims are exactly those of API.md §Tokens. :func:`verify` checks the
signature, algorithm, expiry and ``op`` before anything touches a file.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import jwt

from agent.http.errors import ApiError

ALGORITHM = "HS256"
Op = Literal["download", "upload"]


def issue(secret: str, lifetime: float, op: Op, **claims: Any) -> str:
    payload = {"op": op, **claims, "exp": int(time.time() + lifetime)}
    return jwt.encode(payload, secret, algorithm=ALGORITHM)


def verify(secret: str, token: str | None, op: Op) -> dict[str, Any]:
    """The token's claims, or a 4xx: missing (400), bad or expired (403), wrong op (403)."""
    if not token:
        raise ApiError(400, "the token query parameter is required", "malformed-request")
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM], options={"require": ["exp", "op"]})
    except jwt.ExpiredSignatureError:
        raise ApiError(403, "the token has expired; ask the manager for a new one", "invalid-token") from None
    except jwt.InvalidTokenError as e:
        raise ApiError(403, f"invalid token: {e}", "invalid-token") from None
    if claims.get("op") != op:
        raise ApiError(403, f"this token is for {claims.get('op')!r}, not {op!r}", "invalid-token")
    return claims
