"""A Pure Storage FlashBlade REST 1.x simulator: api-token login to an x-auth-token session, filesystems, arrays."""

from __future__ import annotations

import secrets
from pathlib import Path

from aiohttp import web

from tests.simulators.base import SimError, Simulator, dir_usage

VERSIONS = ("1.8", "1.9", "1.10")


class PureSimulator(Simulator):
    name = "purestorage"

    def __init__(self, mount: Path, *, api_token: str = "T-0000-sim", fs_name: str = "fs1") -> None:
        super().__init__(mount)
        self.api_token = api_token
        self.fs_name = fs_name
        self.provisioned = 20 * 2**40
        self.sessions: set[str] = set()
        self.blades = [
            {"name": f"CH1.FB{i}", "status": "healthy", "details": None, "raw_capacity": 52 * 10**12, "progress": None}
            for i in range(1, 8)
        ] + [{"name": "CH1.FB8", "status": "unused", "details": None, "raw_capacity": 0, "progress": None}]
        self.perf = {
            "reads_per_sec": 120,
            "writes_per_sec": 80,
            "read_bytes_per_sec": 1_048_576,
            "write_bytes_per_sec": 524_288,
            "usec_per_read_op": 310.5,
            "usec_per_write_op": 415.25,
            "usec_per_other_op": 10.0,
            "others_per_sec": 3,
        }

    def expire_sessions(self) -> None:
        self.sessions.clear()

    def physical(self) -> int:
        return dir_usage(self.mount)[0]

    def error(self, status: int, message: str, code: str | int | None) -> web.Response:
        return web.json_response({"errors": [{"context": None, "message": message}]}, status=status)

    def authorize(self, request: web.Request) -> None:
        if request.path == "/api/login" or request.path == "/api/api_version":
            return
        if request.headers.get("x-auth-token") not in self.sessions:
            raise SimError(401, "Session expired or not authenticated; log in again")
        if request.match_info.get("v") not in VERSIONS:
            raise SimError(404, f"unsupported API version {request.match_info.get('v')!r}")

    def routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/api/api_version", self.api_version)
        r.add_post("/api/login", self.login)
        r.add_get("/api/{v}/file-systems", self.file_systems)
        r.add_get("/api/{v}/file-systems/performance", self.performance)
        r.add_get("/api/{v}/arrays", self.arrays)
        r.add_get("/api/{v}/blades", self.list_blades)

    async def api_version(self, request: web.Request) -> web.Response:
        return web.json_response({"versions": list(VERSIONS)})

    async def login(self, request: web.Request) -> web.Response:
        if request.headers.get("api-token") != self.api_token:
            raise SimError(401, "invalid API token")
        session = secrets.token_hex(8)
        self.sessions.add(session)
        return web.json_response({"username": "pureuser"}, headers={"x-auth-token": session})

    def _names(self, request: web.Request) -> list[str]:
        extra = set(request.query) - {"names", "protocol", "items_returned", "token", "total", "filter", "sort"}
        if extra:
            raise SimError(400, f"unknown query parameter(s): {', '.join(sorted(extra))}")
        names = [n for n in request.query.get("names", "").split(",") if n]
        unknown = [n for n in names if n != self.fs_name]
        if unknown:
            raise SimError(400, f"file system {unknown[0]!r} does not exist")
        return names or [self.fs_name]

    @staticmethod
    def _page(items: list[dict]) -> web.Response:
        return web.json_response(
            {"items": items, "pagination_info": {"continuation_token": None, "total_item_count": len(items)}}
        )

    async def file_systems(self, request: web.Request) -> web.Response:
        self._names(request)
        used = self.physical()
        return self._page(
            [
                {
                    "name": self.fs_name,
                    "provisioned": self.provisioned,
                    "hard_limit_enabled": False,
                    "space": {
                        "virtual": used,
                        "unique": used,
                        "snapshots": 0,
                        "total_physical": used,
                        "data_reduction": 1.0,
                    },
                    "nfs": {"enabled": True, "v3_enabled": True},
                }
            ]
        )

    async def performance(self, request: web.Request) -> web.Response:
        self._names(request)
        if request.query.get("protocol") not in (None, "NFS", "SMB", "HTTP", "S3"):
            raise SimError(400, f"invalid protocol {request.query['protocol']!r}")
        return self._page([{"name": self.fs_name, **self.perf}])

    async def arrays(self, request: web.Request) -> web.Response:
        return self._page(
            [{"id": "a-0001", "name": "fb-sim", "os": "Purity//FB", "revision": "2024.1", "version": "4.1.12"}]
        )

    async def list_blades(self, request: web.Request) -> web.Response:
        extra = set(request.query) - {"names", "filter", "ids", "limit", "sort", "start", "token"}
        if extra:
            raise SimError(400, f"unknown query parameter(s): {', '.join(sorted(extra))}")
        return self._page(self.blades)
