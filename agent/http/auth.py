"""Manager-API authentication: the shared secret header, compared in constant time."""

from __future__ import annotations

import hmac

from aiohttp import web
from aiohttp.typedefs import Middleware

from agent.http.errors import ApiError, Handler, problem_response

AUTH_HEADER = "X-BackendAI-Storage-Auth-Token"
PUBLIC_PATHS = frozenset({"/status", "/health", "/livez", "/readyz"})  # probes: no secret needed


def manager_auth(secret: str) -> Middleware:
    expected = secret.encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in PUBLIC_PATHS:
            given = request.headers.get(AUTH_HEADER, "").encode()
            if not hmac.compare_digest(given, expected):
                return problem_response(ApiError(403, f"missing or wrong {AUTH_HEADER} header", "forbidden"))
        return await handler(request)

    return middleware
