"""The local sandbox: results, limits, sessions (state, timeouts, TTL, LRU, cleanup)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from mathmill.sandbox import Limits, LocalSandbox, SessionNotFound, session

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sandbox() -> AsyncIterator[LocalSandbox]:
    async with LocalSandbox(workers=2, limits=Limits(timeout_s=3)) as sb:
        yield sb


async def test_execute_ok_with_measurements(sandbox: LocalSandbox) -> None:
    r = await sandbox.execute("import sympy\nprint(sympy.factorint(2**64 + 1))")
    assert r.status == "ok" and r.exit_code == 0
    assert r.stdout == "{274177: 1, 67280421310721: 1}\n"
    assert r.stderr == "" and not r.stdout_truncated
    assert r.wall_ms > 0 and r.cpu_ms > 0 and (r.peak_memory_kb or 0) > 0
    assert r.backend == "local"


async def test_last_expression_is_echoed_like_a_repl(sandbox: LocalSandbox) -> None:
    r = await sandbox.execute("x = 6\nx * 7")
    assert r.stdout == "42\n"


async def test_error_has_traceback_and_exit_code(sandbox: LocalSandbox) -> None:
    r = await sandbox.execute("def f():\n    return 1 / 0\nf()")
    assert r.status == "error" and r.exit_code == 1
    assert "ZeroDivisionError" in r.stderr and "line 2" in r.stderr
    syntax = await sandbox.execute("print(")
    assert syntax.status == "error" and "SyntaxError" in syntax.stderr


async def test_exit_codes(sandbox: LocalSandbox) -> None:
    assert (await sandbox.execute("import sys; sys.exit(0)")).status == "ok"
    r = await sandbox.execute("import sys; sys.exit(3)")
    assert r.status == "error" and r.exit_code == 3


async def test_health_names_the_isolation_layers(sandbox: LocalSandbox) -> None:
    health = await sandbox.health()
    layers = health["layers"]
    assert health["ok"] and health["workers"] == 2
    assert layers["isolated"] and layers["namespaces"] and layers["proc"] and layers["tmpfs"]
    assert layers["landlock_abi"] >= 1 and layers["process_limit"]
    assert set(layers["preimported"]) == {"numpy", "sympy", "scipy", "pandas"}


async def test_per_call_limits(sandbox: LocalSandbox) -> None:
    r = await sandbox.execute("import time; time.sleep(5)", Limits(timeout_s=0.5))
    assert r.status == "timeout" and r.wall_ms < 3000
    r = await sandbox.execute("print('x' * 5000)", Limits(max_output_bytes=1024))
    assert r.status == "output_limit" and r.stdout_truncated and len(r.stdout) == 1024


async def test_parallel_executions(sandbox: LocalSandbox) -> None:
    results = await asyncio.gather(*(sandbox.execute(f"print({i} ** 2)") for i in range(12)))
    assert [r.stdout for r in results] == [f"{i**2}\n" for i in range(12)]


async def test_jobs_run_at_once_on_two_workers_and_share_nothing() -> None:
    # Two zygotes run two jobs at once, each in a process of its own with its own
    # directory, environment and deadline; a later job sees nothing they did.
    async with LocalSandbox(workers=2) as sb:
        slow, stuck = await asyncio.gather(
            sb.execute(
                "import json, os, time\nprint(time.time())\nopen('mine.txt', 'w').write('a')\n"
                "os.environ['MARK'] = json.MARK = 'a'\ntime.sleep(2)\n"
                "print(sorted(os.listdir('.')), os.environ['MARK'])\nprint(time.time())",
                Limits(timeout_s=10),
            ),
            sb.execute(
                "import time; print(time.time(), flush=True); time.sleep(30)", Limits(timeout_s=1)
            ),
        )
        assert stuck.status == "timeout" and stuck.wall_ms < 2000
        assert slow.status == "ok", slow
        slow_start, listing, slow_end = slow.stdout.splitlines()
        assert listing == "['mine.txt'] a"
        # at once, not one after the other: each started before the other ended
        stuck_start = float(stuck.stdout)
        assert max(float(slow_start), stuck_start) < min(float(slow_end), stuck_start + 1.0)
        after = await sb.execute(
            "import json, os\nprint(os.listdir('.'), os.environ.get('MARK'), hasattr(json, 'MARK'))"
        )
        assert after.stdout == "[] None False\n"


SNOOP = """
import gc, sys
found, seen = set(), set()
def walk(root):
    todo = [root]
    while todo:
        value = todo.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, (bytes, bytearray, memoryview)):
            value = bytes(value).decode(errors="replace")
        if isinstance(value, str):
            if "TOKEN" + "-" in value:
                found.add(value.strip()[:200])
            continue
        todo.extend(gc.get_referents(value))
frame = sys._getframe()
while frame is not None:  # up into the zygote's own stack, and all it reaches
    walk(frame.f_locals)
    frame = frame.f_back
for o in gc.get_objects():  # every other container the zygote left in this copy
    walk(o)
print(sorted(found))
"""


async def test_a_job_or_session_cannot_read_what_another_job_is_doing() -> None:
    # A job is a copy of its zygote's memory: the zygote must not hold another job's
    # code or output while it clones one (it runs one job or turn at a time, and
    # reads the next request only then). The snoops look for A's token everywhere
    # the interpreter can reach, from gc's objects to the zygote's own stack.
    token = "TOKEN-" + os.urandom(8).hex()
    async with LocalSandbox(workers=1) as sb:
        a_code = f"import time\nprint({token!r}, flush=True)\ntime.sleep(2)\nprint('done')"
        a_task = asyncio.create_task(sb.execute(a_code, Limits(timeout_s=10)))
        await asyncio.sleep(0.5)  # A is running, its first line read by the zygote
        sid_task = asyncio.create_task(sb.create_session())
        snoops = [await sb.execute(SNOOP) for _ in range(3)]  # each cloned after the last
        a = await a_task
        snoops.append(await sb.run_in_session(await sid_task, SNOOP))
        assert a.status == "ok" and a.stdout == f"{token}\ndone\n", a
        for snoop in snoops:
            assert snoop.status == "ok", snoop
            assert token not in snoop.stdout, snoop.stdout


async def test_a_job_flooding_its_result_pipe_is_stopped(sandbox: LocalSandbox) -> None:
    # the job can find its result pipe in /proc/self/fd: the zygote caps what it reads
    code = (
        "import os\n"
        "for fd in sorted(map(int, os.listdir('/proc/self/fd'))):\n"
        "    if fd > 2:\n"
        "        try:\n"
        "            while True:\n"
        "                os.write(fd, b'x' * 65536)\n"
        "        except OSError:\n"
        "            pass\n"
    )
    flood = await sandbox.execute(code, Limits(timeout_s=20))
    assert flood.status == "output_limit", flood
    after = await sandbox.execute("print(6 * 7)")
    assert after.stdout == "42\n"


async def test_health_answers_while_every_worker_is_busy() -> None:
    # a busy zygote reads no request before its job is done: health must not wait
    async with LocalSandbox(workers=1) as sb:
        job = asyncio.create_task(sb.execute("import time; time.sleep(30)", Limits(timeout_s=60)))
        await asyncio.sleep(0.5)
        health = await asyncio.wait_for(sb.health(), 5)
        assert health["ok"] and health["layers"]["isolated"], health
        job.cancel()


async def test_every_job_and_session_draws_its_own_random_numbers(sandbox: LocalSandbox) -> None:
    # jobs are clones of one zygote: without a reseed they would share its generators
    code = "import random, numpy\nprint(random.random(), numpy.random.rand())"
    jobs = await asyncio.gather(*(sandbox.execute(code) for _ in range(4)))
    async with session(sandbox) as a, session(sandbox) as b:
        turns = [await sandbox.run_in_session(a, code), await sandbox.run_in_session(b, code)]
    draws = [r.stdout.split() for r in [*jobs, *turns]]
    assert all(r.status == "ok" for r in [*jobs, *turns]), draws
    for generator in zip(*draws, strict=True):  # random's draws, then numpy's
        assert len(set(generator)) == len(generator), draws


async def test_limits_are_per_job_while_jobs_run_at_once() -> None:
    async with LocalSandbox(workers=3) as sb:
        small, big, disk = await asyncio.gather(
            sb.execute("x = bytearray(200 * 2**20)", Limits(memory_mb=64)),
            sb.execute("x = bytearray(200 * 2**20)\nprint('ok')"),
            sb.execute("open('f', 'wb').write(b'0' * (2 << 20))", Limits(disk_mb=1)),
        )
        assert small.status == "memory" and big.stdout == "ok\n"
        assert disk.status == "error" and "No space left" in disk.stderr


async def test_stateful_session_survives_a_timed_out_turn(sandbox: LocalSandbox) -> None:
    async with session(sandbox) as sid:
        r1 = await sandbox.run_in_session(sid, "import sympy\nx = sympy.Symbol('x')\nn = 10")
        assert r1.status == "ok" and r1.kept
        r2 = await sandbox.run_in_session(
            sid, "def square(k: int) -> int:\n    return k * k\nclass A:\n    def m(self): pass"
        )
        assert r2.state is not None
        assert r2.state.summary == (
            "imports: sympy | vars: x=x, n=10 | funcs: square(k: int) -> int | classes: A"
        )
        assert [c.model_dump() for c in r2.state.classes] == [{"name": "A", "methods": ["m"]}]
        r3 = await sandbox.run_in_session(sid, "n = 999\nwhile True: pass", timeout_s=1)
        assert r3.status == "timeout" and not r3.kept
        assert r3.state is not None and "n=10" in r3.state.summary
        r4 = await sandbox.run_in_session(sid, "print(n, square(n), sympy.expand((x + 1)**2))")
        assert r4.status == "ok" and r4.stdout == "10 100 x**2 + 2*x + 1\n"
        # A crash and a memory error are discarded the same way.
        crash = await sandbox.run_in_session(sid, "n = -1\nimport ctypes; ctypes.string_at(0)")
        assert crash.status == "crashed" and not crash.kept
        mem = await sandbox.run_in_session(sid, "n = -2\nx = bytearray(8 * 1024**3)")
        assert mem.status == "memory" and not mem.kept
        # An exception is a normal REPL turn: what ran before it is kept.
        err = await sandbox.run_in_session(sid, "n = 11\nraise ValueError('boom')")
        assert err.status == "error" and err.kept and "ValueError: boom" in err.stderr
        state = await sandbox.session_state(sid)
        assert "n=11" in state.summary and state.imports == ["sympy"]


async def test_session_state_shapes_and_reset(sandbox: LocalSandbox) -> None:
    async with session(sandbox) as sid:
        r = await sandbox.run_in_session(
            sid, "import numpy as np\nm = np.zeros((3, 4))\nresult = [1, 2]\ns = 'y' * 500"
        )
        assert r.state is not None
        variables = {v.name: v for v in r.state.variables}
        assert variables["m"].repr == "ndarray[3, 4]" and variables["result"].repr == "list[2]"
        assert len(variables["s"].repr) <= 80 and r.state.imports == ["numpy as np"]
        await sandbox.reset_session(sid)
        assert (await sandbox.session_state(sid)).summary == "(empty)"
        r = await sandbox.run_in_session(sid, "print(result)")
        assert r.status == "error" and "NameError" in r.stderr


async def test_sessions_are_isolated_from_each_other(sandbox: LocalSandbox) -> None:
    async with session(sandbox) as a, session(sandbox) as b:
        await sandbox.run_in_session(a, "secret_of_a = 'hunter2'")
        r = await sandbox.run_in_session(
            b,
            "import gc, os\n"
            "found = any('hunter2' in repr(o) for o in gc.get_objects() if isinstance(o, str))\n"
            "print(found, sorted(p for p in os.listdir('/proc') if p.isdigit()))",
        )
        assert r.stdout.startswith("False ")
        # Only session b's own processes are visible (init, holder, this turn).
        assert len(eval(r.stdout.split(" ", 1)[1])) <= 3


async def test_deleted_and_unknown_sessions() -> None:
    async with LocalSandbox(workers=1, max_sessions_per_worker=2) as sb:
        sid = await sb.create_session()
        await sb.delete_session(sid)
        with pytest.raises(SessionNotFound):
            await sb.run_in_session(sid, "print(1)")
        with pytest.raises(SessionNotFound):
            await sb.session_state("0-nope")
        # Least recently used eviction past max_sessions_per_worker.
        first, second = await sb.create_session(), await sb.create_session()
        await sb.run_in_session(first, "a = 1")
        third = await sb.create_session()
        with pytest.raises(SessionNotFound):
            await sb.run_in_session(second, "print(1)")
        assert (await sb.run_in_session(first, "print(a)")).stdout == "1\n"
        assert (await sb.run_in_session(third, "print(2)")).stdout == "2\n"
        assert (await sb.health())["sessions"] == 2


async def test_idle_ttl_and_max_turns() -> None:
    async with LocalSandbox(workers=1, session_ttl_s=1, max_turns=2) as sb:
        sid = await sb.create_session()
        await sb.run_in_session(sid, "a = 1")
        await sb.run_in_session(sid, "a = 2")
        with pytest.raises(Exception, match="reached its 2 turns"):
            await sb.run_in_session(sid, "a = 3")
        idle = await sb.create_session()
        await asyncio.sleep(2.5)
        with pytest.raises(SessionNotFound):
            await sb.session_state(idle)


async def test_worker_crash_is_reported_and_recovered() -> None:
    import os
    import signal

    from mathmill.sandbox import SandboxError

    async with LocalSandbox(workers=1) as sb:
        sid = await sb.create_session()
        worker = sb._workers[0]
        assert worker.proc is not None
        job = asyncio.create_task(sb.execute("import time; time.sleep(3); print('done')"))
        await asyncio.sleep(0.5)
        os.kill(worker.proc.pid, signal.SIGKILL)
        with pytest.raises(SandboxError, match="died or hung during 'exec'"):
            await job
        await asyncio.sleep(0.2)
        again = await sb.execute("print(2)")
        assert again.status == "ok" and again.stdout == "2\n"
        with pytest.raises(SessionNotFound):
            await sb.run_in_session(sid, "print(3)")
