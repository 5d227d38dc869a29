"""An IBM Storage Scale management API v2 simulator: filesets, FILESET quotas, asynchronous jobs, pools, health.

Mutations answer 202 with a job; the job's effect lands when a poll finds it
COMPLETED (after ``job_polls`` polls), as on the appliance. Linking a fileset
makes its junction directory on the (stand-in) mount; deleting removes it.
"""

from __future__ import annotations

import base64
import itertools
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.simulators.base import SimError, Simulator, check_fields, dir_usage, json_body

PREFIX = "/scalemgmt/v2"
_LIMIT = re.compile(r"^(\d+)([KMGT]?)$", re.IGNORECASE)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def limit_kib(text: Any) -> int:
    """mmsetquota's reading of a limit: a number with an optional K/M/G/T suffix, bytes when unsuffixed."""
    m = _LIMIT.match(str(text))
    if not m:
        raise SimError(400, f"invalid limit value {text!r}")
    return -(-int(m.group(1)) * _UNITS[m.group(2).upper()] // 1024)


class GpfsSimulator(Simulator):
    name = "gpfs"

    def __init__(self, mount: Path, *, username: str = "admin", password: str = "admin001", fs_name: str = "gpfs0"):
        super().__init__(mount)
        self.credentials = (username, password)
        self.fs_name = fs_name
        self.filesets: dict[str, dict[str, Any]] = {}
        self.owners: dict[str, str | None] = {}  # fileset -> the "uid:gid" it was created with
        self.limits_kib: dict[str, int] = {}  # fileset -> block limit (KiB), 0 = none
        self.jobs: dict[int, dict[str, Any]] = {}
        self.job_polls = 1
        self.fail_jobs: list[str] = []  # stderr lines of the next jobs to fail
        self.pools = {"system": (2 * 2**30, 2**30), "data": (8 * 2**30, 6 * 2**30)}  # name -> (total KiB, free KiB)
        self.node_states = {"node1": "HEALTHY", "node2": "HEALTHY"}
        self.perf = [5.0, 3.0, 1024.0, 2048.0, 0.25, None]
        self._ids = itertools.count(1000)

    def error(self, status: int, message: str, code: str | int | None) -> web.Response:
        return web.json_response({"status": {"code": status, "message": message}}, status=status)

    def authorize(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        expected = "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
        if header != expected:
            raise SimError(401, "Unauthorized: wrong user name or password")

    def routes(self, app: web.Application) -> None:
        r = app.router
        fs = PREFIX + "/filesystems/{fs}"
        r.add_post(fs + "/filesets", self.fileset_create)
        r.add_get(fs + "/filesets/{fset}", self.fileset_get)
        r.add_delete(fs + "/filesets/{fset}", self.fileset_delete)
        r.add_get(fs + "/quotas", self.quota_list)
        r.add_post(fs + "/quotas", self.quota_set)
        r.add_get(fs + "/pools", self.pool_list)
        r.add_get(fs + "/pools/{pool}", self.pool_get)
        r.add_get(PREFIX + "/jobs/{job}", self.job_get)
        r.add_get(PREFIX + "/nodes", self.nodes)
        r.add_get(PREFIX + "/nodes/{node}/health/states", self.node_health)
        r.add_get(PREFIX + "/cluster", self.cluster)
        r.add_get(PREFIX + "/perfmon/data", self.perfmon)

    # -- state helpers ----------------------------------------------------------------

    def quota_of(self, fileset: str) -> tuple[int, int | None]:
        """(used bytes, limit bytes or None) as the quota report will show them."""
        rec = self._quota_record(fileset)
        return rec["blockUsage"] * 1024, (rec["blockLimit"] * 1024 or None)

    def _quota_record(self, fileset: str) -> dict[str, Any]:
        used = dir_usage(Path(self.filesets[fileset]["config"]["path"]))[0]
        limit = self.limits_kib.get(fileset, 0)
        return {
            "quotaId": abs(hash(fileset)) % 10**6,
            "filesystemName": self.fs_name,
            "filesetName": fileset,
            "quotaType": "FILESET",
            "objectName": fileset,
            "objectId": 1,
            "blockUsage": -(-used // 1024),
            "blockQuota": limit,
            "blockLimit": limit,
            "blockInDoubt": 0,
            "blockGrace": "none",
            "filesUsage": 1,
            "filesQuota": 0,
            "filesLimit": 0,
            "filesInDoubt": 0,
            "filesGrace": "none",
            "isDefaultQuota": False,
        }

    def _fs(self, request: web.Request) -> None:
        if request.match_info["fs"] != self.fs_name:
            raise SimError(400, f"Invalid value in 'filesystemName': {request.match_info['fs']} does not exist")

    def _job(self, request: web.Request, action: Callable[[], None], what: str) -> web.Response:
        job_id = next(self._ids)
        self.jobs[job_id] = {
            "jobId": job_id,
            "status": "RUNNING",
            "polls": self.job_polls,
            "action": action,
            "request": {"type": request.method, "url": request.path, "data": what},
            "result": {},
            "submitted": "2026-01-01 00:00:00,000",
            "completed": "N/A",
        }
        return web.json_response(
            {
                "status": {"code": 202, "message": "The request was accepted for processing."},
                "jobs": [{"jobId": job_id, "status": "RUNNING"}],
            },
            status=202,
        )

    # -- handlers ---------------------------------------------------------------------

    async def job_get(self, request: web.Request) -> web.Response:
        job = self.jobs.get(int(request.match_info["job"]))
        if job is None:
            raise SimError(404, f"Job {request.match_info['job']} not found")
        if job["status"] == "RUNNING":
            job["polls"] -= 1
            if job["polls"] <= 0:
                try:
                    if self.fail_jobs:
                        raise SimError(400, self.fail_jobs.pop(0))
                    job["action"]()
                    job["status"] = "COMPLETED"
                    job["result"] = {"exitCode": 0, "stdout": ["EFSSG0019I The command completed."], "stderr": []}
                except SimError as e:
                    job["status"] = "FAILED"
                    job["result"] = {"exitCode": 1, "stdout": [], "stderr": [e.message]}
                job["completed"] = "2026-01-01 00:00:01,000"
        view = {k: v for k, v in job.items() if k not in ("polls", "action")}
        return web.json_response(
            {"status": {"code": 200, "message": "The request finished successfully."}, "jobs": [view]}
        )

    async def fileset_create(self, request: web.Request) -> web.Response:
        self._fs(request)
        body = check_fields(
            await json_body(request),
            {"filesetName"},
            {"path", "owner", "permissions", "comment", "inodeSpace", "maxNumInodes", "allocInodes", "createDirectory"},
        )
        name = body["filesetName"]
        if name in self.filesets:
            raise SimError(409, f"Fileset {name} already exists")
        path = Path(body.get("path") or self.mount / name)
        if not path.is_absolute() or self.mount not in path.parents:
            raise SimError(400, f"Invalid value in 'path': {path} is not inside filesystem {self.fs_name}")

        def link() -> None:
            if path.exists():
                raise SimError(400, f"EFSSG0102C Junction path {path} already exists")
            path.mkdir()
            if "owner" in body and os.geteuid() == 0:
                uid, gid = (int(x) for x in str(body["owner"]).split(":"))
                os.chown(path, uid, gid)
            self.owners[name] = body.get("owner")
            self.filesets[name] = {
                "filesetName": name,
                "filesystemName": self.fs_name,
                "config": {"path": str(path), "filesetName": name, "status": "Linked"},
            }

        return self._job(request, link, f"create fileset {name}")

    async def fileset_get(self, request: web.Request) -> web.Response:
        self._fs(request)
        fset = self.filesets.get(request.match_info["fset"])
        if fset is None:
            raise SimError(404, f"Fileset {request.match_info['fset']} not found")
        return web.json_response({"filesets": [fset], "status": {"code": 200, "message": "OK"}})

    async def fileset_delete(self, request: web.Request) -> web.Response:
        self._fs(request)
        name = request.match_info["fset"]
        if name not in self.filesets:
            raise SimError(404, f"Fileset {name} not found")

        def unlink_and_delete() -> None:
            path = Path(self.filesets[name]["config"]["path"])
            if path.exists() and any(path.iterdir()):
                raise SimError(400, f"Fileset {name} contains user files; unlink and delete with force")
            if path.exists():
                path.rmdir()
            del self.filesets[name]
            self.owners.pop(name, None)
            self.limits_kib.pop(name, None)

        return self._job(request, unlink_and_delete, f"delete fileset {name}")

    async def quota_list(self, request: web.Request) -> web.Response:
        self._fs(request)
        wanted: dict[str, str] = {}
        for term in filter(None, request.query.get("filter", "").split(",")):
            key, sep, value = term.partition("=")
            if not sep:
                raise SimError(400, f"Invalid filter expression {term!r}")
            wanted[key] = value
        records = [self._quota_record(name) for name in self.filesets]
        records = [r for r in records if all(str(r.get(k)) == v for k, v in wanted.items())]
        return web.json_response({"quotas": records, "status": {"code": 200, "message": "OK"}})

    async def quota_set(self, request: web.Request) -> web.Response:
        self._fs(request)
        body = check_fields(
            await json_body(request),
            {"operationType", "quotaType", "objectName"},
            {
                "blockSoftLimit",
                "blockHardLimit",
                "filesSoftLimit",
                "filesHardLimit",
                "filesGracePeriod",
                "blockGracePeriod",
            },
        )
        if body["operationType"] != "setQuota" or body["quotaType"] != "FILESET":
            raise SimError(400, "only operationType setQuota with quotaType FILESET is simulated")
        name = body["objectName"]
        soft = limit_kib(body.get("blockSoftLimit", "0"))
        hard = limit_kib(body.get("blockHardLimit", "0"))
        if hard and soft > hard:
            raise SimError(400, "block soft limit exceeds the hard limit")

        def apply() -> None:
            if name not in self.filesets:
                raise SimError(400, f"Fileset {name} not found")
            self.limits_kib[name] = hard

        return self._job(request, apply, f"set quota {name}")

    async def pool_list(self, request: web.Request) -> web.Response:
        self._fs(request)
        return web.json_response(
            {"storagePool": [{"filesystemName": self.fs_name, "storagePoolName": n} for n in self.pools]}
        )

    async def pool_get(self, request: web.Request) -> web.Response:
        self._fs(request)
        name = request.match_info["pool"]
        if name not in self.pools:
            raise SimError(404, f"Storage pool {name} not found")
        total, free = self.pools[name]
        return web.json_response(
            {
                "storagePool": [
                    {
                        "storagePoolName": name,
                        "totalDataInKB": total,
                        "freeDataInKB": free,
                        "totalMetaInKB": 0,
                        "freeMetaInKB": 0,
                    }
                ]
            }
        )

    async def nodes(self, request: web.Request) -> web.Response:
        return web.json_response({"nodes": [{"adminNodeName": n} for n in self.node_states]})

    async def node_health(self, request: web.Request) -> web.Response:
        node = request.match_info["node"]
        if node not in self.node_states:
            raise SimError(404, f"Node {node} not found")
        return web.json_response(
            {
                "states": [
                    {"component": "GPFS", "state": self.node_states[node]},
                    {"component": "NETWORK", "state": "HEALTHY"},
                ]
            }
        )

    async def cluster(self, request: web.Request) -> web.Response:
        return web.json_response({"cluster": {"clusterSummary": {"clusterName": "gpfs-sim.example", "clusterId": 1}}})

    async def perfmon(self, request: web.Request) -> web.Response:
        query = request.query.get("query", "")
        if not query.startswith("metrics ") or "gpfs_ns_read_ops" not in query:
            raise SimError(400, f"Invalid query {query!r}")
        return web.json_response(
            {"performanceData": {"rows": [{"values": [0, 0, 0, 0, 0, 0]}, {"values": list(self.perf)}]}}
        )

    def scope_fileset(self, qsid: str) -> bool:
        return qsid in self.filesets

    def totals(self) -> tuple[int, int]:
        return (sum(t for t, _ in self.pools.values()) * 1024, sum(t - f for t, f in self.pools.values()) * 1024)
