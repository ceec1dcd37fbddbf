"""The session holder loop, inside the sandbox: each turn runs in a fork that takes
over as the holder on success and is discarded on timeout, crash, memory error or
output overflow.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import resource
import signal
import time
from typing import Any

from mathmill.sandbox.box import Box, detach_output, redirect
from mathmill.sandbox.guest import describe_state, fresh_randomness, run_code
from mathmill.sandbox.supervise import cpu_aware_exit, result_fields, supervise
from mathmill.sandbox.wire import recv_msg, send_msg

__all__ = ["holder_loop"]


def holder_loop(sock: int, box: Box, namespace: dict[str, Any], state: dict[str, Any]) -> None:
    """Serve turns for one session until the zygote closes the socket."""
    fresh_randomness()
    baseline = set(namespace)
    while True:
        msg = recv_msg(sock)
        if msg is None:
            os._exit(0)
        if msg["op"] == "state":
            send_msg(sock, {"state": state})
            continue
        if msg["op"] != "exec":
            send_msg(sock, {"error": f"unknown op {msg['op']!r}"})
            continue
        timeout = float(msg["timeout_s"])
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        res_r, res_w = os.pipe()
        keep_r, keep_w = os.pipe()
        start = time.monotonic()
        child = os.fork()
        if child == 0:  # T: run the turn; on success, become the holder
            for fd in (out_r, err_r, res_r, keep_r):
                os.close(fd)
            os.setpgid(0, 0)
            redirect(out_w, err_w)
            os.close(out_w)
            os.close(err_w)
            limits = box.limits
            box.apply_rlimits(limits.cpu_limit if timeout >= limits.timeout_s else int(timeout) + 1)
            report = run_code(msg["code"], namespace)
            own = resource.getrusage(resource.RUSAGE_SELF)
            report["cpu_ms"] = (own.ru_utime + own.ru_stime) * 1000
            report["peak_memory_kb"] = own.ru_maxrss
            try:
                report["state"] = describe_state(namespace, baseline)
            except BaseException as e:  # a hostile __repr__ must not break the session
                report["state"] = dict(state, summary=f"(state unavailable: {type(e).__name__})")
            keep = report["status"] in ("ok", "error")
            detach_output()
            if keep:
                os.write(keep_w, b"K")
            os.close(keep_w)
            os.write(res_w, json.dumps(report).encode() + b"\n")
            os.close(res_w)
            if not keep:
                os._exit(1)
            state = report["state"]
            continue  # T is the holder now; H sends the reply and exits
        for fd in (out_w, err_w, res_w, keep_w):
            os.close(fd)
        got = supervise(out_r, err_r, res_r, start + timeout, box.limits.max_output_bytes)
        kept = False
        if got.timed_out or got.overflow:
            with contextlib.suppress(OSError):
                os.killpg(child, signal.SIGKILL)
            box.kill_others({1, os.getpid()})
        else:
            fcntl.fcntl(keep_r, fcntl.F_SETFL, os.O_NONBLOCK)
            with contextlib.suppress(BlockingIOError):
                kept = os.read(keep_r, 1) == b"K"
        os.close(keep_r)
        exit_status, usage = None, None
        if not kept:
            _, status, usage = os.wait4(child, 0)
            exit_status = cpu_aware_exit(status, usage, box.limits)
            box.kill_others({1, os.getpid()})
        reply = result_fields(got, exit_status, (time.monotonic() - start) * 1000, usage)
        reported = reply.pop("reported")
        reply["state"] = reported["state"] if kept and reported else state
        reply["kept"] = kept
        send_msg(sock, reply)
        if kept:
            os._exit(0)  # the turn's process serves the session from now on
