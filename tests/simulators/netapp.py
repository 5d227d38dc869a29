"""A NetApp ONTAP REST API simulator: volumes, qtrees, tree quota rules and reports, cluster jobs.

Bodies may use dotted keys (``"svm.uuid"``) or nested objects, as ONTAP
accepts both; unknown fields and query parameters are refused the way ONTAP
refuses them. Mutations answer 202 with a job whose effect lands when a poll
finds it finished.
"""

from __future__ import annotations

import base64
import itertools
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.simulators.base import SimError, Simulator, check_fields, dir_usage, json_body

API = "/api"


def flatten(body: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(body, dict):
        raise SimError(400, "request body must be a JSON object", "2")
    out: dict[str, Any] = {}
    for k, v in body.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class NetappSimulator(Simulator):
    name = "netapp"

    def __init__(self, mount: Path, *, user: str = "admin", password: str = "netapp1!", volume: str = "vol1"):
        super().__init__(mount)
        self.credentials = (user, password)
        self.volume_name = volume
        self.vol_uuid = str(uuid.uuid4())
        self.svm_uuid = str(uuid.uuid4())
        self.size = 50 * 2**30
        self.state = "online"
        self.quota_enabled = False
        self.volume_patches: list[dict[str, Any]] = []  # bodies of PATCH /storage/volumes/{uuid}, flattened
        self.qtrees: dict[str, int] = {}  # name -> id
        self.rules: dict[str, dict[str, Any]] = {}  # uuid -> rule (flat keys)
        self.jobs: dict[str, dict[str, Any]] = {}
        self.job_polls = 1
        self.statistics = {
            "iops_raw": {"read": 1200, "write": 300, "other": 5, "total": 1505},
            "throughput_raw": {"read": 9_000_000, "write": 2_500_000, "other": 0, "total": 11_500_000},
            "latency_raw": {"read": 60_000, "write": 45_000, "other": 0, "total": 105_000},
        }
        self._qtree_ids = itertools.count(1)

    # -- vendor shapes --------------------------------------------------------------

    def error(self, status: int, message: str, code: str | int | None) -> web.Response:
        default = {401: "6691623", 404: "4", 405: "3", 400: "262179"}.get(status, "1")
        return web.json_response({"error": {"message": message, "code": str(code or default)}}, status=status)

    def authorize(self, request: web.Request) -> None:
        expected = "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
        if request.headers.get("Authorization", "") != expected:
            raise SimError(401, "User is not authorized", "6691623")

    def routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get(API + "/storage/volumes", self.volumes)
        r.add_get(API + "/storage/volumes/{uuid}", self.volume_get)
        r.add_patch(API + "/storage/volumes/{uuid}", self.volume_patch)
        r.add_get(API + "/storage/qtrees", self.qtree_list)
        r.add_post(API + "/storage/qtrees", self.qtree_create)
        r.add_delete(API + "/storage/qtrees/{vol}/{id}", self.qtree_delete)
        r.add_get(API + "/storage/quota/rules", self.rule_list)
        r.add_post(API + "/storage/quota/rules", self.rule_create)
        r.add_patch(API + "/storage/quota/rules/{uuid}", self.rule_patch)
        r.add_delete(API + "/storage/quota/rules/{uuid}", self.rule_delete)
        r.add_get(API + "/storage/quota/reports", self.report_list)
        r.add_get(API + "/cluster/jobs/{uuid}", self.job_get)

    # -- helpers ----------------------------------------------------------------------

    @staticmethod
    def _query(request: web.Request, allowed: set[str]) -> dict[str, str]:
        extra = sorted(set(request.query) - allowed)
        if extra:
            raise SimError(400, f'Unexpected argument "{extra[0]}".', "262179")
        return dict(request.query)

    def _job(self, action: Callable[[], None]) -> web.Response:
        job_id = str(uuid.uuid4())
        self.jobs[job_id] = {"uuid": job_id, "state": "queued", "polls": self.job_polls, "action": action}
        return web.json_response(
            {"job": {"uuid": job_id, "_links": {"self": {"href": f"/api/cluster/jobs/{job_id}"}}}}, status=202
        )

    def _vol(self, value: str | None) -> None:
        if value != self.vol_uuid:
            raise SimError(404, f'Volume "{value}" not found', "917927")

    def report(self, qtree: str) -> tuple[int, int | None]:
        """(used bytes, hard limit or None) as the quota report shows them."""
        rule = next((r for r in self.rules.values() if r["qtree.name"] == qtree), None)
        used = dir_usage(self.mount / qtree)[0]
        return used, (rule or {}).get("space.hard_limit")

    def volume_used(self) -> int:
        return dir_usage(self.mount)[0]

    # -- handlers ---------------------------------------------------------------------

    async def job_get(self, request: web.Request) -> web.Response:
        job = self.jobs.get(request.match_info["uuid"])
        if job is None:
            raise SimError(404, "Job not found", "4")
        if job["state"] in ("queued", "running"):
            job["polls"] -= 1
            job["state"] = "running"
            if job["polls"] <= 0:
                try:
                    job["action"]()
                    job.update(state="success", message="success", code=0)
                except SimError as e:
                    job.update(
                        state="failure",
                        message=e.message,
                        code=int(e.code or 1),
                        error={"message": e.message, "code": str(e.code or 1)},
                    )
        return web.json_response({k: v for k, v in job.items() if k not in ("polls", "action")})

    async def volumes(self, request: web.Request) -> web.Response:
        q = self._query(request, {"name", "fields", "svm.name", "uuid"})
        records = []
        if q.get("name") == self.volume_name and q.get("svm.name", "svm0") == "svm0":
            records.append(
                {
                    "uuid": self.vol_uuid,
                    "name": self.volume_name,
                    "nas": {"path": f"/{self.volume_name}"},
                    "svm": {"uuid": self.svm_uuid, "name": "svm0"},
                }
            )
        return web.json_response({"records": records, "num_records": len(records)})

    async def volume_get(self, request: web.Request) -> web.Response:
        self._vol(request.match_info["uuid"])
        self._query(request, {"fields"})
        return web.json_response(
            {
                "uuid": self.vol_uuid,
                "name": self.volume_name,
                "state": self.state,
                "nas": {"path": f"/{self.volume_name}"},
                "space": {"size": self.size, "available": self.size - self.volume_used(), "used": self.volume_used()},
                "files": {"maximum": 1_000_000, "used": 100 + len(self.qtrees)},
                "quota": {"state": "on" if self.quota_enabled else "off"},
                "statistics": self.statistics,
            }
        )

    async def volume_patch(self, request: web.Request) -> web.Response:
        self._vol(request.match_info["uuid"])
        body = check_fields(flatten(await json_body(request)), set(), {"quota.enabled", "comment"})
        self.volume_patches.append(body)
        enable = body.get("quota.enabled")

        def apply() -> None:
            if enable is not None:
                if enable and self.quota_enabled:
                    raise SimError(400, "Quotas are already on for the volume", "5308507")
                self.quota_enabled = bool(enable)

        return self._job(apply)

    async def qtree_list(self, request: web.Request) -> web.Response:
        q = self._query(request, {"volume.uuid", "name", "fields", "svm.uuid"})
        self._vol(q.get("volume.uuid"))
        records = [
            {"id": i, "name": n, "volume": {"uuid": self.vol_uuid}}
            for n, i in self.qtrees.items()
            if q.get("name") in (None, n)
        ]
        return web.json_response({"records": records, "num_records": len(records)})

    async def qtree_create(self, request: web.Request) -> web.Response:
        body = check_fields(
            flatten(await json_body(request)),
            {"svm.uuid", "volume.uuid", "name"},
            {"security_style", "unix_permissions", "user.id", "group.id", "export_policy.name"},
        )
        self._vol(body["volume.uuid"])
        if body["svm.uuid"] != self.svm_uuid:
            raise SimError(404, f'SVM "{body["svm.uuid"]}" not found', "2621462")
        name = body["name"]

        def apply() -> None:
            if name in self.qtrees:
                raise SimError(409, f'Qtree "{name}" already exists', "918235")
            (self.mount / name).mkdir()
            self.qtrees[name] = next(self._qtree_ids)

        return self._job(apply)

    async def qtree_delete(self, request: web.Request) -> web.Response:
        self._vol(request.match_info["vol"])
        qid = int(request.match_info["id"])
        name = next((n for n, i in self.qtrees.items() if i == qid), None)
        if name is None:
            raise SimError(404, f"Qtree {qid} not found", "4")

        def apply() -> None:
            shutil.rmtree(self.mount / name, ignore_errors=True)
            del self.qtrees[name]

        return self._job(apply)

    def _rule_view(self, rule_uuid: str) -> dict[str, Any]:
        r = self.rules[rule_uuid]
        return {
            "uuid": rule_uuid,
            "type": "tree",
            "qtree": {"name": r["qtree.name"]},
            "svm": {"uuid": self.svm_uuid},
            "volume": {"uuid": self.vol_uuid},
            "space": {k[6:]: v for k, v in r.items() if k.startswith("space.")},
            "files": {k[6:]: v for k, v in r.items() if k.startswith("files.")},
        }

    async def rule_list(self, request: web.Request) -> web.Response:
        q = self._query(request, {"svm.uuid", "volume.uuid", "type", "qtree.name", "fields"})
        self._vol(q.get("volume.uuid"))
        records = [self._rule_view(u) for u, r in self.rules.items() if q.get("qtree.name") in (None, r["qtree.name"])]
        return web.json_response({"records": records, "num_records": len(records)})

    async def rule_create(self, request: web.Request) -> web.Response:
        body = check_fields(
            flatten(await json_body(request)),
            {"svm.uuid", "volume.uuid", "type", "qtree.name"},
            {"space.hard_limit", "space.soft_limit", "files.hard_limit", "files.soft_limit", "user_mapping"},
        )
        self._vol(body["volume.uuid"])
        if body["type"] != "tree":
            raise SimError(400, "only tree rules are simulated", "5308545")
        if body["qtree.name"] not in self.qtrees:
            raise SimError(404, f'Qtree "{body["qtree.name"]}" does not exist', "5308561")
        rule_uuid = str(uuid.uuid4())

        def apply() -> None:
            if any(r["qtree.name"] == body["qtree.name"] for r in self.rules.values()):
                raise SimError(409, "Duplicate quota rule", "5308573")
            self.rules[rule_uuid] = {k: v for k, v in body.items() if k.startswith(("space.", "files.", "qtree."))}

        return self._job(apply)

    async def rule_patch(self, request: web.Request) -> web.Response:
        rule_uuid = request.match_info["uuid"]
        if rule_uuid not in self.rules:
            raise SimError(404, "Quota rule not found", "4")
        body = check_fields(
            flatten(await json_body(request)),
            set(),
            {"space.hard_limit", "space.soft_limit", "files.hard_limit", "files.soft_limit"},
        )
        if not body:
            raise SimError(400, "nothing to modify", "2")

        def apply() -> None:
            self.rules[rule_uuid].update(body)

        return self._job(apply)

    async def rule_delete(self, request: web.Request) -> web.Response:
        rule_uuid = request.match_info["uuid"]
        if rule_uuid not in self.rules:
            raise SimError(404, "Quota rule not found", "4")
        return self._job(lambda: self.rules.pop(rule_uuid))

    async def report_list(self, request: web.Request) -> web.Response:
        q = self._query(request, {"type", "svm.uuid", "volume.uuid", "qtree.name", "fields"})
        self._vol(q.get("volume.uuid"))
        records = []
        if self.quota_enabled:
            for r in self.rules.values():
                if q.get("qtree.name") in (None, r["qtree.name"]):
                    used, hard = self.report(r["qtree.name"])
                    space: dict[str, Any] = {"used": {"total": used}}
                    if hard:
                        space["hard_limit"] = hard
                        space["used"]["hard_limit_percent"] = used * 100 // hard
                    records.append({"type": "tree", "qtree": {"name": r["qtree.name"]}, "space": space})
        return web.json_response({"records": records, "num_records": len(records)})
