"""Run mosquitto with the project's own configuration on a free loopback port (tests, benchmarks).

The shipped ``ops/deploy/mosquitto/mosquitto.conf`` is copied with its ``listener``
line replaced by the chosen port (and, for the hardened variant, with the
production file's password/ACL lines pointing at generated files). The process can
be stopped and started again on the same port to simulate a broker restart.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

DEPLOY_DIR = Path(__file__).resolve().parent / "deploy" / "mosquitto"
TEST_CONF = DEPLOY_DIR / "mosquitto.conf"
PROD_CONF = DEPLOY_DIR / "mosquitto.prod.conf"
ACL_FILE = DEPLOY_DIR / "acl"
MOSQUITTO_START_TIMEOUT_S = 10.0
MOSQUITTO_STOP_TIMEOUT_S = 5.0


class MosquittoUnavailable(RuntimeError):
    """mosquitto is not installed or did not start."""


def find_mosquitto() -> str:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if candidate and Path(candidate).exists():
            return candidate
    raise MosquittoUnavailable("mosquitto is not installed (apt install mosquitto)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def render_test_conf(port: int) -> str:
    """The test configuration with its listener moved to ``port``."""
    lines = [ln for ln in TEST_CONF.read_text().splitlines() if not ln.startswith("listener ")]
    return "\n".join([*lines, f"listener {port} 127.0.0.1", ""])


def render_hardened_conf(port: int, password_file: Path, acl_file: Path,
                         tls: tuple[Path, Path, Path] | None = None) -> str:
    """The production configuration's security settings (no anonymous, password file, ACL) on loopback ``port``.

    Persistence lines are dropped; everything about who may log in and what they may touch is kept
    verbatim. ``tls``: ``(certfile, keyfile, cafile)`` — the listener then speaks TLS with the
    production file's TLS settings and these certificates; without it the listener is plain.
    """
    out: list[str] = []
    skip_prefixes = ("listener", "certfile", "keyfile", "cafile", "tls_version", "protocol", "persistence",
                     "autosave_interval", "log_dest", "require_certificate")
    for ln in PROD_CONF.read_text().splitlines():
        s = ln.strip()
        if s.startswith("password_file"):
            out.append(f"password_file {password_file}")
        elif s.startswith("acl_file"):
            out.append(f"acl_file {acl_file}")
        elif not s.startswith(skip_prefixes):
            out.append(ln)
    out += ["persistence false", "log_dest stderr", f"listener {port} 127.0.0.1"]
    if tls is not None:
        certfile, keyfile, cafile = tls
        versions = [ln.strip() for ln in PROD_CONF.read_text().splitlines() if ln.strip().startswith("tls_version")]
        out += [f"certfile {certfile}", f"keyfile {keyfile}", f"cafile {cafile}", *versions]
    return "\n".join([*out, ""])


def write_credentials(workdir: Path, users: dict[str, str]) -> tuple[Path, Path]:
    """A mosquitto password file for ``users`` (made by ``mosquitto_passwd``) and a copy of the shipped ACL in
    ``workdir``: ``(password_file, acl_file)``. MosquittoUnavailable when ``mosquitto_passwd`` is missing."""
    exe = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(exe).exists():
        raise MosquittoUnavailable("mosquitto_passwd not installed")
    pw = Path(workdir) / "passwd"
    pw.touch()
    for user, password in users.items():
        subprocess.run([exe, "-b", str(pw), user, password], check=True, capture_output=True)
    acl = Path(workdir) / "acl"
    acl.write_text(ACL_FILE.read_text())
    return pw, acl


def hardened_mosquitto(workdir: Path, users: dict[str, str], tls: tuple[Path, Path, Path] | None = None,
                       ) -> MosquittoProcess:
    """A mosquitto (not yet started: use ``with``) on a free loopback port with the production security
    settings (:func:`render_hardened_conf`), ``users`` in its password file and the shipped ACL.
    MosquittoUnavailable when ``mosquitto_passwd`` is missing."""
    pw, acl = write_credentials(workdir, users)
    port = free_port()
    return MosquittoProcess(workdir, render_hardened_conf(port, pw, acl, tls=tls), port=port)


class MosquittoProcess:
    """A mosquitto child process; ``with MosquittoProcess(workdir) as m: m.url``."""

    def __init__(self, workdir: Path, conf_text: str | None = None, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.conf_text = conf_text if conf_text is not None else render_test_conf(self.port)
        self.conf_path = self.workdir / f"mosquitto-{self.port}.conf"
        self.log_path = self.workdir / f"mosquitto-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        exe = find_mosquitto()
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.conf_text
        if os.geteuid() == 0 and "\nuser " not in conf:
            conf += "user root\n"  # as root mosquitto would drop to `mosquitto`, who cannot read a private tmp dir
        self.conf_path.write_text(conf)
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen([exe, "-c", str(self.conf_path)], stdout=log, stderr=log)
        deadline = time.monotonic() + MOSQUITTO_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise MosquittoUnavailable(f"mosquitto exited: {self.log_path.read_text()[-500:]}")
            if _port_open(self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise MosquittoUnavailable(f"mosquitto did not listen on {self.port} within {MOSQUITTO_START_TIMEOUT_S} s")

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(MOSQUITTO_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        if down_s:
            time.sleep(down_s)
        self.start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def __enter__(self) -> MosquittoProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
