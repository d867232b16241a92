"""The HTTP API (SPEC section 4), one route group a module; ``server/app.py`` assembles them.

Every handler that answers from the state first awaits the journal barrier, so nothing
leaves the process before the events it reflects are durable (invariant 1). The hot routes
(submit, tasker register and sync, GET of a job, the status, the probes) are answered by a
bare ASGI router in front of FastAPI (``hot.py``): FastAPI's middleware and routing would
cost more than the submit itself.
"""
