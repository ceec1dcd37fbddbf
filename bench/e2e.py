"""End to end: ``mathmill run sample`` vs a plain asyncio + ``openai`` script.

Both are subprocesses sending the same requests (mathmill's sample defaults and
concurrency, one sample) to one fake OpenAI-compatible server (its own process, instant
answers unless ``--latency-ms``, most right, by a hash of the problem; it logs each
distinct request shape) and grading with mathmill.grading, in alternating rounds.
Prints wall s, CPU s (user+sys of the waited-for tree), peak RSS (summed over the
tree), Prefect server CPU, mathmill/plain (target: wall <= 1.5 on 1,000 problems), the
fixed cost of ``--limit 1`` with the server up (target <= 3 s), the first run's extra
cost of starting it, the correct counts.
By default ``mathmill run`` starts its server under a temporary MATHMILL_SERVER_HOME on a
free port (stopped at the end); ``--prefect-api-url URL`` uses a running one.

    .venv/bin/python bench/e2e.py [--problems 1000] [--rounds 2] [--latency-ms 0] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from fractions import Fraction
from pathlib import Path
from typing import Any

PY = sys.executable
CLI = str(Path(PY).with_name("mathmill"))
MM = [CLI] if os.path.exists(CLI) else [PY, "-m", "mathmill"]
FIELDS = ("temperature", "top_p", "max_tokens", "seed", "concurrency")
DEFAULTS = (
    "import json; from mathmill.flows.sample import SampleParams as P; "
    f"print(json.dumps({{k: P.model_fields[k].default for k in {FIELDS}}}))"
)
Figures = dict[str, float]
PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20


def make_problems(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Unique problems with exact answers: integers, fractions, decimals."""
    rng, seen, rows = random.Random(seed), set(), list[dict[str, str]]()
    while len(rows) < n:
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(1, 99)
        if (kind := len(rows) % 4) < 2:
            q = f"Compute {a} * {b} + {c}." if kind == 0 else f"Compute {a} - {b} * {c}."
            ans = str(a * b + c if kind == 0 else a - b * c)
        elif kind == 2:
            f = Fraction(a, b) + Fraction(c, a + b)
            q = rf"Compute \frac{{{a}}}{{{b}}} + \frac{{{c}}}{{{a + b}}} as a reduced fraction."
            ans = rf"\frac{{{f.numerator}}}{{{f.denominator}}}" if f.denominator > 1 else str(f)
        else:
            q, ans = f"Write {a * 8 + c % 8}/8 as a decimal.", str((a * 8 + c % 8) / 8)
        if q not in seen:
            seen.add(q)
            rows.append({"id": f"p{len(rows)}", "problem": q, "answer": ans})
    return rows


def reply_for(problem: str, answer: str) -> tuple[str, bool]:
    """The fake model's solution, and whether it is meant to be right (~88%)."""
    h = hashlib.sha256(problem.encode()).digest()
    if h[0] < 20:
        return "I am not sure how to finish this.", False
    if h[0] < 30:
        return rf"Step 1: work it out. The answer is \boxed{{{answer} + 1}}.", False
    if answer.startswith(r"\frac") and h[1] % 2:  # an equivalent form: parsed, not compared
        answer = answer[6:-1].replace("}{", "/")
    return rf"Step 1: work it out. The answer is \boxed{{{answer}}}.", True


def serve(problems: str, port: str, shapes: str, latency_ms: str = "0") -> None:
    """The fake server process: answers from ``problems`` after ``latency_ms``; logs each
    new request shape.
    """
    from mathmill.llm.fake_server import FakeOpenAIServer, RecordedRequest, Reply

    rows = [json.loads(line) for line in Path(problems).read_text().splitlines()]
    answers = {r["problem"].strip(): r["answer"] for r in rows}
    seen: set[str] = set()
    delay = float(latency_ms) / 1000

    def handler(r: RecordedRequest) -> Reply:
        body, msgs = r.body or {}, r.messages
        shape = {k: v for k, v in body.items() if k != "messages"}
        shape["roles"] = [m["role"] for m in msgs]
        shape["system"] = hashlib.sha256(str(msgs[0]["content"]).encode()).hexdigest()[:12]
        if (key := json.dumps(shape, sort_keys=True)) not in seen:
            seen.add(key)
            with open(shapes, "a") as f:
                f.write(key + "\n")
        problem = str(msgs[-1]["content"]).strip()
        return Reply(reply_for(problem, answers.get(problem, "?"))[0], delay_s=delay)

    FakeOpenAIServer(handler, model="fake", port=int(port), record=False).start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    while True:
        time.sleep(3600)


def plain(problems: str, out: str, base_url: str, defaults: str, limit: str) -> None:
    """The baseline: the same calls and grading with asyncio + openai; rows to ``out``."""
    import asyncio

    import openai

    from mathmill.grading import extract_answer, grade

    sampling = json.loads(defaults)
    concurrency = sampling.pop("concurrency")
    system = (Path(__file__).parents[1] / "mathmill/prompts/sample_system.md").read_text("utf-8")
    rows = [json.loads(line) for line in Path(problems).read_text().splitlines()][: int(limit)]

    async def generate() -> list[tuple[dict[str, str], Any]]:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=2)
        todo, done = iter(rows), []

        async def worker() -> None:
            for row in todo:
                msgs: Any = [{"role": "system", "content": system}]
                msgs.append({"role": "user", "content": row["problem"]})
                r = await client.chat.completions.create(
                    model="fake", messages=msgs, logprobs=True, **sampling
                )
                done.append((row, r.choices[0]))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        await client.close()
        return done

    with open(out, "w") as f:
        for row, c in asyncio.run(generate()):
            text = c.message.content or ""
            status, found = "no_answer", extract_answer(text)
            if found is not None:
                status = "correct" if grade(row["answer"], found.text).equivalent else "incorrect"
            lps = [t.logprob for t in (c.logprobs.content or [])] if c.logprobs else []
            line = {"problem": row["problem"], "reference": row["answer"], "text": text}
            line |= {"final_answer": found and found.text, "status": status, "logprobs": lps}
            f.write(json.dumps(line | {"logprob_sum": sum(lps)}) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stat(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def tree(root: int) -> list[int]:
    """``root`` and its living descendants."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                kids.setdefault(int(stat(d)[1]), []).append(int(d))
    found, todo = [], [root]
    while todo:
        found.append(pid := todo.pop())
        todo += kids.get(pid, [])
    return found


def usage(pids: list[int]) -> tuple[float, float]:
    """(RSS MiB, user+sys CPU s of them and their reaped children) summed over ``pids``."""
    pages = ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat(pid)
            pages, ticks = pages + int(fields[21]), ticks + sum(map(int, fields[11:15]))
    return pages * PAGE_MB, ticks / os.sysconf("SC_CLK_TCK")


def measure(cmd: list[str], env: dict[str, str], log: Path, server: int | None) -> Figures:
    """Run ``cmd`` to the end: wall, CPU of its tree, peak tree RSS, server CPU."""
    before, srv0 = resource.getrusage(resource.RUSAGE_CHILDREN), usage(tree(server or -1))[1]
    start, peak, stop = time.perf_counter(), [0.0], threading.Event()
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=log.parent)

    def sample() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], usage(tree(proc.pid))[0])

    threading.Thread(target=sample, daemon=True).start()
    try:
        rc = proc.wait()
    finally:
        stop.set()
        if proc.poll() is None:  # interrupted: leave nothing running
            proc.kill()
            proc.wait()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"{' '.join(cmd[:3])} ... exited {rc}; log {log}:\n{tail}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    srv = usage(tree(server))[1] - srv0 if server else float("nan")
    return {"wall_s": wall, "cpu_s": cpu, "rss_mb": peak[0], "server_cpu_s": srv}


def statuses(path: Path) -> dict[str, str]:
    rows = (json.loads(line) for line in path.read_text().splitlines() if line)
    return {r["problem"]: r["status"] for r in rows}


def counts(st: dict[str, str]) -> str:
    keys = ("correct", "incorrect", "no_answer", "error")
    return " ".join(f"{k}={sum(v == k for v in st.values())}" for k in keys)


def show(label: str, m: Figures, st: dict[str, str] | None = None) -> None:
    srv = "-" if m["server_cpu_s"] != m["server_cpu_s"] else f"{m['server_cpu_s']:.2f}"
    print(f"{label:<27}{m['wall_s']:>8.2f}{m['cpu_s']:>8.2f}{m['rss_mb']:>9.0f}{srv:>10}", end="")
    print(f"  {counts(st) if st is not None else ''}")


def report(fig: dict[str, Any], shapes: list[str], path: Path | None) -> None:
    """Print the summary (and write ``fig`` to ``path``)."""
    rows, n = fig["runs"], fig["problems"]

    def med(path: str, key: str) -> float:
        return float(statistics.median(r[key] for r in rows if r["path"] == path))

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    walls = [m["wall_s"] for m in fig["fixed"]]
    best, median, one = min(walls), statistics.median(walls), fig["plain_1"]["wall_s"]
    fig["first_extra_s"] = extra = fig["first"]["wall_s"] - median
    print(f"\nfixed cost (--limit 1, server up): best {best:.2f} s, median {median:.2f} s ", end="")
    print(f"(target <= 3 s: {met(best <= 3)}); plain: {one:.2f} s")
    why = "starting the server" if fig["started"] else "the server was up already"
    print(f"first run's extra cost over the median ({why}): {extra:.2f} s")
    keys = ("wall_s", "cpu_s", "rss_mb")
    fig["ratios"] = x = {k: med("mathmill", k) / med("plain", k) for k in keys}
    print(f"mathmill/plain, {n} problems, medians: wall {x['wall_s']:.2f} ", end="")
    print(f"(target <= 1.5: {met(x['wall_s'] <= 1.5)}), CPU {x['cpu_s']:.2f}", end="")
    print(f", RSS {x['rss_mb']:.2f}")
    ms = {"mathmill": (med("mathmill", "wall_s") - median) * 1e3 / n}
    ms["plain"] = (med("plain", "wall_s") - one) * 1e3 / n
    print(f"wall ms per problem beyond --limit 1: mathmill {ms['mathmill']:.2f}, plain", end="")
    print(f" {ms['plain']:.2f}")
    ref, statuses = rows[0]["statuses"], [r.pop("statuses") for r in rows]
    fig["differences"] = sum(sum(ref.get(p) != s for p, s in st.items()) for st in statuses)
    fig["correct"] = sorted({sum(v == "correct" for v in st.values()) for st in statuses})
    fig |= {"ms_per_problem": ms, "shapes": shapes}
    print(f"correct per run: {fig['correct']} (the fake server meant {fig['intended']}); ", end="")
    print(f"per-problem differences: {fig['differences']}; request shapes:", *shapes, sep="\n  ")
    if len(fig["correct"]) != 1 or fig["differences"] or len(shapes) != 1:
        print("WARNING: the two paths did not send the same requests or grade the same")
    if path is not None:
        path.write_text(json.dumps(fig, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--problems", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2, help="alternating mathmill/plain rounds")
    ap.add_argument("--fixed-runs", type=int, default=3, help="--limit 1 runs, server up")
    ap.add_argument("--prefect-api-url", help="use this running Prefect server")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument(
        "--latency-ms", type=float, default=0.0, help="the fake server's delay per answer"
    )
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally blocks run
    with tempfile.TemporaryDirectory(prefix="mathmill-e2e-") as tmp:
        try:
            run(args, Path(tmp))
        except KeyboardInterrupt:
            raise SystemExit("interrupted") from None


def run(args: argparse.Namespace, tmp: Path) -> None:
    problems, data = make_problems(args.problems), tmp / "problems.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in problems))
    intended = sum(reply_for(r["problem"], r["answer"])[1] for r in problems)
    drop = ("MATHMILL_", "OPENAI_", "PREFECT_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PREFECT_HOME"] = str(tmp / "prefect-home")  # not the caller's profile or results
    home, port = tmp / "server", free_port()
    if args.prefect_api_url:
        env["PREFECT_API_URL"] = mode = args.prefect_api_url
    else:
        env |= {"MATHMILL_SERVER_HOME": str(home), "MATHMILL_SERVER_PORT": str(port)}
        mode = f"started by the first `mathmill run` (home {home}, port {port})"
    fake_port, shapes = free_port(), tmp / "shapes.jsonl"
    cmd = [PY, __file__, "_serve", str(data), str(fake_port), str(shapes), str(args.latency_ms)]
    fake = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{fake_port}/v1"
    try:
        for _ in range(400):
            try:
                urllib.request.urlopen(f"{base}/models", timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        got = subprocess.run([PY, "-c", DEFAULTS], env=env, capture_output=True, check=True)
        defaults = json.loads(got.stdout)
        print(
            f"e2e: {args.problems} problems, {args.rounds} rounds; fake server {base}, "
            f"{args.latency_ms:g} ms per answer"
        )
        print(f"Prefect server: {mode}\nmathmill's sample defaults: {defaults}")

        def server_pid() -> int | None:
            pid = home / "server.pid"
            return int(pid.read_text()) if pid.exists() else None

        def mathmill(name: str, limit: int) -> Figures:
            cmd = [*MM, "run", "sample", "--samples", "1", "--limit", str(limit), "--input"]
            cmd += [str(data), "--base-url", base, "--model", "fake", "--out", str(tmp / name)]
            return measure(cmd, env, tmp / f"{name}.log", server_pid())

        def baseline(name: str, limit: int) -> Figures:
            cmd = [PY, __file__, "_plain", str(data), str(tmp / f"{name}.jsonl"), base]
            return measure([*cmd, json.dumps(defaults), str(limit)], env, tmp / f"{name}.log", None)

        print(f"\n{'run':<27}{'wall s':>8}{'CPU s':>8}{'RSS MiB':>9}{'srv CPU s':>10}  graded")
        first = mathmill("first", 1)
        if (pid := server_pid()) is not None:  # its start-up CPU, outside the waited-for tree
            first["server_cpu_s"] = usage(tree(pid))[1]
        elif not args.prefect_api_url:
            print("WARNING: `mathmill run` started no server under MATHMILL_SERVER_HOME")
        show("mathmill --limit 1, first", first)
        fixed = [mathmill(f"fixed-{i}", 1) for i in range(args.fixed_runs)]
        for i, m in enumerate(fixed):
            show(f"mathmill --limit 1, #{i + 1}", m)
        plain1 = baseline("plain-1", 1)
        show("plain --limit 1", plain1)
        rows: list[dict[str, Any]] = []
        for i in range(args.rounds):
            for path in ["mathmill", "plain"] if i % 2 == 0 else ["plain", "mathmill"]:
                name = f"{path}-r{i}"
                m = (mathmill if path == "mathmill" else baseline)(name, args.problems)
                out = tmp / name / "samples.jsonl" if path == "mathmill" else tmp / f"{name}.jsonl"
                rows.append(m | {"path": path, "round": i + 1, "statuses": statuses(out)})
                show(f"{path} {args.problems}, round {i + 1}", m, rows[-1]["statuses"])

        fig = {"problems": args.problems, "prefect": mode, "defaults": defaults, "first": first}
        fig["latency_ms"] = args.latency_ms
        fig |= {"fixed": fixed, "plain_1": plain1, "runs": rows, "intended": intended}
        fig["started"] = not args.prefect_api_url and server_pid() is not None
        report(fig, shapes.read_text().splitlines(), args.json)
    finally:
        fake.terminate()
        fake.wait(timeout=10)
        if not args.prefect_api_url:
            down = [*MM, "server", "down", "--home", str(home)]
            subprocess.run(down, env=env, stdout=subprocess.DEVNULL, check=False)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_serve"]:
        serve(*sys.argv[2:])
    elif sys.argv[1:2] == ["_plain"]:
        plain(*sys.argv[2:])
    else:
        main()
