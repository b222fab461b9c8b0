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


def socket_path() -> str:
    """``$DM_DAEMON_SOCKET``, else ``dotmesh/daemon.sock`` in ``$XDG_RUNTIME_DIR`` when that
    is ours, else in ``/tmp/dotmesh-UID``: one daemon per user, whatever the store."""
    explicit = os.environ.get("DM_DAEMON_SOCKET")
    if explicit:
        return explicit
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
    conn.sendall(frame[sent:])


def receive(conn: _socket.socket, want_fds: int = 0) -> tuple[dict[str, Any] | None, list[int]]:
    """One frame, and the descriptors sent with its first bytes (at most ``want_fds``, the
    rest closed); None at end of stream. Raises ValueError on a malformed frame."""
    fds: list[int] = []
    if want_fds:
        data, ancillary, _flags, _addr = conn.recvmsg(65536, _socket.CMSG_SPACE(4 * want_fds))
        for level, kind, payload in ancillary:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds += struct.unpack(f"{usable // 4}i", payload[:usable])
        for extra in fds[want_fds:]:
            os.close(extra)
        fds = fds[:want_fds]
    else:
        data = conn.recv(65536)
    while len(data) < _LENGTH.size:
        more = conn.recv(65536)
        if not more:
            return None, fds
        data += more
    (length,) = _LENGTH.unpack_from(data)
    if length > MAX_FRAME:
        raise ValueError(f"a frame of {length} bytes")
    data = data[_LENGTH.size:]
    while len(data) < length:
        more = conn.recv(min(65536, length - len(data)))
        if not more:
            return None, fds
        data += more
    try:
        message = marshal.loads(data[:length])
    except (EOFError, TypeError) as e:
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
    if os.environ.get("DM_DAEMON", "").lower() in _OFF:
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
        try:
            send(conn, {"argv": list(argv), "cwd": cwd, "env": dict(os.environ),
                        "umask": umask, "streams": streams, "package": package()},
                 tuple(fds))
            reply, _ = receive(conn)
        except (OSError, ValueError):
            return None
        if reply is None or "pid" not in reply:  # a fallback: run here
            return None
        return _wait(conn)
    finally:
        conn.close()
        for fd in opened:
            os.close(fd)


def _wait(conn: _socket.socket) -> int:
    """Pass signals on until the command says how it ended."""
    import _signal  # type: ignore[import-not-found]  # signal.py imports enum: too slow

    caught: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        caught.append(signum)
        try:
            conn.send(bytes([signum]))
        except OSError:
            pass

    for signum in FORWARDED:
        _signal.signal(signum, forward)
    try:
        reply, _ = receive(conn)
    except (OSError, ValueError):
        reply = None
    if reply is not None and isinstance(reply.get("exit"), int):
        return int(reply["exit"])
    if caught:  # ended by what was passed on
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
