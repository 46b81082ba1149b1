"""Authenticated, encrypted links between gateways and engines: ZeroMQ CURVE (pyzmq's zmq.auth).

``demesne keygen DIR NAME`` writes a key pair as ZeroMQ certificates: ``NAME.key`` (the public
key, to hand out) and ``NAME.key_secret`` (mode 0600, stays on its host). An engine serves with
its secret key (``--curve-key``) and accepts only gateways whose public keys lie in
``--curve-clients DIR``; a gateway connects with its own secret key and the engine's public key,
so each side proves itself to the other and the link is encrypted. IPC on one box needs no keys
(the socket file's permissions guard it, sockets.py); an engine on TCP refuses to start without
keys unless ``--insecure`` says the network is trusted.

A refused peer is logged once (then at most once a minute, with a count) on each side: the
engine names the public key it did not know, the gateway the engine that refused it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from .config import ConfigError

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
REPEAT_EVERY = 60.0  # seconds between repeated log lines about the same refusal


def keygen(directory: str, name: str) -> tuple[Path, Path]:
    """Write ``name.key`` and ``name.key_secret`` in ``directory``; never overwrites."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"not a key name: {name!r}")
    folder = Path(directory)
    public, secret = folder / f"{name}{PUBLIC_SUFFIX}", folder / f"{name}{SECRET_SUFFIX}"
    for path in (public, secret):
        if path.exists():
            raise ConfigError(f"{path} exists; remove it first to make a new key pair")
    folder.mkdir(parents=True, exist_ok=True)
    old = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        zmq.auth.create_certificates(str(folder), name)
    finally:
        os.umask(old)
    os.chmod(public, 0o644)
    return public, secret


def secret_key(path: str) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the key pair {path}: {exc}") from None
    if not secret:
        raise ConfigError(f"{path} holds no secret key (pass the .key_secret file of a `demesne keygen` pair)")
    return public, secret


def public_key(path: str) -> bytes:
    """The public key in a ``.key`` (or ``.key_secret``) file."""
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the public key {path}: {exc}") from None
    return public


def public_keys(directory: str) -> set[bytes]:
    """Every public key in ``directory``'s ``*.key`` files."""
    if not os.path.isdir(directory):
        raise ConfigError(f"{directory}: no such directory of public keys")
    return {public_key(str(path)) for path in sorted(Path(directory).glob(f"*{PUBLIC_SUFFIX}"))}


class OnceLog:
    """Logs a message the first time its key comes, then at most every REPEAT_EVERY seconds
    with how many times it came in between."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger
        self._last: dict[object, tuple[float, int]] = {}

    def __call__(self, key: object, message: str, *args) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is None or now - last[0] >= REPEAT_EVERY:
            again = f" ({last[1]} more times since)" if last and last[1] else ""
            self.logger.error(message + again, *args)
            self._last[key] = (now, 0)
        else:
            self._last[key] = (last[0], last[1] + 1)

    def forget(self, key: object) -> None:
        self._last.pop(key, None)


class _Clients:
    """zmq.auth's CURVE credentials provider: the keys in the clients directory."""

    def __init__(self, directory: str, log: OnceLog):
        self.directory = directory
        self.allowed = public_keys(directory)
        self.log = log

    def reload(self) -> None:
        """Re-read the directory (SIGHUP): a gateway added or removed there is let in or kept
        out from its next connection; connections already made stay."""
        try:
            self.allowed = public_keys(self.directory)
        except ConfigError as exc:
            logging.getLogger("demesne.engine").error("keeping the gateway keys I had: %s", exc)
            return
        logging.getLogger("demesne.engine").info("admitting %d gateway keys from %s", len(self.allowed), self.directory)

    def callback(self, _domain: str, key: bytes) -> bool:
        if key in self.allowed:
            return True
        self.log(
            ("key", key), "refused a gateway whose public key %s is not in %s (demesne keygen; copy its .key there)",
            key.decode(), self.directory,
        )
        return False


def serve_curve(ctx: zmq.Context, sock: zmq.Socket, secret_file: str, clients_dir: str, log: OnceLog) -> tuple[ThreadAuthenticator, _Clients]:
    """Make ``sock`` (not yet bound) a CURVE server admitting the keys in ``clients_dir``; the
    authenticator thread (to stop at the end) and the admitted keys (to reload)."""
    public, secret = secret_key(secret_file)
    clients = _Clients(clients_dir, log)
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("demesne.zap"))
    auth.start()
    auth.configure_curve_callback("*", clients)
    sock.curve_secretkey, sock.curve_publickey = secret, public
    sock.curve_server = True
    return auth, clients


def client_curve(sock: zmq.Socket, secret_file: str, server_file: str) -> None:
    """Make ``sock`` (not yet connected) a CURVE client of the server with that public key."""
    sock.curve_publickey, sock.curve_secretkey = secret_key(secret_file)
    sock.curve_serverkey = public_key(server_file)


HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


def set_link_timeout(sock: zmq.Socket, seconds: float) -> None:
    """A TCP link whose sent data goes unacknowledged this long is closed (TCP_USER_TIMEOUT).

    The kernel acknowledges for a process however busy it is, so this tells a cut cable or a
    dead host from a slow engine, which keeps its connection however long its steps take."""
    if seconds > 0:
        sock.setsockopt(zmq.TCP_MAXRT, int(seconds * 1000))
