"""The one table from domain errors to gRPC status codes (`server/status.py`), without a server.

The tests read the table itself, never a copy of it (a copy would pass whatever the table said):
each entry is what `status_for` answers, every error class the server raises resolves through
it, and every status it can answer is documented in the README's status table."""
from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path

import grpc
import pytest

from medserve.server import errors
from medserve.server.status import MAX_MESSAGE_CHARS, STATUS_BY_ERROR, status_code_name, status_for

README = Path(__file__).resolve().parents[2] / "README.md"
# Not answered through the table, each for its reason: the base class (never raised itself), an
# execution failure (INTERNAL with a correlation id, below) and a start-up setting (the CLI's
# one line; it never reaches a caller).
NOT_IN_THE_TABLE = {errors.MedserveError, errors.ExecutionError, errors.InvalidSetting}


@pytest.mark.parametrize(("cls", "code"), sorted(STATUS_BY_ERROR.items(), key=lambda kv: kv[0].__name__))
def test_each_entry_is_the_status_answered_and_keeps_its_message(cls: type[Exception], code: grpc.StatusCode) -> None:
    assert status_for(cls("model 'm' version 1: why")) == (code, "model 'm' version 1: why")
    assert status_code_name(cls) == code.name


def test_every_error_the_server_raises_resolves_through_the_table() -> None:
    """A new error class without an entry would reach callers as INTERNAL (a bug's status)."""
    raised = {c for _, c in inspect.getmembers(errors, inspect.isclass)
              if issubclass(c, errors.MedserveError) and c.__module__ == errors.__name__}
    assert NOT_IN_THE_TABLE <= raised
    unresolved = sorted(c.__name__ for c in raised - NOT_IN_THE_TABLE if status_code_name(c) == "INTERNAL")
    assert unresolved == [], f"error classes answered as INTERNAL: {unresolved}"
    assert status_code_name(errors.ExecutionError) == "INTERNAL"


def test_every_status_the_table_answers_is_in_the_readme_status_table() -> None:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Status codes"):]
    section = section[: section.index("\n## ")]
    documented = set(re.findall(r"\b[A-Z][A-Z_]{5,}\b", section))
    missing = sorted({code.name for code in STATUS_BY_ERROR.values()} - documented)
    assert missing == [], f"statuses the server answers but the README's status table does not name: {missing}"


def test_a_subclass_takes_its_nearest_ancestor_in_the_table() -> None:
    class RateLimited(errors.QueueFull):
        pass

    assert status_for(RateLimited("slow down"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_long_messages_are_capped() -> None:
    code, message = status_for(errors.InvalidInput("x" * 5000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(message) == MAX_MESSAGE_CHARS and message.endswith("...")


def test_an_execution_failure_is_internal_with_its_summary_and_correlation_id(caplog: pytest.LogCaptureFixture) -> None:
    exc = errors.ExecutionError("model 'm' version 1: a Gather node failed (onnxruntime INVALID_ARGUMENT)")
    with caplog.at_level(logging.ERROR):
        code, message = status_for(exc)
    assert code == grpc.StatusCode.INTERNAL
    assert message == f"{exc} (correlation id {exc.correlation_id})"
    assert any(exc.correlation_id in r.getMessage() for r in caplog.records)


def test_a_bug_is_internal_and_its_text_stays_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        code, message = status_for(KeyError("patient 4711"))
    assert code == grpc.StatusCode.INTERNAL
    assert "4711" not in message and message.startswith("internal error (correlation id ")
    correlation = message.split("correlation id ")[1].split(";")[0]
    (record,) = [r for r in caplog.records if correlation in r.getMessage()]
    assert record.exc_info is not None  # the traceback goes to the log only
