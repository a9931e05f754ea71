"""Expected user errors as one line and exit status 2; tracebacks only when asked for.

Every command wraps its `main` with `run_command`:

    if __name__ == "__main__":
        exit_process(run_command(main, prog="launch/evaluate.py"))

An expected failure — a missing or unreadable file, input of the wrong format, no S3
credentials, an unreachable endpoint, a bad config value — prints `prog: error: <line>`
(one line per problem) on stderr and returns 2. `--debug` on the command line or
`DINO_DEBUG=1` in the environment re-raises instead, with the traceback. Under a launcher
(RANK set) an error raised before the process group exists (config, preflight: the same
on every rank) is printed by rank 0 only, other ranks exit 2 quietly; once the group
exists a rank's own error (bad data on that rank) is printed by that rank, tagged
`[rank N]`. Anything else is a bug and keeps its traceback.

What counts as expected: `UserError` and its subclasses (`ConfigError`, `CheckpointError`,
`BadDataError`, the preflight's report), file-system errors that name a file
(`FileNotFoundError`, `PermissionError`, `IsADirectoryError`, `NotADirectoryError`), and
botocore's credential and connection errors (recognised by name: this leaf does not import
botocore). Such an exception anywhere in the `__cause__`/`__context__` chain counts.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

DEBUG_FLAG = "--debug"
DEBUG_ENV = "DINO_DEBUG"
EXIT_USER_ERROR = 2

log = logging.getLogger("dino_scale.errors")


class UserError(Exception):
    """A failure the user can fix; its message is what to print (one line per problem) and
    names the file, URL or config key and what to do."""


# botocore class name -> what to tell the user (the exception's own text is appended)
_BOTOCORE_HINTS = {
    "NoCredentialsError": "no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                          "(or an AWS profile); on Kubernetes the dino-s3 Secret provides them",
    "PartialCredentialsError": "incomplete S3 credentials: set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    "EndpointConnectionError": "cannot reach the S3 endpoint: check AWS_ENDPOINT_URL (or "
                               "data.storage_options.endpoint_url / --endpoint-url) and the network",
    "ConnectTimeoutError": "the S3 endpoint does not answer: check AWS_ENDPOINT_URL (or "
                           "data.storage_options.endpoint_url / --endpoint-url) and the network",
    "InvalidEndpointError": "invalid S3 endpoint URL: fix AWS_ENDPOINT_URL (or data.storage_options.endpoint_url)",
}
_FILE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def user_message(exc: BaseException) -> str | None:
    """The line(s) to print for an expected failure, or None for a bug."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        message = _message_of(current)
        if message is not None:
            return message
        current = current.__cause__ or current.__context__
    return None


def _message_of(exc: BaseException) -> str | None:
    if isinstance(exc, UserError):
        return str(exc) or type(exc).__name__
    for cls in type(exc).__mro__:
        if cls.__module__.startswith("botocore") and cls.__name__ in _BOTOCORE_HINTS:
            return f"{_BOTOCORE_HINTS[cls.__name__]} ({_one_line(str(exc))})"
    if isinstance(exc, _FILE_ERRORS):
        what = exc.strerror or _one_line(str(exc))
        name = exc.filename if exc.filename is not None else ""
        if isinstance(exc, FileNotFoundError):
            hint = "check the path (or the config key / argument that names it)"
        elif isinstance(exc, PermissionError):
            hint = "check its permissions"
        else:
            hint = "check the path"
        return f"{name}: {what}; {hint}" if name else f"{what}; {hint}"
    return None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def debug_requested(argv: list[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def strip_debug_flag(argv: list[str] | None) -> list[str] | None:
    """`argv` without `--debug` (None stays None: then sys.argv is read and stripped)."""
    if argv is None:
        argv = sys.argv[1:]
    return [a for a in argv if a != DEBUG_FLAG]


def _launcher_rank() -> int:
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                return 0
    return 0


def report(prog: str, message: str) -> None:
    """Print `prog: error: <line>` for each line of `message` (rank 0 only; others log it)."""
    lines = [line for line in message.splitlines() if line.strip()] or [message]
    rank = _launcher_rank()
    if rank != 0 and not _process_group_exists():
        if logging.getLogger("dino_scale").handlers:  # set up: this rank's log file, if any
            for line in lines:
                log.error("%s: error: %s", prog, line)
        return
    tag = f"[rank {rank}] " if rank else ""
    for line in lines:
        print(f"{prog}: error: {tag}{line}", file=sys.stderr, flush=True)


def _process_group_exists() -> bool:
    """torch.distributed initialised in this process (looked up, never imported: a leaf)."""
    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def run_command(main: Callable[[list[str] | None], object], prog: str,
                argv: list[str] | None = None) -> int:
    """Call `main(argv)` (without `--debug`); an expected failure becomes its line(s) on
    stderr and exit status 2, unless debugging was asked for."""
    debug = debug_requested(argv)
    try:
        code = main(strip_debug_flag(argv))
    except Exception as exc:  # noqa: BLE001 - sorted into expected failures and bugs below
        message = user_message(exc)
        if message is None or debug:
            raise
        report(prog, message)
        return EXIT_USER_ERROR
    return code if isinstance(code, int) else 0


def exit_process(code: int) -> NoReturn:
    """`sys.exit(code)` at the end of a command's process, without the interpreter's last
    garbage collections over everything torch, DeepSpeed and timm allocated: py-spy showed
    each rank spending ~1.5 s in them at exit. What is still alive is frozen first; exit
    handlers run as usual (logging flushes), only objects kept alive by reference cycles
    keep their finalizers unrun. Never call it in a process that goes on (tests)."""
    gc.freeze()
    sys.exit(code)
