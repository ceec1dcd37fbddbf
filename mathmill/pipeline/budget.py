"""A run's budget: stop paying for LLM calls once the run directory has spent enough.

Every pipeline's params have an optional ``budget`` (:class:`BudgetFields`): a cap on
USD (``max_usd``, from the endpoints' prices) and on tokens paid for (``max_tokens``,
prompt + completion; calls replayed from the call cache are free). It covers the run
directory across re-runs: what was spent is kept in ``.budget.json`` (written when each
chunk finishes and when the run ends) and loaded when a run starts.

Once it is reached, requests are not sent: each fails at once with an error of kind
``budget``, a transient one, so its chunk stays incomplete and the run ends with
:class:`~mathmill.errors.IncompleteRun` saying so; finished rows are kept. A re-run
with a larger budget resumes: finished calls replay for free, only the rest is paid.
Calls already in flight when the budget is reached may finish, so a run can overshoot
it by those calls (a whole batch for the engine and deployment backends, which are
checked before each batch).

>>> Budget(max_usd=5).max_usd
5.0
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mathmill.errors import StorageError
from mathmill.llm.usage import SpendLimit
from mathmill.pipeline.chunks import Runtime
from mathmill.storage import RunStore

__all__ = ["BUDGET_PATH", "Budget", "BudgetFields", "budget_message", "open_budget", "save_spend"]

BUDGET_PATH = ".budget.json"
log = logging.getLogger("mathmill.pipeline")


class Budget(BaseModel):
    """What a run directory may spend on LLM calls, over all its runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_usd: float | None = Field(
        None, ge=0.0, description="USD at most (from the endpoints' token prices)."
    )
    max_tokens: int | None = Field(
        None,
        ge=0,
        description="Prompt + completion tokens paid for at most (cache replays are free; "
        "vLLM engine and deployment generations count too).",
    )


class BudgetFields(BaseModel):
    """The budget option, mixed into pipelines' params."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    budget: Budget | None = Field(
        None,
        description="Stop sending LLM requests once the run directory has spent this "
        "much (across re-runs); re-run with a larger budget to resume.",
    )


def load_spend(store: RunStore) -> tuple[int, float]:
    """Tokens and USD the run directory spent in earlier runs (0 for a new one)."""
    if not store.exists(BUDGET_PATH):
        return 0, 0.0
    data = json.loads(store.read_bytes(BUDGET_PATH))
    return int(data.get("tokens", 0)), float(data.get("usd", 0.0))


def open_budget(rt: Runtime, params: Any) -> None:
    """Put the params' budget and the run directory's earlier spend on the run's meter
    (always: the spend is carried forward even by runs without a budget).
    """
    budget: Budget | None = getattr(params, "budget", None)
    tokens, usd = load_spend(rt.store)
    rt.pool.meter.limit = SpendLimit(
        max_usd=budget.max_usd if budget else None,
        max_tokens=budget.max_tokens if budget else None,
        usd_before=usd,
        tokens_before=tokens,
    )


def save_spend(rt: Runtime) -> None:
    """Record what the run directory has spent so far (earlier runs included). A
    storage error is logged: the next chunk or the run's end writes it again.
    """
    tokens, usd = rt.pool.meter.spent()
    data = json.dumps({"tokens": tokens, "usd": usd}).encode()
    try:
        rt.store.write_bytes(BUDGET_PATH, data)
    except StorageError as e:
        log.warning("could not record the run's spend in %s: %s", BUDGET_PATH, e)


def budget_message(rt: Runtime) -> str | None:
    """The incomplete run's explanation when its budget is spent, else None."""
    meter = rt.pool.meter
    reached = meter.budget_reached()
    if reached is None or meter.limit is None:
        return None
    tokens, usd = meter.spent()
    if reached.startswith("token"):
        field, more = "max_tokens", str(max(1, 2 * max(tokens, meter.limit.max_tokens or 0)))
    else:
        field, more = "max_usd", f"{2 * max(usd, meter.limit.max_usd or 0.0) or 1.0:.4g}"
    return (
        f"{reached} (over every run in this directory); requests past it were not sent. "
        f"Re-run with a larger budget (e.g. --set budget.{field}={more}) to resume: "
        "finished calls replay from the call cache for free"
    )
