"""The submit floor: a trivial Starlette app under the server's uvicorn settings.

``python bench/floorapp.py PORT`` serves ``POST /api/v1/jobs`` (reads the body, answers 201
with a one-id JSON, as a submit does) and ``GET /healthz`` on 127.0.0.1 with uvloop,
httptools and no access log, like ``crq.server``. What a submit costs beyond this is ours.
"""

from __future__ import annotations

import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


async def submit(request: Request) -> Response:
    await request.body()
    return JSONResponse({"ids": [1]}, status_code=201)


async def healthz(request: Request) -> Response:
    return JSONResponse({"ok": True})


app = Starlette(
    routes=[Route("/api/v1/jobs", submit, methods=["POST"]), Route("/healthz", healthz)]
)

if __name__ == "__main__":
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        lifespan="off",
    )
