"""Bulk work in child processes, each with a GIL of its own.

Threads of one process pass the GIL to each other at every 8 KiB block (zstd, BLAKE3 and the
reads release it for each call), and a commit's threads wrote their packs one at a time under
the writer's lock: two threads bought a build 12%, and two children bought a first commit 25%
where the kernel's copies into new page-cache pages were half its CPU (bench/README.md). A
child forked here sees everything its parent planned
(copy on write), is handed job after job by index as it finishes one, may ask its parent
questions between (the parent is the one place that decides, e.g. which chunks are new),
and sends back each job's result, which the parent applies. Children never touch the
parent's index connection, die with their parent, and any error of theirs is raised in the
parent once every child has ended.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Generic, NoReturn, TypeVar

from dotmesh.errors import DotmeshError, InternalError

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)  # the C library this process already has loaded
_STOPPING = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}

J = TypeVar("J")
R = TypeVar("R")


class Stopped(BaseException):
    """Raised in a child whose parent answered "stop": the parent met an error of its own."""


class Link:
    """A child's line to its parent."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def ask(self, kind: str, value: object) -> object:
        """The parent's ``answer(kind, value)``; waits for it."""
        self._conn.send(("ask", (kind, value)))
        tag, got = self._conn.recv()
        if tag != "answer":
            raise Stopped(str(got))
        return got

    def progress(self, n: int) -> None:
        self._conn.send(("p", n))


class _Run(Generic[J, R]):
    def __init__(self, jobs: Sequence[J], one: Callable[[J], R],
                 setup: Callable[[Link], None] | None,
                 finish: Callable[[], None] | None = None) -> None:
        self.jobs, self.one, self.setup, self.finish = jobs, one, setup, finish


def run(jobs: Sequence[J], one: Callable[[J], R], done: Callable[[int, R], None], *,
        workers: int, what: str,
        answer: Callable[[str, object], object] | None = None,
        progress: Callable[[int], None] | None = None,
        setup: Callable[[Link], None] | None = None,
        finish: Callable[[], None] | None = None) -> bool:
    """``one`` over ``jobs`` in up to ``workers`` children; ``done(i, result)`` here as each
    job ends, in whatever order. A child runs ``setup(link)`` first (to route its questions
    and progress through ``link``), and ``finish()`` once it has no job left (this returns
    only after every child has ended, so what ``finish`` does is done); its questions are
    answered by ``answer`` here, between results. On the first failure (an error a child
    reports, its death inside a job, or an error of ``answer`` or ``done`` here) the other
    children are killed, and it is raised once every child has ended. False, with nothing
    run, when no child could be forked (no memory or process to spare): the caller then does
    the work on threads. ``what``: the work, as an error names it ("writing files")."""
    from multiprocessing.connection import Connection
    from multiprocessing.connection import wait as wait_any

    job = _Run(jobs, one, setup, finish)
    parent = os.getpid()
    children: dict[Connection, int] = {}
    ended: set[int] = set()
    failure: BaseException | None = None
    queue = iter(range(len(jobs)))
    busy: dict[Connection, int | None] = {}  # the job each child was last handed
    finished: set[Connection] = set()  # children that said they ended their work
    try:
        for _ in range(min(workers, len(jobs))):
            try:
                conn = _fork_child(children, parent, job)
            except OSError as e:
                if e.errno not in (errno.ENOMEM, errno.EAGAIN):
                    raise
                break
            busy[conn] = next(queue, None)
            _hand(conn, busy[conn])
        if not children:
            return False
        live = list(children)
        stopping = False
        while live:
            if failure is not None and not stopping:  # what the others do is lost anyway
                _kill_all(children)
                stopping = True
            for c in wait_any(live):
                assert isinstance(c, Connection)
                try:
                    kind, value = c.recv()
                except (EOFError, ConnectionResetError):  # (reset: died, a message unread)
                    live.remove(c)
                    c.close()
                    if busy.get(c) is not None and failure is None:  # died inside a job
                        status = _reap(children[c])  # its line ends as it exits
                        failure = OSError(errno.EIO, f"a process {what} died{_how(status)}")
                    continue
                if kind == "p":
                    if progress is not None:
                        progress(value)
                elif kind == "ask":
                    if failure is None and answer is not None:
                        try:
                            _send(c, ("answer", answer(*value)))
                        except Exception as e:
                            failure = e
                    if failure is not None or answer is None:
                        _send(c, ("stop", "the work was stopped"))
                elif kind == "done":
                    i, got = value
                    if failure is None:
                        try:
                            done(i, got)
                            ended.add(i)
                        except Exception as e:
                            failure = e
                    busy[c] = next(queue, None) if failure is None else None
                    _hand(c, busy[c])
                elif kind == "finished":
                    finished.add(c)
                elif kind == "error" and failure is None:
                    sort, detail, message = value
                    failure = rebuilt(sort, detail, message, what)
    except BaseException:
        _kill_all(children)
        raise
    finally:
        codes = [_reap(pid) for pid in children.values()]
    if failure is not None:
        raise failure
    # (with SIGCHLD ignored by a parent of ours, every exit code reads 0: a child that died
    # after its last job, in ``finish``, is told by the word it did not send)
    if any(codes) or len(ended) != len(jobs) or len(finished) != len(children):
        raise OSError(errno.EIO, f"a process {what} ended without finishing its work")
    return True


def _how(status: int) -> str:
    """How a child that died mid-job ended, for the error (", killed by SIGKILL")."""
    if not os.WIFSIGNALED(status):
        return ""
    sig = os.WTERMSIG(status)
    try:
        return f", killed by {signal.Signals(sig).name}"
    except ValueError:
        return f", killed by signal {sig}"


def _kill_all(children: dict[Connection, int]) -> None:
    for pid in children.values():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _send(c: Connection, message: object) -> None:
    """Send to a child; one that died meanwhile is seen as its connection ends, and what it
    did not finish fails the work."""
    try:
        c.send(message)
    except OSError:
        pass


def _hand(conn: Connection, job: int | None) -> None:
    """Give a child its next job (None: no more)."""
    _send(conn, job)


def _fork_child(children: dict[Connection, int], parent: int, job: _Run[J, R]) -> Connection:
    """Start one child, noted in ``children`` (its connection: its pid); returned is the
    connection, on which it waits for its first job. The signals a Ctrl-C or a forwarding
    daemon sends are held back from the fork until the child is noted, and the child takes
    them with their default action: no exception can unwind a child into its parent's
    code, and no child goes unnoted."""
    from multiprocessing.connection import Connection

    mine, theirs = socket.socketpair()
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPPING)
    try:
        pid = os.fork()
        if pid == 0:
            try:
                for signum in _STOPPING:  # (one the parent ignores stays ignored)
                    if signal.getsignal(signum) != signal.SIG_IGN:
                        signal.signal(signum, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
                mine.close()
                _child(Connection(theirs.detach()), parent, job)
            finally:
                os._exit(1)
        conn = Connection(mine.detach())
        children[conn] = pid
        return conn
    except BaseException:
        mine.close()
        raise
    finally:
        theirs.close()
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _reap(pid: int) -> int:
    """A child's wait status; 0 when a parent of ours set SIGCHLD to be ignored (the kernel
    reaped it: whether it finished is told by what it sent)."""
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return 0


def _child(conn: Connection, parent: int, job: _Run[J, R]) -> NoReturn:
    """A child of :func:`run`: ends with ``os._exit`` (nothing of the parent's, its index
    connection included, is closed or flushed here)."""
    code = 0
    try:
        if _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            raise OSError(ctypes.get_errno(), "a worker process cannot be tied to its parent")
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(1)
        if job.setup is not None:
            job.setup(Link(conn))
        while (i := conn.recv()) is not None:  # the parent's next job, None when done
            conn.send(("done", (i, job.one(job.jobs[i]))))
        if job.finish is not None:  # (an error here is reported as any other)
            job.finish()
        conn.send(("finished", None))  # the parent counts these, not exit codes
    except BaseException as e:  # reported to the parent, which raises it
        code = 1
        try:
            conn.send(("error", portable(e)))
        except BaseException:
            pass
    os._exit(code)


def portable(e: BaseException) -> tuple[str, object, str]:
    """An error as (kind, detail, message), rebuilt by :func:`rebuilt` in the parent."""
    if isinstance(e, OSError):
        return "os", (e.errno, e.strerror, e.filename), str(e)
    if isinstance(e, DotmeshError):
        return "dm", type(e).__name__, str(e)
    return "other", type(e).__name__, str(e)


def rebuilt(kind: str, detail: object, message: str, what: str = "the work") -> BaseException:
    if kind == "os" and isinstance(detail, tuple):
        no, why, name = detail
        return OSError(no, why, name) if name is not None else OSError(no, why)
    if kind == "dm":
        kinds: list[type[DotmeshError]] = [DotmeshError]
        while kinds:  # the class of that name (every one takes a message)
            cls = kinds.pop()
            if cls.__name__ == detail:
                return cls(message)
            kinds.extend(cls.__subclasses__())
    return InternalError(f"{what} failed: {detail}: {message}")
