"""The zygote's stateless jobs: up to ``max_jobs`` running at once, the others
waiting in order, and as many job processes cloned ahead of their jobs.

A job process is cloned while the zygote has nothing else to do. It sets itself up
as far as no job limit is needed (namespaces, uid maps, pids cgroup, closed
descriptors) and waits for its job, code and limits, on a pipe; everything that
depends on the job's limits (mounts, rlimits, Landlock, capabilities) happens after
that. Each job process runs exactly one job, so nothing carries over between jobs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import selectors
import shutil
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mathmill.sandbox import isolation as iso
from mathmill.sandbox.box import Box, detach_output, redirect, spawn_namespaced
from mathmill.sandbox.guest import fresh_randomness, new_namespace, run_code
from mathmill.sandbox.jobs import Job, kill_group
from mathmill.sandbox.limits import Limits
from mathmill.sandbox.wire import recv_msg, send_msg

__all__ = ["Stateless"]

log = logging.getLogger("mathmill.sandbox")

Reply = Callable[[Any, dict[str, Any]], None]
MakeBox = Callable[[str, Limits, str], Box]


@dataclass
class _Ready:
    """A job process cloned ahead of its job, waiting for it on ``task``."""

    pid: int
    fds: tuple[int, int, int]
    task: int
    box: Box

    def discard(self, *, reaped: bool) -> None:
        """Close its pipes; unless ``reaped``, kill and reap it."""
        for fd in (*self.fds, self.task):
            os.close(fd)
        if not reaped:
            kill_group(self.pid)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)


@dataclass
class _Waiting:
    request_id: Any
    code: str
    limits: Limits
    fields: dict[str, Any]


class Stateless:
    """Stateless jobs of one zygote. ``make_box(job_root, limits, name)`` describes a
    job process; ``reply`` answers a request of the zygote's client. With
    ``shared_root``, every job mounts its own tmpfs on that one directory.
    """

    def __init__(
        self,
        selector: selectors.BaseSelector,
        make_box: MakeBox,
        reply: Reply,
        *,
        limits: Limits,
        max_jobs: int,
        workdir: str,
        shared_root: str | None,
    ) -> None:
        self.running: dict[int, Job] = {}
        self.waiting: deque[_Waiting] = deque()
        self.max_jobs = max_jobs
        self._selector = selector
        self._make_box = make_box
        self._reply = reply
        self._limits = limits
        self._workdir = workdir
        self._shared_root = shared_root
        self._names = itertools.count()
        self._ready: deque[_Ready] = deque()
        self.prepare_after = 0.0
        self._stale_cgroups: list[str] = []

    @property
    def wants_ready(self) -> bool:
        """Fewer job processes wait for a job than can run at once."""
        return len(self._ready) < self.max_jobs

    def submit(self, request_id: Any, code: str, limits: Limits, fields: dict[str, Any]) -> None:
        """Run a job (``fields``: its validated limits as a dict) now or in turn."""
        self.waiting.append(_Waiting(request_id, code, limits, fields))
        self._start_waiting()

    def prepare(self) -> None:
        """Clone a job process ahead (once a second at most after a failure)."""
        if not self.wants_ready or time.monotonic() < self.prepare_after:
            return
        try:
            self._ready.append(self._clone())
        except OSError:
            log.exception("sandbox: could not clone a job process ahead")
            self.prepare_after = time.monotonic() + 1.0

    def _clone(self) -> _Ready:
        name = f"job-{next(self._names)}"
        job_root = self._shared_root or os.path.join(self._workdir, "jobs", name)
        if job_root != self._shared_root:
            os.makedirs(job_root, mode=0o700)
        box = self._make_box(job_root, self._limits, name)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        res_r, res_w = os.pipe()
        task_r, task_w = os.pipe()

        def body() -> None:
            task = recv_msg(task_r)
            os.close(task_r)
            if not task:
                os._exit(0)  # never used: the zygote is shutting down
            if task["limits"] is not None:  # else the zygote's own: already in box
                box.limits = Limits.model_construct(**task["limits"])  # validated there
            box.enter_init()
            redirect(out_w, err_w)
            box.harden(cpu=True)
            fresh_randomness()
            report = run_code(task["code"], new_namespace())
            detach_output()
            os.write(res_w, json.dumps(report).encode() + b"\n")
            os._exit(0)

        try:
            pid = spawn_namespaced(box, {out_w, err_w, res_w, task_r}, body)
        except BaseException:
            for fd in (out_r, err_r, res_r, task_w):
                os.close(fd)
            self._clean_up(box)
            raise
        finally:
            for fd in (out_w, err_w, res_w, task_r):
                os.close(fd)
        return _Ready(pid, (out_r, err_r, res_r), task_w, box)

    def _take_ready(self) -> _Ready:
        """A job process cloned ahead that is still alive, else a new one."""
        while self._ready:
            ready = self._ready.popleft()
            if os.waitpid(ready.pid, os.WNOHANG)[0] == 0:
                return ready
            ready.discard(reaped=True)
            self._clean_up(ready.box)
        return self._clone()

    def _start(self, waiting: _Waiting) -> None:
        ready = self._take_ready()
        limits = waiting.limits
        if ready.box.cgroup and limits.max_processes != ready.box.limits.max_processes:
            iso.PidsCgroup.set_max(ready.box.cgroup, limits.max_processes + 2)
        try:
            fields = None if limits == ready.box.limits else waiting.fields
            send_msg(ready.task, {"code": waiting.code, "limits": fields})
        except OSError:  # it died just now: its result says so
            log.warning("sandbox: job process %d died before its job", ready.pid)
        finally:
            os.close(ready.task)
        box = dataclasses.replace(ready.box, limits=limits)
        start = time.monotonic()
        self.running[ready.pid] = Job(
            waiting.request_id, ready.pid, ready.fds, box, start, self._selector
        )

    def _start_waiting(self) -> None:
        while self.waiting and len(self.running) < self.max_jobs:
            waiting = self.waiting.popleft()
            try:
                self._start(waiting)
            except Exception as e:  # report and keep serving
                log.exception("sandbox: could not start a job")
                self._reply(waiting.request_id, {"error": f"{type(e).__name__}: {e}", "code": 500})

    def _clean_up(self, box: Box) -> None:
        if not box.shared_root:
            shutil.rmtree(box.job_root, ignore_errors=True)
        if box.cgroup and not iso.PidsCgroup.try_remove(box.cgroup):
            self._stale_cgroups.append(box.cgroup)  # processes still exiting: later

    def tick(self, now: float) -> float:
        """Enforce deadlines; returns when to look again."""
        wake = now + 1.0
        for job in self.running.values():
            wake = min(wake, job.tick(now))
        if self._stale_cgroups:
            self._stale_cgroups = [
                c for c in self._stale_cgroups if not iso.PidsCgroup.try_remove(c)
            ]
            if self._stale_cgroups:
                wake = min(wake, now + 0.05)
        return wake

    def finish(self) -> None:
        """Answer the jobs that are done and start those waiting."""
        for pid, job in list(self.running.items()):
            if job.done:
                del self.running[pid]
                self._reply(job.request_id, job.result())
                self._clean_up(job.box)
        self._start_waiting()

    def close(self) -> None:
        """Kill every job process (the zygote is shutting down)."""
        while self._ready:
            ready = self._ready.popleft()
            ready.discard(reaped=False)
            self._clean_up(ready.box)
        for job in self.running.values():
            job.abort()
            self._clean_up(job.box)
        self.running.clear()
        for cgroup in self._stale_cgroups:
            iso.PidsCgroup.remove(cgroup)
        self._stale_cgroups.clear()
