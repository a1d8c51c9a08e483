"""genreflow.retry: which failures a second try can get past, and the tries' budget.

The exceptions are the real ones the clients raise (urllib, requests, google-api-core,
MLflow, torch), made here rather than provoked over a network.
"""

from __future__ import annotations

import errno
import io
import urllib.error

import pytest
import requests
import torch
from google.api_core import exceptions as google_errors
from mlflow.exceptions import MlflowException, RestException

from genreflow.errors import GenreflowError
from genreflow.retry import FOLD_TRIES, is_transient, retry_transient, why_not_retried


def _http_error(code: int) -> urllib.error.HTTPError:
    return urllib.error.HTTPError("https://x", code, "status", {}, io.BytesIO())


def _wrapped(outer: Exception, inner: Exception) -> Exception:
    """`outer` raised while handling `inner`, as MLflow's REST client does."""
    try:
        try:
            raise inner
        except Exception:
            raise outer  # noqa: B904 (the implicit context is the point)
    except Exception as exc:
        return exc


TRANSIENT = [
    ConnectionResetError(errno.ECONNRESET, "reset by peer"),
    ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
    TimeoutError("timed out"),
    OSError(errno.EHOSTUNREACH, "no route to host"),
    urllib.error.URLError(ConnectionRefusedError(errno.ECONNREFUSED, "refused")),
    _http_error(503),
    _http_error(429),
    requests.exceptions.ConnectionError("Max retries exceeded"),
    requests.exceptions.ReadTimeout("read timed out"),
    google_errors.ServiceUnavailable("backend unavailable"),
    google_errors.TooManyRequests("slow down"),
    RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "busy"}),
    _wrapped(
        MlflowException("API request to http://mlflow:5000 failed"),
        requests.exceptions.ConnectionError("Connection refused"),
    ),
]
PERMANENT = [
    GenreflowError("features.h5: no fold 11"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"),
    MemoryError(),
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    _http_error(404),
    _http_error(403),
    google_errors.NotFound("no such object"),
    google_errors.Forbidden("denied"),
    RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad metric"}),
    TypeError("forward() got an unexpected keyword argument"),
    AttributeError("'NoneType' object has no attribute 'shape'"),
    KeyError("fc_transfer.weight"),
    ValueError("setting an array element with a sequence"),
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    FileNotFoundError(errno.ENOENT, "No such file or directory"),
    # a full disk while talking to the server is still a full disk
    _wrapped(MlflowException("logging failed"), OSError(errno.ENOSPC, "No space left")),
    # ... and so is a network-looking error that a full disk caused, however it is carried
    urllib.error.URLError(OSError(errno.ENOSPC, "No space left on device")),
    _wrapped(
        requests.exceptions.ConnectionError("Connection aborted"),
        OSError(errno.ENOSPC, "No space left on device"),
    ),
]


@pytest.mark.parametrize("exc", TRANSIENT, ids=lambda e: f"{type(e).__name__}: {e}"[:60])
def test_transient_failures_are_retried(exc):
    assert is_transient(exc)


@pytest.mark.parametrize("exc", PERMANENT, ids=lambda e: f"{type(e).__name__}: {e}"[:60])
def test_what_a_second_try_cannot_change_is_not(exc):
    assert not is_transient(exc)


def _failing(*failures):
    calls = []

    def fn():
        calls.append(1)
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return "done"

    return fn, calls


def test_tries_and_delays():
    slept, tries = [], []
    fn, calls = _failing(ConnectionResetError("reset"), TimeoutError("slow"))
    result = retry_transient(
        "fold 1", fn, first_delay=30, sleep=slept.append, before_try=tries.append
    )
    assert result == "done" and len(calls) == 3 and FOLD_TRIES == 3
    assert slept == [30, 60] and tries == [1, 2, 3]

    fn, calls = _failing(*[ConnectionResetError("reset")] * 5)
    with pytest.raises(ConnectionResetError):
        retry_transient("fold 2", fn, sleep=slept.append)
    assert len(calls) == FOLD_TRIES

    fn, calls = _failing(torch.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(torch.OutOfMemoryError):
        retry_transient("fold 3", fn, sleep=slept.append)
    assert len(calls) == 1


def test_the_time_budget_stops_retries_before_the_tries_do(capsys):
    slept = []
    fn, calls = _failing(*[ConnectionResetError("reset")] * 5)
    with pytest.raises(ConnectionResetError):
        # 30 s, then 60 s more would pass the 60 s budget: one retry only
        retry_transient("fold 4", fn, first_delay=30, budget_seconds=60, sleep=slept.append)
    assert len(calls) == 2 and slept == [30]
    assert "the time budget is used up" in capsys.readouterr().err


def test_no_tries_left_is_said():
    fn, calls = _failing()
    with pytest.raises(GenreflowError, match="fold 5: no tries left"):
        retry_transient("fold 5", fn, tries=0)
    assert calls == []


def test_a_full_disk_is_said_to_be_one():
    exc = urllib.error.URLError(OSError(errno.ENOSPC, "No space left on device"))
    assert why_not_retried(exc) == "no space left on the disk: No space left on device"
