"""The OpenAPI document describes every route as it really behaves.

First what it says (every route, the hot plain-Starlette ones too, with their error answers),
then schemathesis against the real app, engine and journal in process: every operation, every
phase (examples, coverage, fuzzing, stateful), every check (``st run --checks all``), and it
must find no server error and no answer that breaks the document.

``POST /api/v1/server/stop`` is in the run: in process it reaches ``Service.request_stop``,
which the process wiring (server/main.py) would turn into a clean stop; here it only records
the call, so the run goes on and the test sees the route was exercised.

Bounded: a fixed seed and a few examples per operation (about half a minute). To explore
more: ``CRQ_FUZZ_SEED=7 CRQ_FUZZ_EXAMPLES=100 python -m pytest tests/server/test_openapi.py``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from crq.server.app import create_app
from crq.server.service import Service
from schemathesis import engine
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events
from starlette.routing import Route

from tests.core import TOKEN, service

SEED = int(os.environ.get("CRQ_FUZZ_SEED", "20250"))
EXAMPLES = int(os.environ.get("CRQ_FUZZ_EXAMPLES", "10"))
#: schemathesis' default statuses for "invalid data was refused", and 413: a body over the
#: size limit (its coverage phase sends 10,001 arguments of 32 KiB) is refused too.
ACCEPTED_SUBMIT = ["2XX", "401", "403", "409", "422", "429", "5XX"]
REFUSALS = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Service]:
    # heartbeat 0.05 s: a tasker's long poll (sync) lasts at most 3 heartbeats
    # max_array 100: an array the fuzzer makes of 999,999 elements is refused (422), not
    # queued, so each example costs what a request does
    with service(tmp_path / "q.swd", "--heartbeat", "0.05", "--max-array", "100") as srv:
        yield srv


def document(srv: Service) -> dict[str, Any]:
    async def get() -> dict[str, Any]:
        transport = httpx.ASGITransport(app=create_app(srv))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.get("/api/openapi.json")
            assert r.status_code == 200
            return dict(r.json())

    return asyncio.run(get())


def test_the_document_describes_every_route_and_its_errors(server: Service) -> None:
    doc = document(server)
    app = create_app(server)
    routes = {
        (method.lower(), route.path)
        for route in app.routes
        if isinstance(route, Route) and route.include_in_schema
        for method in route.methods or ()
        if method != "HEAD"
    }
    described = {(m, p) for p, item in doc["paths"].items() for m in item}
    assert routes - described == set()
    ops = doc["paths"]
    refs = {
        ("post", "/api/v1/jobs"): ["#/components/schemas/JobSpec", "#/components/schemas/Batch"],
        ("post", "/api/v1/taskers/{name}/register"): ["#/components/schemas/Register"],
        ("post", "/api/v1/taskers/{name}/sync"): ["#/components/schemas/Sync"],
    }
    for (method, path), want in refs.items():
        op = ops[path][method]
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        assert [s["$ref"] for s in schema.get("oneOf", [schema])] == want
        for status in ("401", "413", "422"):
            body = op["responses"][status]["content"]["application/json"]["schema"]
            assert body == {"$ref": "#/components/schemas/Error"}
        assert op["security"] == [{"bearer": []}]
    assert "409" in ops["/api/v1/taskers/{name}/sync"]["post"]["responses"]
    assert "400" in ops["/api/v1/jobs"]["get"]["responses"]
    assert "503" in ops["/api/v1/jobs"]["post"]["responses"]
    # errors are {"error", "message"}, never FastAPI's {"detail": [...]}
    assert "HTTPValidationError" not in str(doc) and "detail" not in doc["components"]["schemas"]


def test_schemathesis_finds_no_server_error_and_no_schema_violation(server: Service) -> None:
    config = SchemathesisConfig.from_str(
        f"""
seed = {SEED}
headers = {{ Authorization = "Bearer {TOKEN}" }}
request-timeout = 60
generation.max-examples = {EXAMPLES}
generation.database = "none"
# a long poll on a job no tasker runs would wait its whole timeout: ask for none
parameters = {{ "query.timeout" = 0 }}
[checks]
enabled = true
negative_data_rejection.expected-statuses = {REFUSALS}

# A submit can be valid to the schema and refused by what it means (422): a dependency on a
# job that does not exist, an array whose stop is below its start.
[[operations]]
include-name = "POST /api/v1/jobs"
checks.positive_data_acceptance.expected-statuses = {ACCEPTED_SUBMIT}
"""
    )
    schema = schemathesis.openapi.from_asgi("/api/openapi.json", create_app(server), config=config)
    failures: dict[tuple[str, str, str], str] = {}
    errors: list[str] = []
    tested: set[str] = set()
    finished = None
    for ev in engine.from_schema(schema).execute():
        if isinstance(ev, events.ScenarioFinished):
            tested.add(ev.recorder.label)
            for checks in ev.recorder.checks.values():
                for check in checks:
                    if check.failure_info is not None:
                        f = check.failure_info
                        key = (check.name, ev.recorder.label, f.failure.title)
                        failures.setdefault(key, f"{f.failure.message}\n{f.code_sample[:2000]}")
        elif isinstance(ev, events.NonFatalError):
            errors.append(f"{ev.label}: {ev.value!r}")
        elif isinstance(ev, events.FatalError):
            errors.append(f"fatal: {ev.exception!r}")
        elif isinstance(ev, events.EngineFinished):
            finished = ev
    report = "\n\n".join(
        f"{name} on {op}: {title}\n{text}" for (name, op, title), text in failures.items()
    )
    assert not errors, errors
    assert not failures, report
    assert finished is not None and finished.stop_reason == "completed"
    operations = {f"{m.upper()} {p}" for p, item in document(server)["paths"].items() for m in item}
    assert operations - tested == set()
    assert server.stops  # type: ignore[attr-defined]
