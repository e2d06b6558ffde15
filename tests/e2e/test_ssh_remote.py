"""Sharing through an SSH remote, against a real OpenSSH server this test starts on 127.0.0.1 (dvc-ssh)."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from caiforge.engines.serving import free_port
from tests.e2e import pipeline

pytestmark = pytest.mark.slow
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


@pytest.fixture
def sshd(tmp_path):
    """A throwaway sshd on a free loopback port accepting one client key; yields (port, good key, wrong key)."""
    if not Path(SSHD).is_file() or not shutil.which("ssh-keygen"):
        if os.environ.get("CAIFORGE_REQUIRE_SSHD"):
            pytest.fail(f"CAIFORGE_REQUIRE_SSHD is set but {SSHD} or ssh-keygen is missing")
        pytest.skip("OpenSSH server not installed (.ci/run installs Debian's openssh-server)")
    etc = tmp_path / "sshd"
    etc.mkdir()
    host_key, good, wrong = keygen(etc / "host"), keygen(etc / "good"), keygen(etc / "wrong")
    (etc / "authorized_keys").write_text((etc / "good.pub").read_text())
    port = free_port()
    (etc / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nAuthorizedKeysFile {etc / 'authorized_keys'}\n"
        f"PidFile {etc / 'sshd.pid'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "StrictModes no\nPermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n"
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege-separation directory root's sshd insists on
    log = etc / "sshd.log"  # a file, not a pipe: a chatty sshd must never block on a full pipe
    with log.open("w") as sink:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(etc / "sshd_config")], stderr=sink)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                pytest.fail(f"sshd exited ({proc.returncode}): {log.read_text()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"sshd did not listen on 127.0.0.1:{port} within 20 s: {log.read_text()}")
            time.sleep(0.2)
        yield port, good, wrong
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def add_remote(repo: Path, port: int, key: Path, remote_dir: Path) -> None:
    url = f"ssh://{getpass.getuser()}@127.0.0.1:{port}{remote_dir}"
    pipeline.dvc(repo, "remote", "add", "-f", "-d", "team", url)
    pipeline.dvc(repo, "remote", "modify", "--local", "team", "keyfile", str(key))


def test_push_and_pull_through_ssh(repo, sshd, tmp_path):
    port, good, _ = sshd
    remote_dir = tmp_path / "ssh-remote"
    remote_dir.mkdir()
    add_remote(repo, port, good, remote_dir)
    pipeline.commit(repo, "record the build and the remote")
    pipeline.dvc(repo, "push")
    assert any(p.is_file() for p in remote_dir.rglob("*"))

    mate = tmp_path / "mate"
    pipeline.sh(tmp_path, "git", "clone", "-q", str(repo), str(mate))
    pipeline.dvc(mate, "remote", "modify", "--local", "team", "keyfile", str(good))
    pipeline.dvc(mate, "pull")
    assert "up to date" in pipeline.dvc(mate, "status").stdout
    assert pipeline.repro(mate) == []
    assert pipeline.data_digests(mate) == pipeline.data_digests(repo)


def test_wrong_key_fails_clearly_and_pushes_nothing(repo, sshd, tmp_path):
    port, _, wrong = sshd
    remote_dir = tmp_path / "ssh-remote"
    remote_dir.mkdir()
    add_remote(repo, port, wrong, remote_dir)
    proc = pipeline.dvc(repo, "push", check=False)
    assert proc.returncode != 0
    message = (proc.stdout + proc.stderr).lower()
    # dvc-ssh (asyncssh) says "Permission denied for user <user> on host 127.0.0.1": who, where, and why.
    assert "permission denied" in message and "127.0.0.1" in message, message[-2000:]
    assert not any(remote_dir.rglob("*")), "nothing reached the remote"
