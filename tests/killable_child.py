"""Children that hold still at a known point, for tests that kill them there.

A test that kills a process "mid-run" after watching for a file races the process: on a
busy machine the child may finish, or get further, before the signal lands. Here the child
itself says where it is and waits to be killed, so the kill always lands at the state the
test observed:

- `start_held(target, argv)` runs this file as a child: it wraps one library function,
  runs the real entry point (`-m MODULE ARGS...` or `-c CODE ARGS...`), and once a call of
  the target has returned, writes "held" on a pipe the test reads and waits for a signal.
- `held_pack_worker` is a pack decoding worker (genreflow.features.workers._serve) that
  tells the test its pid on a pipe and stops before decoding a chosen clip: the pack is
  provably mid-work until the test kills it.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import os
import runpy
import select
import signal
import subprocess
import sys
from pathlib import Path

HELD = b"held\n"


def start_held(
    target: str,
    argv: list[str],
    *,
    calls: int = 1,
    named: str = "*",
    timeout: float = 600.0,
    **popen,
) -> subprocess.Popen:
    """Start `python -m MODULE ...` or `python -c CODE ...` (argv) and return once it holds:
    when the `calls`-th call of `target` ("module:attr" or "module:Class.method") whose
    first path argument's file name matches `named` has returned. Fails, naming the child's exit
    status, when it ends first; `timeout` only keeps a hung child from hanging the suite."""
    read, write = os.pipe()
    command = [sys.executable, __file__, str(write), target, str(calls), named, *argv]
    try:
        process = subprocess.Popen(command, pass_fds=(write,), **popen)
    finally:
        os.close(write)
    try:
        with os.fdopen(read, "rb") as signals:
            ready, _, _ = select.select([signals], [], [], timeout)
            said = signals.readline() if ready else b""
    except BaseException:
        process.kill()
        process.wait()
        raise
    if said != HELD:
        if ready:  # the pipe closed: the child ended, or never reached the target
            process.wait()
        else:
            process.kill()
            process.wait()
        raise AssertionError(
            f"{target} call {calls} was never reached: the child "
            + (f"ended with status {process.returncode}" if ready else f"hung for {timeout} s")
        )
    return process


def _hold_after(fd: int, target: str, calls: int, named: str) -> None:
    """Wrap `target` so that its `calls`-th matching call, once returned, writes HELD to
    `fd` and waits for signals: their handlers run (SIGTERM's may end the process), and
    SIGKILL ends it."""
    module_name, _, attribute = target.partition(":")
    owner = importlib.import_module(module_name)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    seen = 0

    @functools.wraps(original)
    def holding(*args, **kwargs):
        nonlocal seen
        result = original(*args, **kwargs)
        # The first path among the arguments (a method's self is not one).
        first = next((Path(os.fspath(a)).name for a in args if _is_path(a)), "")
        if named == "*" or fnmatch.fnmatch(first, named):
            seen += 1
            if seen == calls:
                os.write(fd, HELD)
                while True:
                    signal.pause()
        return result

    setattr(owner, name, holding)


def _is_path(value: object) -> bool:
    return isinstance(value, (str, os.PathLike))


def held_pack_worker(hold, clip: str, pipe, *initargs) -> None:
    """A pack decoding worker that, given the task holding `clip`, sends its pid on `hold`
    and waits there (for the pack to kill it) instead of decoding; otherwise the real one."""
    from genreflow.features import workers

    decode_task = workers._decode_task

    def decode_or_hold(clips):
        if any(path == clip for path, _ in clips):
            hold.send(os.getpid())
            while True:
                signal.pause()
        return decode_task(clips)

    workers._decode_task = decode_or_hold
    workers._serve(pipe, *initargs)


def _main(argv: list[str]) -> None:
    fd, target, calls, named, how, *rest = argv
    if how == "-m":
        module, *args = rest
        sys.argv = [module, *args]
        _hold_after(int(fd), target, int(calls), named)
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    elif how == "-c":
        code, *args = rest
        sys.argv = ["-c", *args]
        _hold_after(int(fd), target, int(calls), named)
        exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})
    else:
        raise SystemExit(f"killable_child: expected -m MODULE or -c CODE, got {how!r}")


if __name__ == "__main__":
    # As `python -m` and `python -c` have it: the working folder first, not tests/.
    sys.path[0] = os.getcwd()
    _main(sys.argv[1:])
