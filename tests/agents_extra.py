"""An agent only some test workers load (TASKLANE_AGENTS=…,tests.agents_extra): a stand-in for
the agent a rolling deploy adds to new workers before old ones are gone."""

from __future__ import annotations

from typing import Any

from worker.agents import TaskContext, agent


@agent("t_elsewhere")
async def elsewhere(ctx: TaskContext) -> dict[str, Any]:
    return {"served_by_the_new_worker": True, "attempt": ctx.attempt}
