"""A Dell PowerScale OneFS Platform API simulator: directory quotas on /ifs paths, storage pools, statistics."""

from __future__ import annotations

import base64
import secrets
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.simulators.base import SimError, Simulator, check_fields, dir_usage, json_body

QUOTA_FIELDS = {"path", "type"}
QUOTA_OPTIONAL = {
    "include_snapshots",
    "thresholds",
    "thresholds_on",
    "enforced",
    "container",
    "persona",
    "force",
    "linked",
    "ignore_limit_checks",
}
THRESHOLDS = {"hard", "soft", "advisory", "soft_grace"}


class OnefsSimulator(Simulator):
    name = "onefs"

    def __init__(
        self,
        mount: Path,
        *,
        user: str = "root",
        password: str = "a",
        version: str = "12",
        ifs_path: str = "/ifs/data/ai",
    ) -> None:
        super().__init__(mount)
        self.credentials = (user, password)
        self.version = version
        self.ifs_path = ifs_path
        self.quotas: dict[str, dict[str, Any]] = {}
        self.pools = [
            {
                "id": 1,
                "name": "s210_pool",
                "type": "nodepool",
                "lnns": [1, 2, 3],
                "health_flags": [],  # empty = healthy; only node pools carry the field
                "usage": {"total_bytes": str(30 * 2**40), "used_bytes": str(12 * 2**40)},
            },
            {
                "id": 2,
                "name": "x410_pool",
                "type": "nodepool",
                "lnns": [4, 5],
                "health_flags": [],
                "usage": {"total_bytes": str(50 * 2**40), "used_bytes": str(5 * 2**40)},
            },
            {
                "id": 3,
                "name": "tier1",
                "type": "tier",
                "lnns": [1, 2, 3, 4, 5],
                "usage": {"total_bytes": str(80 * 2**40), "used_bytes": str(17 * 2**40)},
            },
        ]
        self.protocol = {"disk": {"iops": 4321.0}, "onefs": {"in": 1_000_000.0, "out": 3_000_000.0}}
        self.workload = {"latency_read": 812.5, "latency_write": 1030.0}

    # -- helpers --------------------------------------------------------------------

    def local(self, ifs: str) -> Path:
        if ifs != self.ifs_path and not ifs.startswith(self.ifs_path + "/"):
            raise SimError(404, f"Path {ifs} not found", "AEC_NOT_FOUND")
        return self.mount / ifs[len(self.ifs_path) :].lstrip("/")

    def quota_for(self, qsid: str) -> tuple[int, int | None] | None:
        """(fslogical usage, hard threshold or None) of the directory quota on the scope, None when it has none."""
        for q in self.quotas.values():
            if q["path"] == f"{self.ifs_path}/{qsid}":
                view = self._view(q)
                return view["usage"]["fslogical"], view["thresholds"]["hard"]
        return None

    def _view(self, q: dict[str, Any]) -> dict[str, Any]:
        logical = dir_usage(self.local(q["path"]))[0]
        return {
            **q,
            "usage": {"fslogical": logical, "applogical": logical, "physical": -(-logical // 8192) * 8192, "inodes": 1},
        }

    def pools_total(self) -> tuple[int, int]:
        nodepools = [p for p in self.pools if p["type"] == "nodepool"]
        return (
            sum(int(p["usage"]["total_bytes"]) for p in nodepools),
            sum(int(p["usage"]["used_bytes"]) for p in nodepools),
        )

    # -- vendor shapes ----------------------------------------------------------------

    def error(self, status: int, message: str, code: str | int | None) -> web.Response:
        default = {401: "AEC_UNAUTHORIZED", 404: "AEC_NOT_FOUND", 405: "AEC_BAD_REQUEST"}.get(status, "AEC_BAD_REQUEST")
        if status >= 500:
            default = "AEC_EXCEPTION"
        return web.json_response({"errors": [{"code": code or default, "message": message}]}, status=status)

    def authorize(self, request: web.Request) -> None:
        expected = "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
        if request.headers.get("Authorization", "") != expected:
            raise SimError(401, "Authorization required", "AEC_UNAUTHORIZED")
        if request.match_info.get("ver") != self.version:
            raise SimError(404, f"API version {request.match_info.get('ver')} is not supported", "AEC_NOT_FOUND")

    def routes(self, app: web.Application) -> None:
        r = app.router
        p = "/platform/{ver}"
        r.add_get(p + "/quota/quotas", self.quota_list)
        r.add_post(p + "/quota/quotas", self.quota_create)
        r.add_get(p + "/quota/quotas/{id}", self.quota_get)
        r.add_put(p + "/quota/quotas/{id}", self.quota_put)
        r.add_delete(p + "/quota/quotas/{id}", self.quota_delete)
        r.add_get(p + "/storagepool/storagepools", self.storagepools)
        r.add_get(p + "/cluster/config", self.cluster_config)
        r.add_get(p + "/statistics/summary/protocol-stats", self.protocol_stats)
        r.add_get(p + "/statistics/summary/workload", self.workload_stats)

    # -- handlers ---------------------------------------------------------------------

    @staticmethod
    def _thresholds(value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise SimError(400, "Field: thresholds must be an object", "AEC_BAD_REQUEST")
        extra = set(value) - THRESHOLDS
        if extra:
            raise SimError(400, f"Field: thresholds has unknown member(s) {sorted(extra)}", "AEC_BAD_REQUEST")
        for k, v in value.items():
            if v is not None and (not isinstance(v, int) or v < 0):
                raise SimError(400, f"Field: thresholds.{k} must be a non-negative integer", "AEC_BAD_REQUEST")
        return value

    async def quota_list(self, request: web.Request) -> web.Response:
        extra = set(request.query) - {
            "path",
            "type",
            "recurse_path_children",
            "recurse_path_parents",
            "resume",
            "limit",
            "zone",
            "enforced",
            "include_snapshots",
        }
        if extra:
            raise SimError(400, f"Unknown argument(s): {', '.join(sorted(extra))}", "AEC_BAD_REQUEST")
        found = [
            self._view(q)
            for q in self.quotas.values()
            if request.query.get("path") in (None, q["path"]) and request.query.get("type") in (None, q["type"])
        ]
        return web.json_response({"quotas": found, "resume": None, "total": len(found)})

    async def quota_create(self, request: web.Request) -> web.Response:
        body = check_fields(await json_body(request), QUOTA_FIELDS, QUOTA_OPTIONAL)
        if body["type"] != "directory":
            raise SimError(400, "only directory quotas are simulated", "AEC_BAD_REQUEST")
        if not self.local(body["path"]).is_dir():
            raise SimError(404, f"Path {body['path']} not found", "AEC_NOT_FOUND")
        if any(q["path"] == body["path"] and q["type"] == "directory" for q in self.quotas.values()):
            raise SimError(409, f"Quota for path {body['path']} already exists", "AEC_CONFLICT")
        thresholds = {"hard": None, "soft": None, "advisory": None, "soft_grace": None}
        thresholds.update(self._thresholds(body.get("thresholds", {})))
        qid = secrets.token_hex(12)
        self.quotas[qid] = {
            "id": qid,
            "path": body["path"],
            "type": "directory",
            "include_snapshots": body.get("include_snapshots", False),
            "thresholds": thresholds,
            "thresholds_on": body.get("thresholds_on", "applogicalsize"),
            "enforced": body.get("enforced", True),
        }
        return web.json_response({"id": qid}, status=201)

    def _quota(self, request: web.Request) -> dict[str, Any]:
        q = self.quotas.get(request.match_info["id"])
        if q is None:
            raise SimError(404, f"Quota {request.match_info['id']} not found", "AEC_NOT_FOUND")
        return q

    async def quota_get(self, request: web.Request) -> web.Response:
        return web.json_response({"quotas": [self._view(self._quota(request))]})

    async def quota_put(self, request: web.Request) -> web.Response:
        q = self._quota(request)
        body = check_fields(await json_body(request), set(), QUOTA_OPTIONAL - {"force"})
        if "thresholds" in body:
            q["thresholds"].update(self._thresholds(body.pop("thresholds")))
        q.update(body)
        return web.Response(status=204)

    async def quota_delete(self, request: web.Request) -> web.Response:
        self._quota(request)
        del self.quotas[request.match_info["id"]]
        return web.Response(status=204)

    async def storagepools(self, request: web.Request) -> web.Response:
        return web.json_response({"storagepools": self.pools, "total": len(self.pools)})

    async def cluster_config(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "name": "onefs-sim",
                "local_lnn": 1,
                "guid": "0050569f",
                "onefs_version": {"release": "9.5.0.0", "build": "B_9_5_0_005", "type": "Isilon OneFS"},
            }
        )

    async def protocol_stats(self, request: web.Request) -> web.Response:
        return web.json_response({"protocol-stats": {**self.protocol, "time": 1700000000}})

    async def workload_stats(self, request: web.Request) -> web.Response:
        if "system_names" not in request.query:
            raise SimError(400, "system_names is required for this simulator", "AEC_BAD_REQUEST")
        return web.json_response({"workload": [{"system_name": request.query["system_names"], **self.workload}]})
