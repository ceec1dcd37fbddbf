"""Run bookkeeping: per stage, chunks planned, done, reused and failed, rows written,
busy time; counts by outcome; the Prefect progress artifact; and listeners (the
terminal's live view) that see the same figures.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import io
import logging
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from mathmill.pipeline.chunks import StageOutput

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.live import Live

    from mathmill.llm.usage import UsageMeter

__all__ = ["LiveProgress", "StageProgress", "Tracker", "live_listener"]
log = logging.getLogger("mathmill.progress")


@dataclass
class StageProgress:
    """One stage's figures so far."""

    planned: int = 0
    done: int = 0
    reused: int = 0
    failed: int = 0
    rows: int = 0
    busy_s: float = 0.0
    started: float | None = None

    def eta_s(self, now: float) -> float | None:
        """Seconds left at the pace so far (None before the first chunk ends)."""
        if not self.done or self.started is None or self.done >= self.planned:
            return None
        return (now - self.started) / self.done * (self.planned - self.done)


Listener = Callable[["Tracker"], None]
live_listener: contextvars.ContextVar[Listener | None] = contextvars.ContextVar(
    "mathmill_live_listener", default=None
)
"""Set by ``mathmill run`` to draw the run's progress in the terminal."""


class Tracker:
    """Counts, per-stage progress and the progress artifact of a run."""

    def __init__(
        self,
        *,
        artifacts: bool = True,
        listener: Listener | None = None,
        meter: UsageMeter | None = None,
    ) -> None:
        self.artifacts = artifacts
        self.listener = listener
        self.meter = meter  # the run's LLM usage, for listeners (set by run_pipeline)
        self.counts: Counter[str] = Counter()
        self.stages: dict[str, StageProgress] = {}
        self.progress_id: Any = None
        self._creating: asyncio.Task[None] | None = None  # the artifact, being created
        self._next: str | None = None  # the update publish_soon has not sent yet
        self._sender: asyncio.Task[None] | None = None
        self._send_error: BaseException | None = None

    def stage(self, name: str) -> StageProgress:
        """The figures of stage ``name`` (created on first use)."""
        return self.stages.setdefault(name, StageProgress())

    def plan(self, name: str, chunks: int) -> None:
        """Stage ``name`` will run ``chunks`` more chunks."""
        self.stage(name).planned += chunks
        self._changed()

    async def run(self, name: str, call: Awaitable[StageOutput]) -> StageOutput:
        """Await one chunk of stage ``name``, adding its counts, rows and time."""
        fig = self.stage(name)
        start = time.perf_counter()
        if fig.started is None:
            fig.started = start
        try:
            out = await call
        except BaseException:
            fig.failed += 1
            fig.busy_s += time.perf_counter() - start
            self._changed()
            raise
        fig.busy_s += time.perf_counter() - start
        fig.done += 1
        fig.reused += int(out.reused)
        fig.rows += sum(ref.rows for name_, ref in out.refs.items() if name_ != "dropped")
        self.counts.update(out.counts)
        self._changed()
        return out

    @property
    def fraction(self) -> float:
        """Chunks finished (or failed) over chunks planned, all stages."""
        planned = sum(s.planned for s in self.stages.values())
        ended = sum(s.done + s.failed for s in self.stages.values())
        return ended / planned if planned else 0.0

    def create_artifact(self, key: str, description: str) -> None:
        """Create the run's progress artifact (at 0) in the background, so that the
        first stage does not wait for the Prefect API: updates wait for it, and
        :meth:`flush` raises its error.
        """
        if not self.artifacts:
            return
        from prefect.artifacts import acreate_progress_artifact

        async def create() -> None:
            self.progress_id = await acreate_progress_artifact(
                0.0, key=key, description=description
            )

        self._creating = asyncio.get_running_loop().create_task(create())
        # its error is flush's to report; a run that stops before never asks for it
        self._creating.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def publish(self, message: str, *, finished: bool = False) -> None:
        """Move the progress artifact to :attr:`fraction` (100 when ``finished``)."""
        if self._creating is not None:
            await asyncio.shield(self._creating)  # raises its error
        if self.artifacts and self.progress_id is not None:
            from prefect.artifacts import aupdate_progress_artifact

            value = 100.0 if finished else round(100.0 * self.fraction, 1)
            await aupdate_progress_artifact(self.progress_id, value, description=message)

    def publish_soon(self, message: str) -> None:
        """:meth:`publish` in the background, so that no chunk waits for the Prefect
        API: updates are sent one at a time, in order, the latest waiting one replacing
        any older (a sent update shows the fraction at its sending). :meth:`flush`
        waits for them and raises the first error of a send.
        """
        if not self.artifacts or (self.progress_id is None and self._creating is None):
            return
        self._next = message
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        while self._next is not None:
            message, self._next = self._next, None
            try:
                await self.publish(message)
            except Exception as e:
                self._send_error = self._send_error or e

    async def flush(self) -> None:
        """Wait for the artifact's creation and the updates :meth:`publish_soon`
        queued; raise the creation's or a send's error (once).
        """
        if (creating := self._creating) is not None:
            try:
                await asyncio.shield(creating)
            except Exception as e:
                self._send_error = self._send_error or e
            self._creating = None  # created (progress_id set), or failed: reported once
        if self._sender is not None:
            await asyncio.shield(self._sender)
        if (error := self._send_error) is not None:
            self._send_error = None
            raise error

    def timing_table(self) -> dict[str, tuple[int, int, float]]:
        """Stage -> (chunks, chunks reused, busy seconds)."""
        return {k: (s.done + s.failed, s.reused, s.busy_s) for k, s in self.stages.items()}

    def _changed(self) -> None:
        if self.listener is not None:
            self.listener(self)


class LiveProgress:
    """The run's progress in the terminal, as a :class:`Tracker` listener: per stage a
    bar of chunks done of planned, rows written and the ETA; a line with the run's LLM
    calls, tokens and cost (the tracker's ``meter``). Use it inside ``with``::

        with LiveProgress(console, title="sample") as view:
            token = live_listener.set(view)
            ...

    On a terminal it redraws at most ``refresh_per_second`` times a second (the listener
    only notes the change; rich's refresh thread draws) and routes log lines above the
    view. Elsewhere (a pipe, CI) it prints one plain line per stage when the stage's
    chunks have all ended, then the LLM line at the end; no escape codes. A failure to
    draw is logged once and never stops the run.
    """

    def __init__(
        self,
        console: Console | None = None,
        *,
        title: str = "",
        live: bool | None = None,
        refresh_per_second: float = 4.0,
    ) -> None:
        from rich.console import Console

        self.console = console or Console()
        self.title = title
        self.live = self.console.is_terminal if live is None else live
        self.refresh_per_second = refresh_per_second
        self.tracker: Tracker | None = None
        self._dirty = False
        self._snapshot: list[tuple[str, StageProgress]] = []
        self._printed: set[str] = set()
        self._last: RenderableType | None = None
        self._failed = False
        self._live: Live | None = None
        self._routed: list[tuple[logging.StreamHandler[Any], Any, Any]] = []

    # -- the listener: called from the event loop on every change, so it stays cheap --

    def __call__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self._dirty = True
        if not self.live:
            try:
                for name, fig in tracker.stages.items():
                    if name not in self._printed and fig.planned and _ended(fig) >= fig.planned:
                        self._printed.add(name)
                        self._print(plain_line(name, fig))
            except Exception:
                self._failure()

    # -- the context manager ---------------------------------------------------------

    def __enter__(self) -> LiveProgress:
        if self.live:
            try:
                from rich.live import Live

                self._live = Live(
                    get_renderable=self.render,
                    console=self.console,
                    auto_refresh=True,
                    refresh_per_second=self.refresh_per_second,
                    transient=False,
                )
                self._live.start()
                self._route_logs()
            except Exception:
                self._failure()
                self._live = None
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._unroute_logs()
            if self._live is not None:
                self._dirty = True
                self._live.stop()  # draws the final figures, which stay on screen
                self._live = None
            elif not self.live and self.tracker is not None:
                for name, fig in list(self.tracker.stages.items()):  # unfinished stages
                    if name not in self._printed:
                        self._printed.add(name)
                        self._print(plain_line(name, fig))
                usage = llm_line(self.tracker.meter)
                if usage:
                    self._print(usage)
        except Exception:
            self._failure()

    # -- drawing ---------------------------------------------------------------------

    def render(self) -> RenderableType:
        """The view now (rich's refresh thread calls it; never raises)."""
        try:
            self._last = self._render()
        except Exception:
            self._failure()
            if self._last is None:
                from rich.text import Text

                self._last = Text("")
        return self._last

    def _render(self) -> RenderableType:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        tracker = self.tracker
        if self._dirty and tracker is not None:
            self._dirty = False  # a change while copying marks it again
            stages = dict(tracker.stages)  # one atomic copy; the event loop may add stages
            copies = [(name, dataclasses.replace(fig)) for name, fig in stages.items()]
            # in the order the stages started; those not started yet last
            copies.sort(key=lambda item: (item[1].started is None, item[1].started or 0.0))
            self._snapshot = copies
        now = time.perf_counter()
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True, style="bold")
        grid.add_column(no_wrap=True)
        for justify in ("right", "right", "left", "right"):
            grid.add_column(justify=justify, no_wrap=True)
        for name, fig in self._snapshot:
            notes = Text(" ").join(
                Text(f"{n} {what}", style=style)
                for n, what, style in ((fig.reused, "reused", "dim"), (fig.failed, "failed", "red"))
                if n
            )
            bar = ProgressBar(total=max(fig.planned, 1), completed=fig.done, width=30)
            grid.add_row(
                name,
                bar,
                f"{fig.done}/{fig.planned} chunks",
                f"{fig.rows:,} rows",
                notes,
                eta_text(fig, now),
            )
        planned = sum(fig.planned for _, fig in self._snapshot)
        ended = sum(_ended(fig) for _, fig in self._snapshot)
        head = Text(self.title or "run", style="bold")
        if planned:
            head.append(f" {100.0 * ended / planned:.1f}% ({ended}/{planned} chunks)")
        else:
            head.append(": starting", style="dim")
        parts: list[RenderableType] = [head, grid]
        usage = llm_line(tracker.meter if tracker is not None else None)
        if usage:
            parts.append(Text(usage, style="dim"))
        return Group(*parts)

    def _print(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def _failure(self) -> None:
        if not self._failed:
            self._failed = True
            log.warning("progress view: drawing failed (the run goes on)", exc_info=True)

    # -- log lines above the view ------------------------------------------------------

    def _route_logs(self) -> None:
        """Point the terminal's log handlers (root's, Prefect's) at the Live's stdout and
        stderr proxies, so their lines print above the view instead of through it.
        """
        proxies = {
            id(real): _Above(proxy)
            for proxy in (sys.stdout, sys.stderr)
            if (real := getattr(proxy, "rich_proxied_file", None)) is not None
        }
        if not proxies:
            return
        loggers: list[Any] = [logging.root, *list(logging.root.manager.loggerDict.values())]
        for logger in loggers:
            for handler in getattr(logger, "handlers", ()):
                if not isinstance(handler, logging.StreamHandler):
                    continue
                proxy = proxies.get(id(handler.stream))
                if proxy is None:
                    continue
                console = getattr(handler, "console", None)  # Prefect's handler draws with rich
                old_file = getattr(console, "_file", None)
                self._routed.append((handler, handler.stream, old_file))
                handler.stream = proxy
                if console is not None and old_file is not None:
                    console.file = proxy

    def _unroute_logs(self) -> None:
        while self._routed:
            handler, stream, old_file = self._routed.pop()
            handler.stream = stream
            console = getattr(handler, "console", None)
            if console is not None and old_file is not None:
                console.file = old_file


class _Above(io.TextIOBase):
    """Writes through a Live's stdout or stderr proxy, so the lines print above the
    view. (A rich console handed the proxy itself unwraps it and writes under the view.)
    """

    def __init__(self, proxy: Any) -> None:
        self._proxy = proxy

    def write(self, text: str) -> int:
        self._proxy.write(text)
        return len(text)

    def flush(self) -> None:
        self._proxy.flush()

    def isatty(self) -> bool:
        return bool(self._proxy.isatty())

    def fileno(self) -> int:
        return int(self._proxy.fileno())


def _ended(fig: StageProgress) -> int:
    return fig.done + fig.failed


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta_text(fig: StageProgress, now: float) -> str:
    """A stage's ETA cell: ``ETA 3m05s``, ``done``, ``stopped`` or ``ETA ?``."""
    if fig.planned and _ended(fig) >= fig.planned:
        return "stopped" if fig.failed else "done"
    eta = fig.eta_s(now)
    return "ETA ?" if eta is None else f"ETA {duration(eta)}"


def plain_line(name: str, fig: StageProgress) -> str:
    """One stage as a plain line (where there is no terminal to redraw)."""
    line = f"{name}: {fig.done}/{fig.planned} chunks, {fig.rows:,} rows"
    extra = [f"{n} {what}" for n, what in ((fig.reused, "reused"), (fig.failed, "failed")) if n]
    if extra:
        line += f" ({', '.join(extra)})"
    return f"{line}, {fig.busy_s:.1f}s busy"


def llm_line(meter: UsageMeter | None) -> str:
    """The run's LLM calls, tokens and cost so far ('' before any call)."""
    if meter is None:
        return ""
    total = meter.total()
    if not total.calls and not total.cached:
        return ""
    return (
        f"LLM: {total.calls:,} call{'' if total.calls == 1 else 's'} ({total.cached:,} cached), "
        f"{total.prompt_tokens:,} prompt + {total.completion_tokens:,} completion tokens, "
        f"${total.cost_usd:.4f}"
    )
