"""Quota scopes: POST (23.03.5); GET / PATCH and DELETE /quota-scope/quota (23.03.7+); DELETE (beyond).

A scope id comes bare (23.03.5 managers) or typed, ``user:<uuid>`` (23.03.7+ managers): both name one
directory (``backends.ids``). Where the two generations of the proxy answer differently, the spelling
says which one the caller is: a typed request is answered as the newest supported proxy does.
"""

from __future__ import annotations

from aiohttp import web

from agent.http import answers, vfolders
from agent.http.errors import ApiError
from agent.http.params import QuotaScopeCreate, QuotaScopeParams, QuotaScopeUpdate, takes
from agent.runtime.context import agent_of

routes = web.RouteTableDef()


def _limit(options: object) -> int | None:
    limit = getattr(options, "limit_bytes", None)
    return None if limit is None or limit < 0 else limit


@routes.post("/quota-scope")
@takes(QuotaScopeCreate)
async def create(request: web.Request, p: QuotaScopeCreate) -> web.Response:
    """Create a quota scope (optionally with limit_bytes); a typed id that exists: 409, as 23.09+."""
    agent = agent_of(request)
    vol = await agent.volume(p.volume)
    if p.qsid.typed and await vfolders.scope_exists(vol, p.qsid.name):
        raise ApiError(409, f"quota scope '{p.qsid}' already exists on volume {vol.name!r}", "quota-scope-exists")
    with vfolders.scope_named(p.qsid):
        await vfolders.create_scope(agent, vol, p.qsid.name, _limit(p.options))
    return web.Response(status=204)


@routes.get("/quota-scope")
@takes(QuotaScopeParams, answer=answers.ScopeUsage)
async def describe(request: web.Request, p: QuotaScopeParams) -> web.Response:
    """A quota scope's used bytes and limit (unknown scope: 404)."""
    agent = agent_of(request)
    with vfolders.scope_named(p.qsid):
        usage = await vfolders.describe_scope(agent, await agent.volume(p.volume), p.qsid.name)
    unknown = None if p.qsid.typed else -1  # 23.03.7+ proxies answer null; the manager reads -1 as a limit
    return web.json_response(
        {
            "used_bytes": unknown if usage.used_bytes is None else usage.used_bytes,
            "limit_bytes": unknown if usage.limit_bytes is None else usage.limit_bytes,
        }
    )


@routes.patch("/quota-scope")
@takes(QuotaScopeUpdate)
async def update(request: web.Request, p: QuotaScopeUpdate) -> web.Response:
    """Set or lift a quota scope's limit; a missing scope: 404, or created with it for a typed id (as 23.03.7+)."""
    agent = agent_of(request)
    vol = await agent.volume(p.volume)
    with vfolders.scope_named(p.qsid):
        if p.qsid.typed and not await vfolders.scope_exists(vol, p.qsid.name):
            await vfolders.ensure_scope(agent, vol, p.qsid.name, _limit(p.options))
        else:
            await vfolders.update_scope(agent, vol, p.qsid.name, _limit(p.options))
    return web.Response(status=204)


@routes.delete("/quota-scope/quota")
@takes(QuotaScopeParams)
async def unset_quota(request: web.Request, p: QuotaScopeParams) -> web.Response:
    """Lift a quota scope's limit (the scope and its data stay; unknown scope: 404)."""
    agent = agent_of(request)
    with vfolders.scope_named(p.qsid):
        await vfolders.update_scope(agent, await agent.volume(p.volume), p.qsid.name, None)
    return web.Response(status=204)


@routes.delete("/quota-scope")
@takes(QuotaScopeParams)
async def delete(request: web.Request, p: QuotaScopeParams) -> web.Response:
    """Delete an empty quota scope (409 while vfolders remain)."""
    agent = agent_of(request)
    with vfolders.scope_named(p.qsid):
        await vfolders.delete_scope(agent, await agent.volume(p.volume), p.qsid.name)
    return web.Response(status=204)
