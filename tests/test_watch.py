"""ModelWatch on real processes: a death is seen within a look, while the scans of all of /proc that find
the processes stay rare once they are known (each scan takes milliseconds of a core the models need)."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from dspark_trt.runtime import watch
from dspark_trt.runtime.watch import ModelWatch, model_processes


class FakeBackend:
    """The two model-loading calls ModelWatch makes through Triton's pb_utils."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def unload_model(self, model: str) -> None:
        self.calls.append(f"unload {model}")

    def load_model(self, model: str) -> None:
        self.calls.append(f"load {model}")


def _stub(tmp_path: Path, model: str) -> subprocess.Popen:
    """A process shaped like a Python-backend stub of `model`: `python .../MODEL/1/model.py MODEL_0_0`."""
    script = tmp_path / model / "1" / "model.py"
    script.parent.mkdir(parents=True)
    script.write_text("import time\ntime.sleep(60)\n")
    return subprocess.Popen([sys.executable, str(script), f"{model}_0_0"])


def _until(condition, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_a_death_is_seen_at_once_and_proc_is_scanned_rarely_once_stable(tmp_path, monkeypatch) -> None:
    scans = []
    real_scan = watch.ProcessTree.scan
    monkeypatch.setattr(watch.ProcessTree, "scan", classmethod(lambda cls: scans.append(1) or real_scan()))
    stubs = [_stub(tmp_path, "alpha"), _stub(tmp_path, "beta")]
    died = []
    try:
        w = ModelWatch(FakeBackend(), ("alpha", "beta"), threading.Lock(), on_dead=lambda m, r: died.append(r),
                       interval=0.02, rescan=0.5)
        w.server = os.getpid()  # our children stand in for tritonserver's
        w.start()
        assert _until(lambda: all(w.processes.get(m) for m in ("alpha", "beta")))
        assert [p.pid for p in w.processes["alpha"]] == [stubs[0].pid]
        assert model_processes(os.getpid(), "beta") == w.processes["beta"]
        time.sleep(0.6)  # the processes have not changed for longer than `rescan`
        before = len(scans)
        time.sleep(1.0)  # about 50 looks
        assert len(scans) - before <= 3  # one scan a `rescan`, for both models together
        stubs[1].kill()
        stubs[1].wait()
        killed = time.monotonic()
        assert _until(lambda: died)
        assert time.monotonic() - killed < 0.5  # found by its known pid, not by waiting for a scan
        assert died == [f"the beta model's backend stub (pid {stubs[1].pid}) died"]
        assert w.pb_utils.calls[:2] == ["unload beta", "load beta"]
        w.stop()
        w.thread.join(5)
    finally:
        for stub in stubs:
            stub.kill()
            stub.wait()
