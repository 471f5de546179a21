"""`dspark-build serve`: run `tritonserver` on a model repository, bound to localhost.

Uses the system `tritonserver` when there is one (e.g. an NGC container), else the binary bundled
in the `nvidia-pytriton` wheel. For the bundled one, the Python backend needs a backend directory
holding the stub built for this Python version, the wheel's own libraries on LD_LIBRARY_PATH, and
this environment's `bin` first on PATH so the stub finds our packages.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..runtime.errors import CheckpointError


class ServerError(RuntimeError):
    """tritonserver could not be found or did not become ready; the message says why."""


@dataclass
class Server:
    process: subprocess.Popen
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    log: Path

    @property
    def endpoints(self) -> dict[str, str]:
        return {"http": f"{self.host}:{self.http_port}", "grpc": f"{self.host}:{self.grpc_port}",
                "metrics": f"http://{self.host}:{self.metrics_port}/metrics"}

    def stop(self, timeout: float = 30) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=timeout)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            pass
        stop_process(self.process.pid, timeout=1)  # whatever of the group is left
        self.process.wait(timeout=5)


def find_tritonserver() -> tuple[Path, Path]:
    """(tritonserver binary, its backends directory)."""
    system = shutil.which("tritonserver") or "/opt/tritonserver/bin/tritonserver"
    if Path(system).is_file():
        return Path(system), Path(system).parent.parent / "backends"
    try:
        import pytriton
    except ImportError:
        raise ServerError("no tritonserver found: use an NGC Triton container or `pip install nvidia-pytriton`"
                          ) from None
    root = Path(pytriton.__file__).parent / "tritonserver"
    return root / "bin" / "tritonserver", root / "backends"


def _bundled_root(binary: Path) -> Path | None:
    root = binary.parent.parent
    return root if (root / "python_backend_stubs").is_dir() else None


def prepare_backends(binary: Path, backends: Path, cache: Path) -> Path:
    """The bundled server's backends with this Python's stub in backends/python (copied once)."""
    root = _bundled_root(binary)
    if root is None:
        return backends
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"the bundled tritonserver has no Python backend stub for Python {version}")
    target = cache / f"backends-py{version}"
    if not (target / "python" / "triton_python_backend_stub").is_file():
        tmp = cache / f".backends-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(backends, tmp)
        shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def server_env(binary: Path) -> dict[str, str]:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["DSPARK_PYTHON"] = sys.executable  # for tensor-parallel worker processes started inside models
    # Several model processes share the cores. OpenMP's default keeps an idle thread spinning for ~3 ms
    # after each parallel region, stealing a core from the next model in the pipeline; passive waiting
    # instead pays a wake-up on each of a draft round's hundreds of small ops (2x slower rounds). A
    # short spin (~0.1 ms) keeps threads awake through a round and idle between models.
    env.setdefault("GOMP_SPINCOUNT", "10000")
    libs = []
    root = _bundled_root(binary)
    if root is not None:
        libs.append(str(root.parent.parent / "nvidia_pytriton.libs"))
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and (Path(libdir) / sysconfig.get_config_var("LDLIBRARY")).exists():
        libs.append(libdir)  # the libpython of this interpreter, for the Python backend stub
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [env.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)
    return env


def start_server(repo: Path, *, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, log: Path | None = None, timeout: float = 600,
                 cache: Path | None = None) -> Server:
    """Start tritonserver on `repo` and wait until every model is ready."""
    repo = Path(repo).absolute()
    if not (repo / "ensemble" / "config.pbtxt").is_file():
        raise CheckpointError(repo, "not a model repository", expected="the output of `dspark-build repo`")
    # A server already on these ports would answer the readiness check below in place of ours.
    for name, port in (("http", http_port), ("grpc", grpc_port), ("metrics", metrics_port)):
        if not _port_free(host, port):
            raise ServerError(f"{name} port {port} on {host} is in use (another tritonserver? stop it with "
                              f"`dspark-build stop`, or pick another --{name}-port)")
    binary, backends = find_tritonserver()
    cache = cache or Path.home() / ".cache" / "dspark-trt"
    cache.mkdir(parents=True, exist_ok=True)
    backend_dir = prepare_backends(binary, backends, cache)
    log = Path(log or repo.parent / f"tritonserver-{http_port}.log").absolute()
    cmd = [str(binary), f"--model-repository={repo}", f"--backend-directory={backend_dir}",
           f"--http-address={host}", f"--http-port={http_port}", f"--grpc-address={host}", f"--grpc-port={grpc_port}",
           f"--metrics-address={host}", f"--metrics-port={metrics_port}", "--allow-metrics=true",
           "--allow-gpu-metrics=false", "--exit-on-error=true", "--strict-readiness=true", "--log-verbose=0",
           "--exit-timeout-secs=10"]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=server_env(binary),
                                   start_new_session=True)
    server = Server(process, host, http_port, grpc_port, metrics_port, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(f"tritonserver exited with code {process.returncode}; last lines of {log}:\n"
                              + "\n".join(log.read_text(errors="replace").splitlines()[-25:]))
        try:
            with urllib.request.urlopen(f"http://{host}:{http_port}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.5)
    server.stop()
    raise ServerError(f"tritonserver was not ready after {timeout:.0f} s; see {log}")


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to bind
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def stop_process(pid: int, timeout: float = 30) -> bool:
    """SIGTERM the server's process group, SIGKILL it if it lingers. False if it was not running."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True
