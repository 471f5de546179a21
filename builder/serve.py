"""`dspark-build serve`: run `tritonserver` on a model repository, bound to localhost.

Uses the system `tritonserver` when there is one (e.g. an NGC container), else the binary bundled
in the `nvidia-pytriton` wheel. For the bundled one, the Python backend needs a backend directory
holding the stub built for this Python version, the wheel's own libraries on LD_LIBRARY_PATH, and
this environment's `bin` first on PATH so the stub finds our packages.

What a server start sets up, and `stop` takes down again:
- explicit model control (every model loaded at start), so that the orchestrator can reload a model
  whose process died (model_repository/dspark/1/model.py); the repository API that could do the same
  is restricted to callers that send the server's key in a header;
- a random key in DSPARK_INTERNAL_KEY, inherited by every model process: the orchestrator sends it on
  each call to dspark_verify (and dspark_draft, where the drafter is a model of its own), which refuse
  calls without it (clients cannot reach the per-slot state);
- a shared-memory prefix of its own for the Python backend's regions, and a state file (pid,
  ports, prefix) in the per-user state directory, so that `stop` and the next start remove every
  process and /dev/shm region a server left behind, whatever the current directory, also after a
  model process or tritonserver itself was killed.
"""

from __future__ import annotations

import json
import os
import secrets
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
from ..runtime.model_handlers import KEY_ENV
from ..runtime.watch import process_alive

KEY_HEADER = "dspark-internal-key"  # the header that opens the restricted repository API
SHM_DIR = Path("/dev/shm")


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
    shm_prefix: str = ""
    state_file: Path | None = None

    @property
    def endpoints(self) -> dict[str, str]:
        return {"http": f"{self.host}:{self.http_port}", "grpc": f"{self.host}:{self.grpc_port}",
                "metrics": f"http://{self.host}:{self.metrics_port}/metrics"}

    def stop(self, timeout: float = 30) -> None:
        stop_process(self.process.pid, timeout=timeout, shm_prefix=self.shm_prefix)
        self.process.wait(timeout=5)
        if self.state_file is not None:
            self.state_file.unlink(missing_ok=True)


def state_dir() -> Path:
    """Where server state files live: $DSPARK_STATE_DIR, else $XDG_STATE_HOME/dspark-trt, else
    ~/.local/state/dspark-trt (per user, independent of the current directory)."""
    if os.environ.get("DSPARK_STATE_DIR"):
        return Path(os.environ["DSPARK_STATE_DIR"])
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "dspark-trt"


def default_state_file(http_port: int) -> Path:
    return state_dir() / f"tritonserver-{http_port}.json"


def read_state(path: Path) -> dict:
    """A state file written by start_server (or, from older versions, a file holding just the pid)."""
    text = path.read_text().strip()
    return json.loads(text) if text.startswith("{") else {"pid": int(text)}


def clean_stale(directory: Path | None = None) -> list[int]:
    """Take down what servers whose tritonserver is gone (killed, crashed) left behind: model processes
    still in their process group, their shared-memory regions, their state files. Returns their pids."""
    cleaned = []
    for path in sorted((directory or state_dir()).glob("tritonserver-*.json")):
        try:
            state = read_state(path)
        except (OSError, ValueError):
            continue
        if process_alive(state["pid"]):
            continue
        prefix = state.get("shm_prefix", "")
        if prefix and _group_has(state["pid"], prefix):  # its model processes (the pid may be reused)
            stop_process(state["pid"], timeout=5, shm_prefix=prefix)
        for region in SHM_DIR.glob(f"{prefix}*") if prefix else ():
            region.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        cleaned.append(state["pid"])
    return cleaned


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
    # instead pays a wake-up on each of a draft round's hundreds of small ops (much slower rounds:
    # docs/measurements.md). A short spin (~0.1 ms) keeps threads awake through a round and idle between
    # models.
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
                 cache: Path | None = None, state_file: Path | None = None) -> Server:
    """Start tritonserver on `repo` and wait until every model is ready. Its state (pid, ports,
    shared-memory prefix) goes to `state_file` (default: one per HTTP port in `state_dir()`)."""
    repo = Path(repo).absolute()
    if not (repo / "ensemble" / "config.pbtxt").is_file():
        raise CheckpointError(repo, "not a model repository", expected="the output of `dspark-build repo`")
    # A server already on these ports would answer the readiness check below in place of ours.
    for name, port in (("http", http_port), ("grpc", grpc_port), ("metrics", metrics_port)):
        if not _port_free(host, port):
            raise ServerError(f"{name} port {port} on {host} is in use (another tritonserver? stop it with "
                              f"`dspark-build stop`, or pick another --{name}-port)")
    clean_stale()
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
    key, shm_prefix = secrets.token_hex(16), f"dspark_{secrets.token_hex(6)}_"
    cmd += ["--model-control-mode=explicit", "--load-model=*",
            f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
            f"--http-restricted-api=model-repository:{KEY_HEADER}={key}",
            f"--grpc-restricted-protocol=model-repository:{KEY_HEADER}={key}"]
    env = server_env(binary)
    env[KEY_ENV] = key
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    state_file = Path(state_file or default_state_file(http_port)).absolute()
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"pid": process.pid, "host": host, "http_port": http_port,
                                      "grpc_port": grpc_port, "metrics_port": metrics_port,
                                      "shm_prefix": shm_prefix, "log": str(log), "repo": str(repo)}) + "\n")
    server = Server(process, host, http_port, grpc_port, metrics_port, log, shm_prefix, state_file)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            server.stop(timeout=5)
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


def stop_process(pid: int, timeout: float = 30, shm_prefix: str = "") -> bool:
    """SIGTERM the server's process group (tritonserver, its model processes and their workers, also
    ones orphaned by a killed tritonserver), SIGKILL what lingers, then remove the group's /dev/shm
    regions (those named with `shm_prefix`). False if nothing of the group was running."""
    try:
        os.killpg(pid, signal.SIGTERM)
        running = True
    except ProcessLookupError:
        running = False
    deadline = time.monotonic() + timeout
    while running and time.monotonic() < deadline and _group_alive(pid):
        time.sleep(0.2)
    if running and _group_alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for _ in range(50):  # the kernel takes a moment to reap a killed group
            if not _group_alive(pid):
                break
            time.sleep(0.1)
    if shm_prefix:
        for region in SHM_DIR.glob(f"{shm_prefix}*"):
            region.unlink(missing_ok=True)
    return running


def _group_has(pgid: int, text: str) -> bool:
    """Whether a live process of this group has `text` in its command line."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == pgid and \
                    text.encode() in (stat.parent / "cmdline").read_bytes():
                return True
        except (OSError, IndexError, ValueError):
            continue
    return False


def group_pids(pgid: int) -> list[int]:
    """The processes of this group that still run (zombies excepted: they hold no resources)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _group_alive(pgid: int) -> bool:
    return bool(group_pids(pgid))
