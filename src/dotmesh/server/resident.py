"""How ``dm`` talks to the resident daemon (:mod:`dotmesh.cli.daemon_server`): the socket, the
frames, and the client side that every ``dm`` command runs first.

A frame is a 4-byte big-endian length and a ``marshal``-encoded dict; the first frame from
the client carries its stdin, stdout and stderr as SCM_RIGHTS descriptors. Both ends check
with SO_PEERCRED that the other is the same user, and the socket's folder must be that user's
alone. This module is on the path of every command, so it imports only built-in modules
(``json``, ``pathlib`` and ``socket`` would cost more than the rest of the client).
"""

from __future__ import annotations

import _socket
import marshal
import os
import stat
import struct
import sys

TYPE_CHECKING = False  # typing itself costs more than this module: mypy knows the name
if TYPE_CHECKING:
    from typing import Any

_LENGTH = struct.Struct(">I")
_CREDENTIALS = struct.Struct("3i")
_FDS = struct.Struct("3i")
MAX_FRAME = 4 << 20  # argv and environment: far below, and a cap on what one read allocates
_OFF = ("0", "off", "no", "false")
FORWARDED = (2, 15, 1, 3)  # SIGINT, SIGTERM, SIGHUP, SIGQUIT: passed on to the command
TSTP, STOP, CONT = 20, 19, 18  # Ctrl-Z: the command is stopped and continued with the caller
GO = b"\0"  # the caller has the command's pid and will wait for it
START_TIMEOUT = 5.0


def socket_path() -> str:
    """``$DM_DAEMON_SOCKET``, else ``dotmesh/daemon.sock`` in ``$XDG_RUNTIME_DIR`` when that
    is ours, else in ``/tmp/dotmesh-UID``: one daemon per user, whatever the store."""
    explicit = os.environ.get("DM_DAEMON_SOCKET")
    if explicit:
        return os.path.abspath(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and private(runtime):
        return f"{runtime}/dotmesh/daemon.sock"
    return f"/tmp/dotmesh-{os.getuid()}/daemon.sock"


def private(folder: str) -> bool:
    """A real folder of this user's that nobody else may enter: anything less, and another
    user could stand in for the daemon and read the environment (keys) and the terminal."""
    try:
        st = os.lstat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def connect(path: str) -> _socket.socket | None:
    """A connection to a daemon of this user's at ``path``; None if there is none."""
    if not private(os.path.dirname(path) or "."):
        return None
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        conn.connect(path)
        if peer(conn)[1] != os.getuid():
            conn.close()
            return None
    except OSError:
        conn.close()
        return None
    return conn


def peer(conn: _socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end, from the kernel."""
    pid, uid, _gid = _CREDENTIALS.unpack(
        conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _CREDENTIALS.size))
    return pid, uid


def send(conn: _socket.socket, message: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
    data = marshal.dumps(message)
    frame = _LENGTH.pack(len(data)) + data
    sent = 0
    if fds:
        sent = conn.sendmsg([frame], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                                       struct.pack(f"{len(fds)}i", *fds))])
    if sent < len(frame):  # (nothing left: the peer may have read it all and gone already)
        conn.sendall(frame[sent:])


def receive(conn: _socket.socket, want_fds: int = 0, within: float | None = None
            ) -> tuple[dict[str, Any] | None, list[int]]:
    """One frame, and the descriptors sent with its first bytes (at most ``want_fds``, the
    rest closed); None at end of stream. Raises ValueError on a malformed frame and
    TimeoutError if it takes more than ``within`` seconds in all; on any failure the
    descriptors received are closed."""
    fds: list[int] = []
    try:
        if within is None:
            return _receive(conn, want_fds, fds, lambda: None)
        import time

        deadline = time.monotonic() + within

        def before_each_read() -> None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the frame took too long")
            conn.settimeout(left)

        return _receive(conn, want_fds, fds, before_each_read)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _receive(conn: _socket.socket, want_fds: int, fds: list[int], before_each_read: Any
             ) -> tuple[dict[str, Any] | None, list[int]]:
    before_each_read()
    if want_fds:
        data, ancillary, _flags, _addr = conn.recvmsg(65536, _socket.CMSG_SPACE(4 * want_fds))
        for level, kind, payload in ancillary:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds += struct.unpack(f"{usable // 4}i", payload[:usable])
        for extra in fds[want_fds:]:
            os.close(extra)
        del fds[want_fds:]
    else:
        data = conn.recv(65536)
    while len(data) < _LENGTH.size:
        before_each_read()
        more = conn.recv(65536)
        if not more:
            return None, fds
        data += more
    (length,) = _LENGTH.unpack_from(data)
    if length > MAX_FRAME:
        raise ValueError(f"a frame of {length} bytes")
    data = data[_LENGTH.size:]
    while len(data) < length:
        before_each_read()
        more = conn.recv(min(65536, length - len(data)))
        if not more:
            return None, fds
        data += more
    try:
        message = marshal.loads(data[:length])
    except (EOFError, TypeError, ValueError, MemoryError) as e:
        raise ValueError(f"a frame that does not decode: {e}") from None
    if not isinstance(message, dict):
        raise ValueError("a frame that is not a dict")
    return message, fds


def package() -> str:
    """The dotmesh package this process runs: a daemon serves only callers of the same one."""
    return os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def ask(argv: list[str]) -> int | None:
    """Run ``dm ARGV`` in the daemon and return its exit code; None when there is no usable
    daemon (the caller then runs the command itself)."""
    if os.environ.get("DM_DAEMON", "").lower() in _OFF or _in_background():
        return None
    conn = connect(socket_path())
    if conn is None:
        return None
    opened: list[int] = []
    try:
        try:
            cwd = os.getcwd()
        except OSError:
            return None
        fds = []
        for fd in (0, 1, 2):
            try:
                os.fstat(fd)
                fds.append(fd)
            except OSError:  # closed: the command gets /dev/null there, as a fresh open would
                opened.append(os.open(os.devnull, os.O_RDWR))
                fds.append(opened[-1])
        umask = os.umask(0)
        os.umask(umask)
        streams = {name: (getattr(s, "encoding", None) or "utf-8",
                          getattr(s, "errors", None) or "strict")
                   for name, s in (("stdin", sys.stdin), ("stdout", sys.stdout),
                                   ("stderr", sys.stderr))}
        import _signal  # type: ignore[import-not-found]  # signal.py imports enum: too slow

        ignored = [n for n in FORWARDED if _signal.getsignal(n) == _signal.SIG_IGN]
        try:
            conn.settimeout(START_TIMEOUT)  # a stopped or stuck daemon: run here instead
            send(conn, {"argv": list(argv), "cwd": cwd, "env": dict(os.environ),
                        "umask": umask, "streams": streams, "package": package(),
                        "python": interpreter(), "ignored": ignored})
            reply, _ = receive(conn)
            if reply is None or "fds" not in reply:  # a fallback: run here
                return None
            # Only to a daemon that answered: descriptors in flight to a stuck one would
            # hold the caller's pipes open (and its reader waiting) until it woke.
            send(conn, {}, tuple(fds))
            reply, _ = receive(conn)
            if reply is None or not isinstance(reply.get("pid"), int):
                return None
        except (OSError, ValueError):
            return None
        previous = {n: _signal.getsignal(n) for n in (*FORWARDED, TSTP)}
        caught = _pass_signals(int(reply["pid"]), _signal, ignored)  # before it starts
        try:
            conn.send(GO)  # only now may the command start: it cannot run twice
            conn.settimeout(None)
        except OSError:  # it will not start: run it here, with the signals as they were
            for signum, handler in previous.items():
                _signal.signal(signum, handler)
            return None
        return _wait(conn, _signal, caught)
    finally:
        conn.close()
        for fd in opened:
            os.close(fd)


def interpreter() -> tuple[str, int, str]:
    """What the interpreter fixed at its start and a command's text depends on: the daemon's
    must be the caller's (else the caller runs the command itself)."""
    return sys.version, sys.flags.utf8_mode, sys.getfilesystemencoding()


def _in_background() -> bool:
    """A job in the background of a terminal: in-process it would be stopped when it reads
    the terminal; the daemon's child, outside the terminal's session, would not be."""
    try:
        return os.isatty(0) and os.tcgetpgrp(0) != os.getpgrp()
    except OSError:
        return False


def _pass_signals(group: int, _signal: Any, ignored: list[int]) -> list[int]:
    """From now on, signals the caller gets go to the command's process group (its hooks too,
    as a terminal's Ctrl-C reaches them); returns the list the forwarded ones are noted in."""
    caught: list[int] = []

    def send_group(signum: int) -> None:
        try:
            os.killpg(group, signum)
        except OSError:
            pass

    def forward(signum: int, _frame: object) -> None:
        caught.append(signum)
        send_group(signum)

    def pause(_signum: int, _frame: object) -> None:  # Ctrl-Z: the command stops, then we do
        send_group(STOP)
        _signal.signal(TSTP, _signal.SIG_DFL)
        os.kill(os.getpid(), TSTP)
        _signal.signal(TSTP, pause)  # continued (fg, bg): so is the command
        send_group(CONT)

    for signum in FORWARDED:
        if signum not in ignored:
            _signal.signal(signum, forward)
    if _signal.getsignal(TSTP) != _signal.SIG_IGN:
        _signal.signal(TSTP, pause)
    return caught


def _wait(conn: _socket.socket, _signal: Any, caught: list[int]) -> int:
    """Wait until the command says how it ended; then die of the signal that ended it, as the
    caller of an in-process dm would see."""
    try:
        reply, _ = receive(conn)
    except (OSError, ValueError):
        reply = None
    if reply is not None and isinstance(reply.get("exit"), int):
        return int(reply["exit"])
    if caught:  # ended by what was passed on: end the same way
        _signal.signal(caught[-1], _signal.SIG_DFL)
        os.kill(os.getpid(), caught[-1])
        return 128 + caught[-1]
    sys.stderr.write("dm: error: the dm daemon's process for this command ended without an "
                     "exit code; run it again with DM_DAEMON=off\n")
    return 1


def control(command: str, path: str | None = None) -> dict[str, Any] | None:
    """Ask the daemon for its ``status`` or to ``stop``; None if none answers."""
    conn = connect(path or socket_path())
    if conn is None:
        return None
    try:
        conn.settimeout(10)
        send(conn, {"control": command})
        reply, _ = receive(conn)
    except (OSError, ValueError):
        return None
    finally:
        conn.close()
    return reply
