"""`TASKLANE_AGENTS=myservice.agents`: this service's agents, using its own `worker` module."""

import worker  # this project's worker.py, not tasklane's
from tasklane import PermanentError, TaskContext, agent


@agent("shout", max_attempts=2)
async def shout(ctx: TaskContext) -> dict[str, str]:
    text = ctx.input.get("text") if isinstance(ctx.input, dict) else None
    if not isinstance(text, str):
        raise PermanentError('input needs a text: {"text": "hello"}')
    return {"shouted": worker.shout(text), "helper": worker.__file__ or ""}
