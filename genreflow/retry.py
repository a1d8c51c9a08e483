"""The one place that decides whether a failure is worth a second try, and how many tries.

A fold that fails for a reason that cannot change (bad input, out of memory, a full disk, a
bug) fails at once with its message: retrying it only burns GPU time. What can succeed on
a second try is retried: the network, storage and the tracking server (connection refused
or reset, timeouts, HTTP 408, 429 and 5xx, Google's "unavailable"), and a lost pod, which
the platform starts again. Every try of a fold counts against one budget (FOLD_TRIES), the
platform's restarts included (genreflow.tracking records them on the fold's run), so no
backend gives a fold more than FOLD_TRIES tries:

- open-source KFP ignores a task's retry policy inside a ParallelFor (kubeflow/pipelines
  #12389): a fold gets FOLD_TRIES tries in its step; a lost pod is not restarted, and
  resubmitting the run resumes the fold from its last checkpoint (its work folder);
- Vertex AI honours the task's retries: restarts and in-step tries share FOLD_TRIES.
"""

from __future__ import annotations

import errno
import sys
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from genreflow.errors import GenreflowError
from genreflow.storage import redacted_text

T = TypeVar("T")

FOLD_TRIES = 3  # per fold, every backend, all layers together
FIRST_DELAY_SECONDS = 30.0  # doubles after each failed try
BUDGET_SECONDS = 15 * 60  # no retry starts later than this after the first try

# Socket and file-system errors a second try can get past, and those it cannot.
_TRANSIENT_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ENETDOWN,
    errno.EPIPE,
    errno.EAGAIN,
}
_PERMANENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENOMEM}
# HTTP statuses worth another request: timeout, too many requests, the server's own errors.
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
_PROGRAMMING_ERRORS = (
    TypeError,
    AttributeError,
    NameError,
    ImportError,
    SyntaxError,
    AssertionError,
    NotImplementedError,
    KeyError,
    IndexError,
    ValueError,
    ZeroDivisionError,
    RecursionError,
)
_OUT_OF_MEMORY_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` (or what it wraps) is a failure a second try can get past."""
    if _full_disk(exc) is not None:
        return False  # a network error caused by a full disk is a full disk
    for link in _chain(exc):
        verdict = _classify(link)
        if verdict is not None:
            return verdict
    return False  # unknown: fail at once, with the message, rather than burn tries


def why_not_retried(exc: BaseException) -> str:
    """A few words on the kind of failure, for the log line that says it is not retried."""
    if isinstance(exc, GenreflowError):
        return "bad input or a refused request"
    if _is_out_of_memory(exc):
        return "out of memory"
    full = _full_disk(exc)
    if full is not None:
        return f"no space left on the disk: {full.strerror}"
    if isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNOS:
        return "no space or no memory left, or a read-only file system"
    if isinstance(exc, _PROGRAMMING_ERRORS):
        return "a programming error"
    return "not a network, storage or tracking-server failure"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)


def _full_disk(exc: BaseException) -> OSError | None:
    """The no-space (or quota) error anywhere in `exc`'s chain, if there is one."""
    for link in _chain(exc):
        if isinstance(link, OSError) and link.errno in (errno.ENOSPC, errno.EDQUOT):
            return link
        reason = getattr(link, "reason", None)  # urllib's URLError keeps its cause here
        if isinstance(reason, OSError) and reason.errno in (errno.ENOSPC, errno.EDQUOT):
            return reason
    return None


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True  # torch.OutOfMemoryError (CUDA), MemoryError (the CPU allocator)
    return isinstance(exc, RuntimeError) and any(t in str(exc) for t in _OUT_OF_MEMORY_TEXT)


def _status(exc: BaseException) -> int | None:
    """The HTTP status an exception carries, from the clients genreflow uses."""
    for attribute in ("code", "status", "status_code"):  # urllib, google.api_core
        value = getattr(exc, attribute, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    response = getattr(exc, "response", None)  # requests
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        return status
    get_status = getattr(exc, "get_http_status_code", None)  # mlflow's MlflowException
    if callable(get_status):
        try:
            return int(get_status())
        except (TypeError, ValueError):
            return None
    return None


def _classify(exc: BaseException) -> bool | None:
    """True: transient; False: never retried; None: this link does not say, look deeper."""
    if isinstance(exc, GenreflowError) or _is_out_of_memory(exc):
        return False
    if isinstance(exc, _PROGRAMMING_ERRORS):
        return False
    name = type(exc).__name__
    module = type(exc).__module__
    if isinstance(exc, OSError):
        if exc.errno in _PERMANENT_ERRNOS:
            return False
        if exc.errno in _TRANSIENT_ERRNOS or isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        if module.startswith(("urllib", "requests", "socket", "http", "ssl")):
            status = _status(exc)
            return status in _TRANSIENT_STATUS if status is not None else True
        return None
    if module.startswith("http.client"):  # RemoteDisconnected, IncompleteRead
        return True
    if module.startswith(("requests", "urllib3")):
        status = _status(exc)
        return status in _TRANSIENT_STATUS if status is not None else True
    if module.startswith("google.api_core") or module.startswith("google.auth"):
        if name in ("RetryError", "TransportError"):
            return True
        status = _status(exc)
        return status in _TRANSIENT_STATUS if status is not None else None
    if module.startswith("mlflow"):
        # Only the server's answer (RestException) carries a real status: a client-side
        # MlflowException says INTERNAL_ERROR (500) whatever happened.
        status = _status(exc) if name == "RestException" else None
        if status is not None and status in _TRANSIENT_STATUS:
            return True
        code = getattr(exc, "error_code", "")
        if code in ("TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED", "REQUEST_LIMIT_EXCEEDED"):
            return True
        return None  # an MlflowException wrapping a connection failure: look at its cause
    return None


def retry_transient(
    what: str,
    fn: Callable[[], T],
    *,
    tries: int = FOLD_TRIES,
    first_delay: float = FIRST_DELAY_SECONDS,
    budget_seconds: float = BUDGET_SECONDS,
    before_try: Callable[[int], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call fn; after a transient failure, wait and call it again, up to `tries` calls in
    all and no retry starting later than `budget_seconds` after the first. Any other
    failure, or the last one, is raised as it is. `before_try(n)` is told each try's number
    (1-based) first, so that a caller can record it where a restart will see it."""
    if tries < 1:
        raise GenreflowError(f"{what}: no tries left (at most {FOLD_TRIES} per fold)")
    started = time.monotonic()
    delay = first_delay
    for attempt in range(1, tries + 1):
        if before_try is not None:
            before_try(attempt)
        try:
            return fn()
        except Exception as exc:
            said = redacted_text(str(exc))  # messages may quote a URI with its secrets
            if not is_transient(exc):
                print(
                    f"{what}: {type(exc).__name__}: {said} ({why_not_retried(exc)}: not retried)",
                    file=sys.stderr,
                )
                raise
            late = time.monotonic() - started + delay > budget_seconds
            if attempt == tries or late:
                print(
                    f"{what}: {type(exc).__name__}: {said} (transient, but "
                    f"{'the tries are' if attempt == tries else 'the time budget is'} used up)",
                    file=sys.stderr,
                )
                raise
            print(
                f"{what}: {type(exc).__name__}: {said} (transient); try {attempt + 1} of "
                f"{tries} in {delay:.0f} s",
                file=sys.stderr,
            )
            sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")
