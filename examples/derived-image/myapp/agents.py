"""`TASKLANE_AGENTS=myapp.agents`: importing this module registers its agents."""

from tasklane import PermanentError, TaskContext, agent


@agent("greet", timeout=10)
async def greet(ctx: TaskContext) -> dict[str, str]:
    name = ctx.input.get("name") if isinstance(ctx.input, dict) else None
    if not isinstance(name, str) or not name.strip():
        raise PermanentError('input needs a name: {"name": "Ada"}')
    ctx.log.info("greeting", name=name)
    return {"greeting": f"hello, {name.strip()}"}
