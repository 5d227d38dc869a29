"""A WekaFS REST API v2 simulator: login/refresh tokens, filesystems, directory quotas by inode, stats."""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.simulators.base import SimError, Simulator, check_fields, dir_usage, json_body

UNLIMITED = 2**63 - 1


class WekaSimulator(Simulator):
    name = "weka"

    def __init__(self, mount: Path, *, username: str = "admin", password: str = "secret", fs_name: str = "fs1") -> None:
        super().__init__(mount)
        self.users = {username: password}
        self.fs_name = fs_name
        self.fs_uid = "fs-uid-0001"
        self.total_budget = 10 * 2**40
        self.token_ttl = 300.0
        self.access: dict[str, float] = {}  # token -> expiry (monotonic)
        self.refresh: set[str] = set()
        self.quotas: dict[int, dict[str, Any]] = {}  # inode -> quota
        self.stats = {
            "READS": 11.0,
            "WRITES": 7.0,
            "READ_BYTES": 4096.0,
            "WRITE_BYTES": 8192.0,
            "READ_LATENCY": 250.5,
            "WRITE_LATENCY": None,
        }
        self.healthy = True
        self.rejected = 0  # calls refused for a bad or expired token
        self._ids = itertools.count(1)

    # -- controls -----------------------------------------------------------------

    def expire_tokens(self) -> None:
        """Every access token handed out so far is now expired (refresh tokens stay valid)."""
        self.access.clear()

    def used_total(self) -> int:
        return dir_usage(self.mount)[0]

    def quota_usage(self, qsid: str) -> tuple[int, int | None]:
        ino = os.stat(self.mount / qsid).st_ino
        q = self.quotas.get(ino)
        used = dir_usage(self.mount / qsid)[0]
        return used, None if q is None else q["hard_limit_bytes"]

    # -- vendor shapes --------------------------------------------------------------

    def error(self, status: int, message: str, code: str | int | None) -> web.Response:
        return web.json_response({"data": None, "message": message}, status=status)

    def authorize(self, request: web.Request) -> None:
        if request.path in ("/api/v2/login", "/api/v2/login/refresh", "/api/v2/healthcheck"):
            return
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            raise SimError(401, "Authorization header missing or not a Bearer token")
        expiry = self.access.get(header[7:])
        if expiry is None or time.monotonic() >= expiry:
            self.rejected += 1
            raise SimError(401, "Token is invalid or expired")

    def _issue(self) -> web.Response:
        n = next(self._ids)
        access, refresh = f"access-{n}", f"refresh-{n}"
        self.access[access] = time.monotonic() + self.token_ttl
        self.refresh.add(refresh)
        return web.json_response(
            {
                "data": {
                    "access_token": access,
                    "refresh_token": refresh,
                    "expires_in": int(self.token_ttl),
                    "token_type": "Bearer",
                }
            }
        )

    def routes(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/api/v2/login", self.login)
        r.add_post("/api/v2/login/refresh", self.login_refresh)
        r.add_get("/api/v2/healthcheck", self.healthcheck)
        r.add_get("/api/v2/cluster", self.cluster)
        r.add_get("/api/v2/fileSystems", self.filesystems)
        r.add_get("/api/v2/fileSystems/{uid}", self.filesystem)
        r.add_get("/api/v2/fileSystems/{uid}/quota", self.quota_list)
        r.add_get("/api/v2/fileSystems/{uid}/quota/{ino}", self.quota_get)
        r.add_put("/api/v2/fileSystems/{uid}/quota/{ino}", self.quota_put)
        r.add_delete("/api/v2/fileSystems/{uid}/quota/{ino}", self.quota_delete)
        r.add_get("/api/v2/stats", self.stats_get)

    # -- handlers ---------------------------------------------------------------------

    async def login(self, request: web.Request) -> web.Response:
        if request.content_type == "application/x-www-form-urlencoded":
            body: Any = dict(await request.post())
        else:
            body = await json_body(request)
        check_fields(body, {"username", "password"}, {"org"})
        if self.users.get(body["username"]) != body["password"]:
            raise SimError(401, "Invalid username or password")
        return self._issue()

    async def login_refresh(self, request: web.Request) -> web.Response:
        body = check_fields(await json_body(request), {"refresh_token"})
        if body["refresh_token"] not in self.refresh:
            raise SimError(401, "Refresh token is invalid")
        self.refresh.discard(body["refresh_token"])
        return self._issue()

    async def healthcheck(self, request: web.Request) -> web.Response:
        return web.Response(text="OK" if self.healthy else "Cluster is degraded")

    async def cluster(self, request: web.Request) -> web.Response:
        return web.json_response({"data": {"name": "weka-sim", "release": "4.2.1", "guid": "sim-guid"}})

    def _fs(self, request: web.Request) -> None:
        if request.match_info["uid"] != self.fs_uid:
            raise SimError(404, f"Filesystem {request.match_info['uid']} not found")

    def _fs_object(self) -> dict[str, Any]:
        used = self.used_total()
        return {
            "id": "FSId<1>",
            "uid": self.fs_uid,
            "name": self.fs_name,
            "used_total": used,
            "free_total": self.total_budget - used,
            "total_budget": self.total_budget,
        }

    async def filesystems(self, request: web.Request) -> web.Response:
        other = {
            "id": "FSId<0>",
            "uid": "fs-uid-0000",
            "name": "default",
            "used_total": 0,
            "free_total": 0,
            "total_budget": 0,
        }
        return web.json_response({"data": [other, self._fs_object()]})

    async def filesystem(self, request: web.Request) -> web.Response:
        self._fs(request)
        return web.json_response({"data": self._fs_object()})

    def _inode(self, request: web.Request) -> int:
        self._fs(request)
        try:
            return int(request.match_info["ino"])
        except ValueError:
            raise SimError(400, "inode id must be an integer") from None

    def _quota_view(self, ino: int) -> dict[str, Any]:
        q = self.quotas[ino]
        used = dir_usage(self.mount / q["path"].lstrip("/"))[0]
        return {
            "inode_id": ino,
            "path": q["path"],
            "hard_limit_bytes": q["hard_limit_bytes"],
            "soft_limit_bytes": q["soft_limit_bytes"],
            "grace_seconds": q["grace_seconds"],
            "used_bytes": used,
            "status": "ACTIVE",
        }

    async def quota_list(self, request: web.Request) -> web.Response:
        self._fs(request)
        return web.json_response({"data": {f"q{ino}": self._quota_view(ino) for ino in self.quotas}})

    async def quota_get(self, request: web.Request) -> web.Response:
        ino = self._inode(request)
        if ino not in self.quotas:
            return web.json_response({"data": {}, "message": "Directory has no quota"})
        return web.json_response({"data": self._quota_view(ino)})

    async def quota_put(self, request: web.Request) -> web.Response:
        ino = self._inode(request)
        body = check_fields(
            await json_body(request), {"path", "hard_limit_bytes"}, {"soft_limit_bytes", "grace_seconds", "owner"}
        )
        target = self.mount / str(body["path"]).lstrip("/")
        if not str(body["path"]).startswith("/") or not target.is_dir():
            raise SimError(400, f"Directory {body['path']} does not exist in filesystem {self.fs_name}")
        if os.stat(target).st_ino != ino:
            raise SimError(400, f"inode {ino} does not match directory {body['path']}")
        hard = body["hard_limit_bytes"]
        if not isinstance(hard, int) or hard < 0:
            raise SimError(400, "hard_limit_bytes must be a non-negative integer")
        self.quotas[ino] = {
            "path": body["path"],
            "hard_limit_bytes": hard or UNLIMITED,
            "soft_limit_bytes": body.get("soft_limit_bytes", UNLIMITED),
            "grace_seconds": body.get("grace_seconds", 0),
        }
        return web.json_response({"data": self._quota_view(ino)})

    async def quota_delete(self, request: web.Request) -> web.Response:
        ino = self._inode(request)
        if self.quotas.pop(ino, None) is None:
            raise SimError(404, "Directory has no quota")
        return web.json_response({"data": None})

    async def stats_get(self, request: web.Request) -> web.Response:
        if "start_time" not in request.query or not request.query["start_time"].endswith("Z"):
            raise SimError(400, "start_time (ISO 8601, UTC 'Z') is required")
        wanted = request.query.getall("stat", [])
        unknown = [s for s in wanted if not s.startswith("ops.") or s[4:] not in self.stats]
        if unknown:
            raise SimError(400, f"unknown stat(s): {', '.join(unknown)}")
        sample = {s[4:]: self.stats[s[4:]] for s in wanted}
        return web.json_response(
            {
                "data": {
                    "all": {
                        "ops": [
                            {"timestamp": request.query["start_time"], "stats": {k: 0 for k in sample}},
                            {"timestamp": request.query["start_time"], "stats": sample},
                        ]
                    }
                }
            }
        )
