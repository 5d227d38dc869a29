"""Quota scopes: POST (upstream) and GET / PATCH / DELETE (beyond)."""

from __future__ import annotations

from aiohttp import web

from agent import answers, vfolders
from agent.context import agent_of
from agent.params import QuotaScopeCreate, QuotaScopeParams, QuotaScopeUpdate, takes

routes = web.RouteTableDef()


def _limit(options: object) -> int | None:
    limit = getattr(options, "limit_bytes", None)
    return None if limit is None or limit < 0 else limit


@routes.post("/quota-scope")
@takes(QuotaScopeCreate)
async def create(request: web.Request, p: QuotaScopeCreate) -> web.Response:
    """Create a quota scope (optionally with limit_bytes)."""
    agent = agent_of(request)
    await vfolders.create_scope(agent, agent.volume(p.volume), p.qsid, _limit(p.options))
    return web.Response(status=204)


@routes.get("/quota-scope")
@takes(QuotaScopeParams, answer=answers.ScopeUsage)
async def describe(request: web.Request, p: QuotaScopeParams) -> web.Response:
    """A quota scope's used bytes and limit."""
    agent = agent_of(request)
    usage = await vfolders.describe_scope(agent, agent.volume(p.volume), p.qsid)
    return web.json_response(
        {
            "used_bytes": -1 if usage.used_bytes is None else usage.used_bytes,
            "limit_bytes": -1 if usage.limit_bytes is None else usage.limit_bytes,
        }
    )


@routes.patch("/quota-scope")
@takes(QuotaScopeUpdate)
async def update(request: web.Request, p: QuotaScopeUpdate) -> web.Response:
    """Set or lift a quota scope's limit."""
    agent = agent_of(request)
    await vfolders.update_scope(agent, agent.volume(p.volume), p.qsid, _limit(p.options))
    return web.Response(status=204)


@routes.delete("/quota-scope")
@takes(QuotaScopeParams)
async def delete(request: web.Request, p: QuotaScopeParams) -> web.Response:
    """Delete an empty quota scope (409 while vfolders remain)."""
    agent = agent_of(request)
    await vfolders.delete_scope(agent, agent.volume(p.volume), p.qsid)
    return web.Response(status=204)
