"""The HTTP API (SPEC section 4), one route group a module; ``server/app.py`` assembles them.

Every handler that answers from the state first awaits the journal barrier, so nothing
leaves the process before the events it reflects are durable (invariant 1). The hot routes
(submit, tasker register and sync) are plain Starlette routes: they parse their own bodies,
and FastAPI's per-request machinery would cost half the budget.
"""
