"""A real Docker daemon for tests, made from Debian's packages by the tests themselves.

* **Packages**: ``docker.io`` and ``debootstrap`` (and ``docker-registry`` for the registry)
  are installed with apt-get when missing; ``apt-get update`` runs at most once per process.
* **Daemon**: ``dockerd`` with default flags, started in its own session, its output in
  ``<state>/dockerd.log``. Concurrent test sessions share it: each holds a shared lock on
  ``<state>/dockerd.lock`` while it uses it; the session that leaves last (it gets the lock
  exclusively) stops the daemon that a test session started (its pid is in
  ``<state>/dockerd.pid``). A daemon that was running before any test session is never
  stopped.
* **Images**: no registry is reachable here, so ``FROM python`` cannot be pulled. The
  Python image is made from Debian's packages (``debootstrap`` + ``docker import``), with
  this machine's CA bundle in it (outgoing TLS goes through the machine's own authority), and
  an MLflow image is built on it (``mlflow-skinny`` of the host's MLflow version, with
  SQLAlchemy for sqlite stores) for the projects whose code logs into its run. Both are
  built once per machine (checked with ``docker image inspect``) and saved with
  ``docker save`` to ``<cache>/``, so a machine whose daemon state was wiped loads them back
  instead of building again. Builds are serialised across processes by a lock.
* **Registry**: Debian's ``docker-registry`` (distribution) on ``127.0.0.1:<free port>``,
  which docker treats as an insecure registry by default (loopback).

Everything here blocks: call it from session fixtures.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from .mlflow_server import free_port

#: Bump when the recipe of the images changes, so machines rebuild them.
RECIPE = "1"
BASE_IMAGE = "aioproj-test/python:bookworm"
MLFLOW_VERSION = version("mlflow")
MLFLOW_IMAGE = f"aioproj-test/mlflow:{MLFLOW_VERSION}-r{RECIPE}"
#: The label of every test image, so they can be told apart from a user's.
IMAGE_LABEL = "aioproj.test-image"
#: The label tests give their containers (with docker_args), with a value of their own.
TEST_LABEL = "aioproj.test"

STATE_DIR = Path("/run/aioproj-tests")
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aioproj-tests"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
DEFAULT_MIRROR = "http://deb.debian.org/debian"

_apt_updated = False
#: Seconds this process spent in apt-get (the fixture reports it).
apt_seconds = 0.0


class DockerUnavailable(Exception):
    """The daemon cannot be had on this machine; the message says why."""


def _run(argv: list[str], *, timeout: float, what: str, **kwargs: object) -> str:
    """Run ``argv``; its output, or DockerUnavailable with the output's tail."""
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    try:
        done = subprocess.run(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
            **kwargs,  # type: ignore[call-overload]
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DockerUnavailable(f"{what}: {exc}") from exc
    output = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        raise DockerUnavailable(f"{what} failed (exit {done.returncode}):\n{output[-3000:]}")
    return output


@contextlib.contextmanager
def _flock(path: Path, mode: int = fcntl.LOCK_EX) -> Iterator[int]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield fd
    finally:
        os.close(fd)


# -- packages ----------------------------------------------------------------------------


def find_program(name: str) -> str | None:
    """``name`` on PATH, or in the sbin/bin directories packages install to (a PATH
    without the sbin directories is common for non-login shells)."""
    found = shutil.which(name)
    if found is not None:
        return found
    for folder in ("/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        if os.access(f"{folder}/{name}", os.X_OK):
            return f"{folder}/{name}"
    return None


def apt_install(*packages: str, binaries: tuple[str, ...]) -> None:
    """Install ``packages`` unless every one of ``binaries`` is on PATH already."""
    global _apt_updated, apt_seconds
    if all(find_program(b) for b in binaries):
        return
    start = time.monotonic()
    if os.geteuid() != 0:
        raise DockerUnavailable(
            f"{', '.join(binaries)} missing and installing {', '.join(packages)} needs root"
        )
    if shutil.which("apt-get") is None:
        raise DockerUnavailable(f"{', '.join(binaries)} missing and there is no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=600"]  # other sessions may be installing too
    if not _apt_updated:
        _run(["apt-get", *lock, "update", "-q"], timeout=900, what="apt-get update", env=env)
        _apt_updated = True
    _run(
        ["apt-get", *lock, "install", "-y", "-q", "--no-install-recommends", *packages],
        timeout=900,
        what=f"apt-get install {' '.join(packages)}",
        env=env,
    )
    apt_seconds += time.monotonic() - start


# -- the daemon ----------------------------------------------------------------------------


def docker_client() -> str:
    """The docker CLI tests and aioproj use: the first on PATH."""
    found = find_program("docker")
    if found is None:
        raise DockerUnavailable("no docker client on PATH after installing docker.io")
    return found


def daemon_answers(docker: str) -> bool:
    try:
        done = subprocess.run(
            [docker, "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _is_dockerd(pid: int) -> bool:
    """True while ``pid`` is a live (not zombie) dockerd."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    name, _, rest = stat.partition(" (")[2].rpartition(")")
    return name == "dockerd" and rest.split()[0] != "Z"


def _stop_pid(pid: int, grace: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _is_dockerd(pid):
        time.sleep(0.1)
    if _is_dockerd(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class DockerDaemon:
    """A running daemon and the images tests use; see the module docstring."""

    docker: str
    log_path: Path
    #: The shared lock this session holds while it uses the daemon.
    _lock_fd: int | None = None

    @classmethod
    def start(cls) -> DockerDaemon:
        """Install what is missing, start (or join) the daemon. Raises DockerUnavailable."""
        if os.geteuid() != 0:
            raise DockerUnavailable("a Docker daemon needs root to install and start here")
        apt_install("docker.io", binaries=("dockerd",))
        STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        docker = docker_client()
        log_path = STATE_DIR / "dockerd.log"
        lock_fd = os.open(STATE_DIR / "dockerd.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(lock_fd, fcntl.LOCK_SH)
        daemon = cls(docker, log_path, lock_fd)
        try:
            with _flock(STATE_DIR / "dockerd.start.lock"):
                if not daemon_answers(docker):
                    daemon._spawn()
        except BaseException:
            daemon.close()
            raise
        return daemon

    def _spawn(self) -> None:
        dockerd = find_program("dockerd")
        if dockerd is None:
            raise DockerUnavailable("dockerd is not on PATH after installing docker.io")
        # Detached (not this process's child): the daemon may outlive this session when
        # another one still uses it, and whoever stops it needs no child to reap.
        out = _run(
            [
                "sh",
                "-c",
                'setsid "$1" >>"$2" 2>&1 </dev/null & echo $!',
                "sh",
                dockerd,
                str(self.log_path),
            ],
            timeout=30,
            what="starting dockerd",
        )
        pid = int(out.split()[-1])
        (STATE_DIR / "dockerd.pid").write_text(str(pid))
        deadline = time.monotonic() + 60
        time.sleep(0.2)
        while time.monotonic() < deadline and _is_dockerd(pid):
            if daemon_answers(self.docker):
                return
            time.sleep(0.2)
        _stop_pid(pid, 10)
        (STATE_DIR / "dockerd.pid").unlink(missing_ok=True)
        tail = self.log_path.read_text(errors="replace")[-3000:]
        raise DockerUnavailable(f"dockerd did not come up; its log ends:\n{tail}")

    def close(self) -> None:
        """Leave the daemon; the last session to leave stops a daemon a session started."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # another session still uses it
            pid_file = STATE_DIR / "dockerd.pid"
            try:
                pid = int(pid_file.read_text())
            except (OSError, ValueError):
                return  # not started by a test session: not ours to stop
            if _is_dockerd(pid):
                _stop_pid(pid, 20)
            pid_file.unlink(missing_ok=True)
        finally:
            os.close(fd)

    # -- images ------------------------------------------------------------------------

    def image_exists(self, image: str) -> bool:
        done = subprocess.run(
            [self.docker, "image", "inspect", image], capture_output=True, check=False
        )
        return done.returncode == 0

    def ensure_images(self) -> dict[str, float]:
        """Make BASE_IMAGE and MLFLOW_IMAGE present; return what each step took (s)."""
        timings: dict[str, float] = {}
        images = (BASE_IMAGE, MLFLOW_IMAGE)
        if all(self.image_exists(i) for i in images):
            return timings
        cache = CACHE_DIR / f"images-mlflow{MLFLOW_VERSION}-r{RECIPE}.tar"
        with _flock(CACHE_DIR / "images.lock"):
            if all(self.image_exists(i) for i in images):
                return timings  # another session made them meanwhile
            if cache.exists():
                start = time.monotonic()
                with contextlib.suppress(DockerUnavailable):
                    _run([self.docker, "load", "-i", str(cache)], timeout=600, what="docker load")
                timings["load"] = time.monotonic() - start
                if all(self.image_exists(i) for i in images):
                    return timings
            if not self.image_exists(BASE_IMAGE):
                start = time.monotonic()
                self._build_base()
                timings["base"] = time.monotonic() - start
            start = time.monotonic()
            self._build_mlflow()
            timings["mlflow"] = time.monotonic() - start
            start = time.monotonic()
            tmp = cache.with_suffix(".tmp")
            _run(
                [self.docker, "save", "-o", str(tmp), *images],
                timeout=600,
                what="docker save",
            )
            tmp.replace(cache)
            for old in CACHE_DIR.glob("images-*.tar"):
                if old != cache:
                    old.unlink(missing_ok=True)
            timings["save"] = time.monotonic() - start
        return timings

    def _build_base(self) -> None:
        apt_install("debootstrap", binaries=("debootstrap",))
        with tempfile.TemporaryDirectory(prefix="aioproj-rootfs-") as tmp:
            rootfs = Path(tmp) / "rootfs"
            debootstrap = find_program("debootstrap")
            if debootstrap is None:
                raise DockerUnavailable("debootstrap is not installed after apt-get")
            _run(
                [
                    debootstrap,
                    "--variant=minbase",
                    "--include=python3,python3-venv,python-is-python3",
                    "bookworm",
                    str(rootfs),
                    debian_mirror(),
                ],
                timeout=1200,
                what="debootstrap",
            )
            for pattern in ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*"):
                for path in rootfs.glob(pattern):
                    if path.is_file():
                        path.unlink()
            certs = rootfs / "etc/ssl/certs"
            certs.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(HOST_CA_BUNDLE, certs / "ca-certificates.crt")
            tar = subprocess.Popen(
                ["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE
            )
            try:
                _run(
                    [
                        self.docker,
                        "import",
                        "--change",
                        "ENV LANG=C.UTF-8",
                        "--change",
                        f"LABEL {IMAGE_LABEL}=base",
                        "-",
                        BASE_IMAGE,
                    ],
                    timeout=600,
                    what="docker import",
                    stdin=tar.stdout,
                )
            finally:
                assert tar.stdout is not None
                tar.stdout.close()
                tar.wait()

    def _build_mlflow(self) -> None:
        dockerfile = f"""\
FROM {BASE_IMAGE}
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/mlflow \\
 && /opt/mlflow/bin/pip install --no-cache-dir -q mlflow-skinny=={MLFLOW_VERSION} sqlalchemy alembic
ENV PATH=/opt/mlflow/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
LABEL {IMAGE_LABEL}=mlflow
"""
        self.build(dockerfile, MLFLOW_IMAGE)

    def build(self, dockerfile: str, tag: str, files: dict[str, str] | None = None) -> None:
        """``docker build`` ``dockerfile`` (with ``files`` in its context) as ``tag``."""
        with tempfile.TemporaryDirectory(prefix="aioproj-build-") as tmp:
            (Path(tmp) / "Dockerfile").write_text(dockerfile)
            for name, text in (files or {}).items():
                (Path(tmp) / name).write_text(text)
            _run(
                [self.docker, "build", "-q", "-t", tag, tmp],
                timeout=900,
                what=f"docker build {tag}",
            )

    def docker_json(self, *args: str) -> object:
        """``docker <args>`` parsed as JSON (blocking)."""
        return json.loads(_run([self.docker, *args], timeout=60, what=f"docker {args[0]}"))

    def remove_containers(self, label: str) -> None:
        """Remove every container with ``label``, running or not."""
        found = self.containers(label)
        if found:
            _run([self.docker, "rm", "-f", *found], timeout=120, what="docker rm")

    def containers(self, label: str) -> list[str]:
        """Ids of every container (running or not) that has ``label``."""
        out = _run(
            [self.docker, "ps", "-aq", "--no-trunc", "--filter", f"label={label}"],
            timeout=60,
            what="docker ps",
        )
        return out.split()


def debian_mirror() -> str:
    """The Debian mirror apt uses here (deb822 sources), for debootstrap."""
    try:
        text = DEBIAN_SOURCES.read_text()
    except OSError:
        return DEFAULT_MIRROR
    for line in text.splitlines():
        if line.startswith("URIs:"):
            for uri in line.split()[1:]:
                if "security" not in uri:
                    return uri
    return DEFAULT_MIRROR


# -- a registry ------------------------------------------------------------------------------


class Registry:
    """Debian's ``docker-registry`` on 127.0.0.1; ``host`` is ``127.0.0.1:<port>``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.log_path = root / "registry.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Install the package if needed, start, wait for ``/v2/``. Raises DockerUnavailable."""
        apt_install("docker-registry", binaries=("docker-registry",))
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.yml"
        config.write_text(
            json.dumps(  # YAML is a superset of JSON
                {
                    "version": 0.1,
                    "log": {"level": "warn"},
                    "storage": {"filesystem": {"rootdirectory": str(self.root / "data")}},
                    "http": {"addr": self.host},
                }
            )
        )
        registry = find_program("docker-registry")
        if registry is None:
            raise DockerUnavailable("docker-registry is not installed after apt-get")
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                [registry, "serve", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self._proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        self.stop()
        raise DockerUnavailable(f"docker-registry did not start:\n{self.log_path.read_text()}")

    def manifest_digest(self, repository: str, reference: str) -> str | None:
        """The digest the registry serves for ``repository:reference``, or None."""
        request = urllib.request.Request(
            f"http://{self.host}/v2/{repository}/manifests/{reference}",
            method="HEAD",
            headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.headers.get("Docker-Content-Digest")
        except urllib.error.HTTPError:
            return None

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
