"""What the three CLIs share: the error wrapper, id lists, the progress line (and the
argument types of ``crq.cliargs``)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from crq.client.errors import CrashRecovery, CrqError

# The argument types live in crq.cliargs (the tasker shares them); kept importable from here.
from crq.cliargs import as_typed as as_typed
from crq.cliargs import duration as duration
from crq.cliargs import positive_int as positive_int
from crq.cliargs import positive_seconds as positive_seconds
from crq.cliargs import seconds as seconds

PREFIX = "crq"


class UsageError(Exception):
    """A command line that cannot work as given (a bad value, an unreadable ``--file``):
    exit status 2, like argparse's own errors, so that scripts can tell it from a failure."""


def fail(message: str, status: int = 1) -> int:
    """Print one ``crq: …`` line on stderr; return exit status ``status`` (1: failure)."""
    print(f"{PREFIX}: {' '.join(str(message).split())}", file=sys.stderr)
    return status


def say(message: str) -> None:
    """Print one ``crq: …`` line on stdout (progress and outcomes, not errors)."""
    print(f"{PREFIX}: {message}", flush=True)


def run(body: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a subcommand, turning every failure into one line on stderr and an exit status:
    2 for a usage error, 1 for a failure (the server refused, or is not there).

    ``CRQ_DEBUG=1`` shows the traceback of unexpected errors.
    """
    try:
        return body(args)
    except UsageError as e:
        return fail(str(e), status=2)
    except CrashRecovery as e:
        return fail(f"{e.summary()}; retry later")
    except CrqError as e:
        return fail(e.message)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        fail("interrupted")
        return 130
    except BrokenPipeError:
        # `crq list | head`: the reader left; stop quietly.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return 0
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        return fail(f"{e.strerror or e}{where}")
    except Exception as e:  # the promise is: never a traceback
        if os.environ.get("CRQ_DEBUG"):
            import traceback  # only here: every command would pay for its import

            traceback.print_exc()
        return fail(f"internal error: {type(e).__name__}: {e} (CRQ_DEBUG=1 shows details)")


def parse_ids(words: Sequence[str]) -> list[int]:
    """Job ids from the command line: ``12``, ``12..20`` or ``12-20`` (inclusive ranges), and
    comma lists, so that ``crq wait 1..1000`` matches what ``crq submit --file`` prints."""
    ids: list[int] = []
    for word in words:
        for part in word.split(","):
            part = part.strip()
            if not part:
                continue
            sep = ".." if ".." in part else ("-" if "-" in part.lstrip("-") else None)
            try:
                if sep:
                    a, b = part.split(sep, 1)
                    lo, hi = int(a), int(b)
                    if lo > hi or lo < 1:
                        raise ValueError
                    if hi - lo >= 10_000_000:
                        raise ValueError
                    ids.extend(range(lo, hi + 1))
                else:
                    value = int(part)
                    if value < 1:
                        raise ValueError
                    ids.append(value)
            except ValueError:
                raise argparse.ArgumentTypeError(f"not a job id or range: {part!r}") from None
    return list(dict.fromkeys(ids))  # without repeats, in order


def format_ids(ids: Sequence[int], many: int = 20) -> list[str]:
    """Lines that report submitted ids: one per line up to ``many``, else a parseable range
    ``submitted N jobs: FIRST..LAST`` (when the ids are consecutive)."""
    if len(ids) <= many or list(ids) != list(range(ids[0], ids[0] + len(ids))):
        return [str(i) for i in ids]
    return [f"submitted {len(ids)} jobs: {ids[0]}..{ids[-1]}"]


class ProgressLine:
    """``waiting: 830/1000 done, 2 failed`` on stderr: rewritten in place on a terminal, a new
    line at most every ``every`` seconds (and when finished) otherwise."""

    def __init__(self, stream: TextIO | None = None, every: float = 10.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every
        self.last_text = ""
        self.last_time = float("-inf")
        self.shown = False

    def __call__(self, done: int, failed: int, total: int) -> None:
        text = f"waiting: {done}/{total} done" + (f", {failed} failed" if failed else "")
        now = time.monotonic()
        finished = done + failed >= total
        if self.tty:
            if text != self.last_text:
                self.stream.write("\r\x1b[K" + text)
                self.stream.flush()
                self.shown = True
        elif text != self.last_text and (finished or now - self.last_time >= self.every):
            self.stream.write(text + "\n")
            self.stream.flush()
            self.last_time = now
        self.last_text = text

    def close(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False
