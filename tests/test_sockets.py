"""IPC sockets live in private directories and are mode 0600, whatever the umask."""

from __future__ import annotations

import os
import stat
import tempfile

import pytest
import zmq

from demesne import sockets
from demesne.config import ConfigError, default_dir, default_engine_endpoint


def test_default_endpoint_is_in_a_per_user_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_engine_endpoint() == f"ipc://{tmp_path}/demesne/engine.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_dir().endswith(f"demesne-{os.getuid()}")


def test_bind_makes_the_directory_private_and_the_socket_0600(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    endpoint = default_engine_endpoint()
    old = os.umask(0)  # the reproducer: under umask 000 anyone could connect
    zctx = zmq.Context()
    sock = zctx.socket(zmq.ROUTER)
    try:
        sockets.bind(sock, endpoint)
        path = sockets.ipc_path(endpoint)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    finally:
        os.umask(old)
        sock.close(0)
        zctx.term()
    sockets.remove(endpoint)
    assert not os.path.exists(sockets.ipc_path(endpoint))


def test_a_loose_private_directory_is_tightened(tmp_path):
    d = tmp_path / "run"
    d.mkdir(mode=0o777)
    os.chmod(d, 0o777)
    sockets.private_dir(str(d))
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700


def test_a_symlink_is_refused_as_the_private_directory(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "demesne"
    link.symlink_to(target)
    with pytest.raises(ConfigError):
        sockets.private_dir(str(link))


@pytest.mark.parametrize("runtime", ["missing", "not-ours"])
def test_an_unusable_runtime_dir_falls_back_to_the_temp_dir(monkeypatch, tmp_path, runtime):
    """``su`` or a remote shell can leave XDG_RUNTIME_DIR naming a directory that does not
    exist or is not ours: the sockets go to the temporary directory, and serve starts."""
    from demesne.serve import private_endpoint

    base = tmp_path / "run-user-1000"
    if runtime == "not-ours":
        base.mkdir(mode=0o500)  # (root may write anyway: then it is used, which is fine)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    usable = os.path.isdir(base) and os.access(base, os.W_OK | os.X_OK)
    assert default_dir() == (os.path.join(base, "demesne") if usable else os.path.join(tempfile.gettempdir(), f"demesne-{os.getuid()}"))
    endpoint, directory = private_endpoint()
    try:
        assert endpoint.startswith(f"ipc://{directory}/")
        assert os.path.dirname(directory) == (str(base) if usable else tempfile.gettempdir())
    finally:
        os.rmdir(directory)
