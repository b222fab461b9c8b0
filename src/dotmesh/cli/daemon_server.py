"""The resident dm process: start-up paid once, each command a fork of a warm interpreter.

Dotmesh's ``dm`` was a thin client of a resident server; ours is a whole program, and starting
it (Python, click, the store's modules) costs 0.1-0.3 s before any work: more than a btrfs
snapshot, a reset to a kept state or a new branch take. ``dm daemon start`` runs this process:
it imports everything once and listens on a private Unix socket
(:mod:`dotmesh.server.resident`). The ``dm`` entry point asks it first; the daemon forks (or
hands the request to a child it forked ahead while all was quiet: :class:`_Spare`), and
the child takes the caller's terminal (its stdin, stdout and stderr, passed over the socket),
working folder, environment and umask, runs the command exactly as ``dm`` would, and sends
back the exit code. Signals the caller gets (Ctrl-C, SIGTERM, SIGHUP, SIGQUIT) are passed on;
if the caller dies, the child is killed as it would have been. Commands share nothing but
code, and the daemon itself opens no store, holds no lock and runs no thread.

When anything is off (no daemon, another user's socket, a daemon of other code: dm was
upgraded or edited), ``dm`` runs the command itself, so the daemon only ever changes speed.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from typing import Any

from dotmesh.errors import Conflict, DotmeshError
from dotmesh.server import resident

REQUEST_TIMEOUT = 1.0
# A spare (see _Spare) is forked once no command has run for this long: commands that a
# script runs back to back get forks of their own, as before, with no spare being readied
# beside them on the other core
SPARE_AFTER = 0.25
SPARES_LOST = 3


def preload() -> list[str]:
    """Import every module dm may run (what start-up would otherwise do per command);
    the names of those that failed to import."""
    import importlib
    import pkgutil

    failed = []
    for module in pkgutil.walk_packages([resident.package()], "dotmesh."):
        try:
            importlib.import_module(module.name)  # by name: all of them, not an edge
        except Exception:  # noqa: BLE001 - an optional dependency: its command says so itself
            failed.append(module.name)
    import rich.console  # noqa: F401 - progress bars and tables
    import rich.progress  # noqa: F401

    return failed


def fingerprint(package: str) -> frozenset[tuple[str, int, int]]:
    """(path, mtime, size) of each of the package's sources and compiled modules: is the
    daemon's code still dm's?"""
    found = set()
    stack = [package]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name != "__pycache__":
                        stack.append(entry.path)
                elif entry.name.endswith((".py", ".so")):
                    st = entry.stat(follow_symlinks=False)
                    found.add((entry.path, st.st_mtime_ns, st.st_size))
    return frozenset(found)


_STATUS_FIELDS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                  "NoNewPrivs", "Seccomp")


def context(pid: int) -> tuple[object, ...]:
    """What a process may do and where it lives, beyond its uid: a child of the daemon has the
    daemon's, so a caller with other ones (fewer capabilities, no_new_privs, other
    namespaces, limits or niceness) runs its command itself."""
    import resource

    with open(f"/proc/{pid}/status") as f:
        status = [line.strip() for line in f if line.split(":", 1)[0] in _STATUS_FIELDS]
    spaces = sorted((n, os.readlink(f"/proc/{pid}/ns/{n}")) for n in os.listdir(f"/proc/{pid}/ns"))
    limits = [resource.prlimit(pid, getattr(resource, n)) for n in dir(resource)
              if n.startswith("RLIMIT_")]
    return (tuple(status), tuple(spaces), os.readlink(f"/proc/{pid}/root"), tuple(limits),
            os.getpriority(os.PRIO_PROCESS, pid))


def serve(path: str) -> None:
    """Listen at ``path`` until stopped (SIGTERM, SIGINT or ``dm daemon stop``). When dm's
    code changes (an upgrade), the request that notices runs in its caller and the daemon
    starts again in the same process, on the new code."""
    import fcntl
    import socket
    import threading

    folder = os.path.dirname(path) or "."
    os.makedirs(folder, mode=0o700, exist_ok=True)
    if not resident.private(folder):
        raise PermissionError(f"{folder} must be a folder of yours that only you may enter")
    lock = os.open(os.path.join(folder, "daemon.lock"),
                   os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        raise Conflict(f"a dm daemon already serves {path}") from None
    package = resident.package()
    failed = preload()
    if threading.active_count() != 1:  # a fork copies the locks other threads hold
        raise RuntimeError("importing dm started a thread; the daemon cannot fork safely")
    code = fingerprint(package)
    ours_context = context(os.getpid())
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = os.path.join(folder, f".daemon.{os.getpid()}.sock")
    if os.path.lexists(staging):
        os.unlink(staging)
    listener.bind(staging)
    listener.listen(64)
    os.replace(staging, path)  # a dead daemon's socket is replaced whole
    ours = os.stat(path).st_ino
    started, served, readied = time.time(), 0, 0
    restart = False

    def stop(_signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the commands
    spare: _Spare | None = None
    running: dict[int, int] = {}  # commands still at work: a pidfd of each, its pid
    quiet_since = 0.0  # when the last request came, or the last command ended
    spares_lost = 0  # spares that died before they were ready
    try:
        while True:
            wait: float | None = None
            if spare is None and not running and spares_lost < SPARES_LOST:
                # ready the next one once all is quiet
                wait = max(0.0, quiet_since + SPARE_AFTER - time.monotonic())
                if wait == 0:
                    spare, wait = _Spare.fork(listener, lock), None
                    spares_lost += spare is None  # (no process to spare)
            # wait for a caller, a command's end, quiet, or the spare's word (ready, or gone)
            watched = [listener.fileno(), *running]
            if spare is not None and not spare.ready:
                watched.append(spare.line.fileno())
            poller = select.poll()
            for fd in watched:
                poller.register(fd, select.POLLIN)
            woke = {fd for fd, _ in poller.poll(None if wait is None else wait * 1000)}
            for fd in woke & running.keys():
                del running[fd]
                os.close(fd)
                if not running:
                    quiet_since = time.monotonic()
            if spare is not None and spare.line.fileno() in woke:
                spare.hear()
                if spare.closed:  # it died unready: another once all is quiet, a few times
                    spare, quiet_since = None, time.monotonic()
                    spares_lost += 1  # (after SPARES_LOST, none: something kills them)
            if listener.fileno() not in woke:
                continue
            try:
                conn, _ = listener.accept()
            except OSError:  # out of descriptors, say: let commands run in-process a while
                time.sleep(0.1)
                continue
            fds: list[int] = []
            try:
                caller, uid = resident.peer(conn)
                if uid != os.getuid():
                    continue
                # One deadline for the whole request: a silent or slow client must not
                # hold up everyone else's commands.
                request, _ = resident.receive(conn, within=REQUEST_TIMEOUT)
                if request is None:
                    continue
                if "control" in request:
                    resident.send(conn, {"pid": os.getpid(), "socket": path, "package": package,
                                         "started": started, "served": served,
                                         "readied": readied,
                                         "failed_imports": failed})
                    if request["control"] == "stop":
                        return
                    continue
                stale = fingerprint(package) != code
                why = ("stale" if stale else "another dm" if request.get("package") != package
                       else "another interpreter"
                       if tuple(request.get("python") or ()) != resident.interpreter()
                       else "another context" if context(caller) != ours_context else None)
                if why is not None:
                    resident.send(conn, {"fallback": why})
                    if stale:  # dm's code changed under us (an upgrade): start it afresh
                        restart = True
                        return
                    continue
                resident.send(conn, {"fds": 3})
                _, fds = resident.receive(conn, want_fds=3, within=REQUEST_TIMEOUT)
                if len(fds) != 3:
                    continue
                served += 1
                quiet_since = time.monotonic()  # (without pidfds, the only sign of work)
                pid = spare.take(conn, fds, request, caller) if spare is not None else None
                if spare is not None and spare.closed:  # taken, or dropped
                    spare = None
                if pid is not None:
                    readied += 1
                else:
                    pid = os.fork()
                    if pid == 0:
                        listener.close()
                        os.close(lock)
                        for fd in running:
                            os.close(fd)
                        _child(conn, fds, request, caller)  # never returns
                try:
                    running[os.pidfd_open(pid)] = pid
                except OSError:  # ended already, or no descriptor to spare: no wait for it
                    pass
            except Exception:  # noqa: BLE001, S112 - one bad request, not the daemon's end
                continue
            finally:
                for fd in fds:
                    os.close(fd)
                conn.close()
    finally:
        if spare is not None:
            spare.end()
        for fd in running:
            os.close(fd)
        try:
            if os.stat(path).st_ino == ours:
                os.unlink(path)
        except OSError:
            pass
        listener.close()
        os.close(lock)
        if restart:  # the same process, the new code (the caller ran its command itself)
            os.execv(sys.executable, [sys.executable, "-m", __spec__.name, path])  # not __main__


class _Spare:
    """A child forked before the request it will run. While the daemon waits, it copies the
    pages it shares with the daemon and grows its heap (:func:`heap.own_memory`: 40-50 ms),
    work that a command forked on demand pays in page faults as it goes: a btrfs 1% commit
    took 0.36 s in such a fork and 0.30 s in a readied one (median of 6 each). It is forked
    only once no command has run for SPARE_AFTER seconds, so readying it takes no core from
    one; a request that comes before it is ready drops it and gets a fork of its own, as
    before. It is signalled through a pidfd, never by pid: it may die unseen (the kernel
    reaps the daemon's children), and its pid go to another process."""

    def __init__(self, pid: int, pidfd: int, line: Any) -> None:
        self.pid, self.pidfd, self.line = pid, pidfd, line
        self.ready = self.closed = False

    @classmethod
    def fork(cls, listener: Any, lock: int) -> _Spare | None:
        import socket

        from dotmesh.heap import own_memory

        try:
            mine, theirs = socket.socketpair()
        except OSError:
            return None
        try:
            pid = os.fork()
        except OSError:
            mine.close()
            theirs.close()
            return None
        if pid == 0:
            try:
                listener.close()
                os.close(lock)
                mine.close()
                own_memory()
                theirs.sendall(b"r")
                handed, fds = resident.receive(theirs, want_fds=4)
                theirs.close()
                if handed is not None and len(fds) == 4:
                    for fd in fds:  # as a fork's copies are (descriptors received are not)
                        os.set_inheritable(fd, False)
                    conn = socket.socket(fileno=fds[0])
                    _child(conn, fds[1:], handed["request"], int(handed["caller"]))
            finally:
                os._exit(0)  # the daemon ended, or dropped this spare
        theirs.close()
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # no pidfds here: no spares either
            mine.close()
            os.kill(pid, signal.SIGKILL)  # (just forked: still ours, not reaped)
            return None
        return cls(pid, pidfd, mine)

    def hear(self) -> None:
        """Read what the spare said: that it is ready, or (its line ended) that it died."""
        import socket

        try:
            said = self.line.recv(1, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            said = b""
        if said == b"r":
            self.ready = True
        else:
            self.end()

    def take(self, conn: Any, fds: list[int], request: dict[str, Any], caller: int
             ) -> int | None:
        """Hand over one command (the caller's connection and descriptors); its pid, or None
        if this spare is gone or not ready yet (then it is dropped, and the command gets a
        fork of its own, as before)."""
        if not self.ready:
            self.hear()
        if not self.ready:  # dropped: its readying must not take a core from the command
            self.end()
            return None
        # (no stop between the handing over and the closing: the daemon's end would kill
        # the command)
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            # a stopped spare must not hold up the daemon: it gets a second, then is dropped
            self.line.settimeout(1.0)
            resident.send(self.line, {"request": request, "caller": caller},
                          (conn.fileno(), *fds))
            self._close()  # the command is its own now: never signalled from here
        except OSError:
            self.end()
            return None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        return self.pid

    def end(self) -> None:
        """Drop this spare: it is killed (it ran no command)."""
        if self.closed:
            return
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except OSError:  # gone already
            pass
        self._close()

    def _close(self) -> None:
        self.closed = True
        self.line.close()
        os.close(self.pidfd)


def _child(conn: Any, fds: list[int], request: dict[str, Any], caller: int) -> None:
    """Become the caller's ``dm`` process for one command, then exit."""
    try:
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in request.get("ignored") or ():
            if sig in resident.FORWARDED:  # as nohup or a script's background job asked
                signal.signal(sig, signal.SIG_IGN)
        os.setpgid(0, 0)  # its own group: the caller signals the command and its hooks
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        time.tzset()
        try:
            import locale

            locale.setlocale(locale.LC_CTYPE, "")  # as Python sets it at start-up
        except Exception:  # noqa: BLE001, S110 - an unknown locale: Python's start keeps "C"
            pass
        os.umask(int(request["umask"]))
        _reopen_streams(request.get("streams") or {})
        argv = [str(a) for a in request["argv"]]
        sys.argv = ["dm", *argv]
        conn.settimeout(None)

        from dotmesh.capture import proc

        proc.acting_for(caller)  # the caller's working folder is not a writer to stop
        resident.send(conn, {"pid": os.getpid()})
        if conn.recv(1) != resident.GO:  # the caller gave up waiting: it runs the command
            return
        _watch(conn)
        from dotmesh.cli.main import run
        from dotmesh.heap import one_shot

        one_shot()
        try:
            code = run(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        resident.send(conn, {"exit": code})
    except BaseException:  # noqa: BLE001, S110 - the caller reports the missing exit code
        pass
    finally:
        os._exit(0)


def _reopen_streams(streams: dict[str, Any]) -> None:
    """sys.stdin/stdout/stderr on the caller's descriptors, with the caller's encodings."""
    import io

    def opened(fd: int, name: str, mode: str) -> io.TextIOWrapper:
        encoding, errors = streams.get(name) or ("utf-8", "strict")
        binary = io.open(fd, mode + "b", buffering=0 if name == "stderr" else -1,  # noqa: UP020
                         closefd=False)
        return io.TextIOWrapper(binary, encoding=str(encoding), errors=str(errors),
                                line_buffering=name == "stderr" or os.isatty(fd),
                                write_through=name == "stderr")

    sys.stdin = sys.__stdin__ = opened(0, "stdin", "r")  # type: ignore[misc]
    sys.stdout = sys.__stdout__ = opened(1, "stdout", "w")  # type: ignore[misc]
    sys.stderr = sys.__stderr__ = opened(2, "stderr", "w")  # type: ignore[misc]
    import getpass

    getpass.getpass = _hidden_input


def _hidden_input(prompt: str = "Password: ", stream: Any = None) -> str:
    """getpass on the caller's terminal. The standard one opens /dev/tty, which a daemon's
    child does not have, and would fall back to reading the secret with echo on."""
    import termios

    if not os.isatty(0):
        raise EOFError("no terminal to read a secret from")
    before = termios.tcgetattr(0)
    quiet = list(before)
    quiet[3] &= ~termios.ECHO
    out = stream or sys.stderr
    # Echo off before the prompt shows (as getpass does): a key pasted as soon as the prompt
    # appears would otherwise be echoed, then dropped by the flush.
    termios.tcsetattr(0, termios.TCSAFLUSH, quiet)
    out.write(prompt)
    out.flush()
    try:
        line = sys.stdin.readline()
    finally:
        termios.tcsetattr(0, termios.TCSAFLUSH, before)
        out.write("\n")
        out.flush()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def _watch(conn: Any) -> None:
    """Die as the caller did if it vanishes (the caller signals the command's group itself)."""
    import threading

    def watch() -> None:
        while True:
            try:
                data = conn.recv(64)
            except OSError:
                data = b""
            if not data:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="dm-caller", daemon=True).start()


def main() -> None:
    """``python -m`` this module ``[SOCKET]``: what ``dm daemon start`` runs; a failure is one
    line (in ``daemon.log``, whose last line ``dm daemon start`` shows)."""
    try:
        serve(sys.argv[1] if len(sys.argv) > 1 else resident.socket_path())
    except DotmeshError as e:
        print(f"dm daemon: error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None


if __name__ == "__main__":
    main()
