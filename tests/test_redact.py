"""The one redaction path (aioproj._redact): errors, log records, warnings and records all
lose URL credentials, whoever produced the text."""

from __future__ import annotations

import importlib
import logging
import pkgutil
import warnings

import pytest

import aioproj
from aioproj._redact import (
    RedactingFilter,
    redact,
    redact_credentials,
    scrub,
    warn,
)
from aioproj.tracking.base import check_params, check_tags, named_run_tags

SECRET = "ghp_s3cr3tT0ken"
URL = f"https://alice:{SECRET}@github.com/org/repo.git"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"got str {URL!r}", "got str 'https://github.com/org/repo.git'"),
        (f"{URL} and ssh://git:{SECRET}@h/x", "https://github.com/org/repo.git and ssh://git@h/x"),
        (f"https://{SECRET}@h", "https://h"),
        (f"http://u:p@ss{SECRET}@h:80/x?q=a@b", "http://h:80/x?q=a@b"),
        (f"git+https://u:{SECRET}@h/x", "git+https://h/x"),
        (f"https://u:{SECRET}@[::1/x", "https://[::1/x"),
        ("mail alice@example.com, see https://h/a@b", "mail alice@example.com, see https://h/a@b"),
        ("no url at all", "no url at all"),
    ],
)
def test_credentials_are_removed_from_any_text(text: str, expected: str) -> None:
    assert redact_credentials(text) == expected


def test_scrub_replaces_known_secrets_longest_first() -> None:
    assert scrub("a-token and a-token-2", ["a-token", "a-token-2", ""]) == "*** and ***"
    assert (
        redact(f"{URL} {SECRET}-x", ["-x"]) == "https://github.com/org/repo.git ghp_s3cr3tT0ken***"
    )


def test_every_aioproj_error_redacts_its_message() -> None:
    errors = [
        aioproj.ParameterError(f"Parameter 'a' expects a float, got {URL!r}"),
        aioproj.MLprojectError(f"bad value {URL}", path="/p/MLproject", line=3),
        aioproj.SourceError(URL),
        aioproj.InvalidArgumentError(URL),
    ]
    for error in errors:
        assert SECRET not in str(error)
        assert SECRET not in repr(error)


def test_records_lose_url_credentials_and_keep_the_rest() -> None:
    assert check_tags({"mlflow.source.name": URL}) == {
        "mlflow.source.name": "https://github.com/org/repo.git"
    }
    assert check_params({"data": f"--from {URL}"}) == {
        "data": "--from https://github.com/org/repo.git"
    }
    tags, name = named_run_tags({}, f"run of {URL}")
    assert name == tags["mlflow.runName"] == "run of https://github.com/org/repo.git"


def _all_modules() -> None:
    for module in pkgutil.walk_packages(aioproj.__path__, "aioproj."):
        if module.name.endswith("__main__"):
            continue
        importlib.import_module(module.name)


def test_every_aioproj_logger_redacts(caplog: pytest.LogCaptureFixture) -> None:
    _all_modules()
    loggers = {
        name: logger
        for name, logger in logging.Logger.manager.loggerDict.items()
        if (name == "aioproj" or name.startswith("aioproj.")) and isinstance(logger, logging.Logger)
    }
    assert "aioproj" in loggers
    for name, logger in loggers.items():
        assert any(isinstance(f, RedactingFilter) for f in logger.filters), name
    caplog.set_level("DEBUG")
    for name in loggers:
        logging.getLogger(name).warning("fetching %s failed: %r", URL, ValueError(URL))
    assert len(caplog.records) == len(loggers)
    assert SECRET not in caplog.text
    assert "fetching https://github.com/org/repo.git failed" in caplog.text


def test_warnings_are_redacted() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn(f"dropped dependency git+{URL}", UserWarning)
    (warning,) = caught
    assert str(warning.message) == "dropped dependency git+https://github.com/org/repo.git"
    assert warning.filename == __file__  # stacklevel counts from warn()'s caller


def test_reprs_of_what_holds_a_uri_show_no_credentials() -> None:
    from aioproj.sources.uri import parse_project_uri

    sweep = aioproj.sweep(URL, {"alpha": [1, 2]}, backend_config={"token": SECRET})
    for shown in (repr(parse_project_uri(f"{URL}#sub")), repr(sweep), repr(sweep._args)):
        assert SECRET not in shown, shown
