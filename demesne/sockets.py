"""Where IPC sockets live and who may open them.

An engine's IPC socket is as good as an API key: whoever can connect to it can generate. So
it lives in a directory only this user can enter (``$XDG_RUNTIME_DIR/demesne``, else
``/tmp/demesne-<uid>``; ``demesne serve`` makes a fresh one per run) and the socket itself is
mode 0600, whatever the umask. A directory someone else owns is refused, never used.
"""

from __future__ import annotations

import os
import stat

import zmq

from .config import ConfigError, default_dir


def ipc_path(endpoint: str) -> str | None:
    return endpoint.removeprefix("ipc://") if endpoint.startswith("ipc://") else None


def private_dir(path: str) -> None:
    """Make ``path`` a directory only we can enter (0700), or refuse one that is not ours."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise ConfigError(f"{path} is not a directory of this user's; refusing to put the engine socket there")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)


def bind(sock: zmq.Socket, endpoint: str) -> None:
    """Bind ``sock``; an IPC socket file gets mode 0600, in a private directory when it is
    the default place."""
    path = ipc_path(endpoint)
    if path is not None and os.path.dirname(path) == default_dir():
        private_dir(default_dir())
    old = os.umask(0o177) if path is not None else None
    try:
        sock.bind(endpoint)
    finally:
        if old is not None:
            os.umask(old)
    if path is not None:
        os.chmod(path, 0o600)


def remove(endpoint: str) -> None:
    """The IPC socket file an engine bound (ZeroMQ leaves it behind)."""
    path = ipc_path(endpoint)
    if path is not None:
        try:
            os.unlink(path)
        except OSError:
            pass


def has_input(sock: zmq.Socket) -> bool:
    """A frame waits on ``sock``. Asking also takes the signal of the socket's descriptor
    (``ZMQ_FD``), as any use of the socket may: whoever waits on that descriptor must ask
    again after its own sends and reads, not only when it signals."""
    return bool(sock.getsockopt(_EVENTS) & _POLLIN)


def send_to(sock: zmq.Socket, peer: bytes, frame: bytes) -> None:
    """One frame to ``peer`` of a ROUTER socket, without waiting (raises ``zmq.ZMQError``
    as ``send_multipart`` would: a ROUTER checks the peer on the first part)."""
    sock.send(peer, _MORE_NOBLOCK)
    sock.send(frame, _NOBLOCK)


# As plain ints: pyzmq's constants are enum members, whose ``&`` and ``|`` cost microseconds
# (``send_multipart`` ORs them per part, more than a send costs), and these run several times
# per decoded token.
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
_NOBLOCK, _MORE_NOBLOCK = int(zmq.NOBLOCK), int(zmq.SNDMORE | zmq.NOBLOCK)
