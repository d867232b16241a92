"""``crq submit --time/--kill-grace/--script``: parsed as Slurm's users write them, read at
submit, and a bad value is one usage line (exit 2) that sends nothing."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from crq.client import cli

from crq.cliargs import slurm_time


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRQ_HOME", str(tmp_path / "crqhome"))
    for var in ("CRQ_SERVER", "CRQ_QUEUE", "CRQ_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 5400),  # a bare number is minutes, as in Slurm
        ("1:30", 90),
        ("1:30:00", 5400),
        ("2-0", 172800),
        ("1-02:03", 93780),
        ("1-00:00:05", 86405),
        ("90s", 90),
        ("30m", 1800),
        ("1.5h", 5400),
    ],
)
def test_slurm_time_forms(text: str, seconds: float) -> None:
    assert slurm_time(text) == seconds


@pytest.mark.parametrize("text", ["0", "0:00", "", "x", "1:x", "-5", "1:2:3:4", "1-", "5s5"])
def test_bad_time_limits_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        slurm_time(text)


def _submit(*words: str) -> argparse.Namespace:
    args = cli.build_parser().parse_args(["submit", *words])
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    return args


def test_time_and_script_go_into_the_spec(tmp_path: Path) -> None:
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\necho $1\n")
    args = _submit("--time", "1:00", "--kill-grace", "5", "--script", str(script), "a", "b")
    specs, _ = cli.submit_specs(args)
    assert specs[0]["time_limit"] == 60 and specs[0]["kill_grace"] == 5
    assert (specs[0]["script"], specs[0]["command"]) == ("#!/bin/sh\necho $1\n", ["a", "b"])
    assert specs[0]["name"] == "run.sh"
    plain, _ = cli.submit_specs(_submit("--", "true"))
    assert not {"time_limit", "kill_grace", "script"} & plain[0].keys()


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["--time", "soon", "--", "true"], "not a time limit: 'soon'"),
        (["--kill-grace", "-1", "--", "true"], "must not be negative"),
        (["--script", "x.sh", "--file", "f"], "give either --file or a command"),
    ],
)
def test_bad_flags_are_one_usage_line(
    words: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["submit", *words])
    assert e.value.code == 2
    err = capsys.readouterr().err  # argparse's usage, then the one error line
    assert message in err.strip().splitlines()[-1], err


def test_a_script_missing_big_or_not_text_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    big = tmp_path / "big.sh"
    big.write_bytes(b"#" * (cli.MAX_SCRIPT + 1))
    binary = tmp_path / "bin.sh"
    binary.write_bytes(b"\xff\xfe")
    for path, message in (
        (tmp_path / "gone.sh", "No such file"),
        (big, "larger than 1048576 bytes"),
        (binary, "not UTF-8 text"),
    ):
        assert cli.main(["--server", "http://127.0.0.1:9", "submit", "--script", str(path)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
