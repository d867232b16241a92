"""``python -m crq.server cleanup``: the server side of ``ncmgr cleanup --standalone`` and
``--reset-lock``, run by ncmgr as a subprocess so that the client package imports nothing of
the server's.

Works on the swd's files with no server running (see :mod:`crq.server.cleanup`). It answers
one JSON object on stdout, what the live server's cleanup endpoints answer, or
``{"reset": text}`` for ``--reset-lock``; a refusal is ``{"error": message}`` with exit
status 1. Warnings of the replay go to stderr as they come.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crq.server.cleanup import reset_lock, run_standalone
from crq.server.files import LockError
from crq.server.models import BadRequest
from crq.server.replay import ReplayError

from crq.wire import Swd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m crq.server cleanup",
        description="Manual recovery on the files of a stopped server (for ncmgr cleanup).",
    )
    parser.add_argument("--swd", required=True, metavar="DIR", help="server working directory")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", action="store_true", help="jobs not confirmed by a live tasker")
    what.add_argument("--job", type=int, metavar="ID", help="recover this job now")
    what.add_argument("--dead-host", metavar="HOST", help="recover every job of taskers on HOST")
    what.add_argument("--reset-lock", action="store_true", help="remove a stale recovery lock")
    return parser


def answer(args: argparse.Namespace) -> dict[str, Any]:
    """The JSON answer; raises what the cleanup functions raise."""
    if args.reset_lock:
        return {"reset": reset_lock(Swd(args.swd))}
    if args.job is not None:
        return run_standalone(Path(args.swd), "job", str(args.job))
    if args.dead_host is not None:
        return run_standalone(Path(args.swd), "dead_host", args.dead_host)
    return run_standalone(Path(args.swd), "list", None)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = answer(args)
    except (LockError, ReplayError) as e:
        return _refuse(str(e))
    except BadRequest as e:
        return _refuse(e.message)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        return _refuse(f"{e.strerror or e}{where}")
    except KeyboardInterrupt:  # ncmgr, in the same process group, says "interrupted"
        return 130
    except Exception as e:  # one line, as ncmgr promises; the traceback on request
        if os.environ.get("CRQ_DEBUG"):
            traceback.print_exc()
        return _refuse(f"internal error: {type(e).__name__}: {e} (CRQ_DEBUG=1 shows details)")
    print(json.dumps(result))
    return 0


def _refuse(message: str) -> int:
    print(json.dumps({"error": message}))
    return 1


if __name__ == "__main__":
    sys.exit(main())
