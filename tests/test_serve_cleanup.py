"""What a dead server leaves behind (orphaned model processes, shared-memory regions, its state file)
is removed by the next `serve` or by `stop`; without starting tritonserver (test_serving_faults.py does
it with a real one)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from click.testing import CliRunner

from dspark_trt.builder.cli import main as build
from dspark_trt.builder.serve import SHM_DIR, _group_alive, clean_stale


def _dead_server_with_an_orphan(prefix: str) -> int:
    """A process group whose leader exited, leaving a member whose command line names `prefix` (like a
    model stub orphaned by a killed tritonserver); returns the group id."""
    leader = subprocess.Popen(["bash", "-c", f"(exec -a {prefix}stub sleep 120) & exit 0"], start_new_session=True)
    leader.wait(10)
    for _ in range(50):
        if _group_alive(leader.pid):
            break
        time.sleep(0.1)
    assert _group_alive(leader.pid)
    return leader.pid


def test_the_next_start_or_stop_removes_what_a_dead_server_left(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DSPARK_STATE_DIR", str(tmp_path / "state"))
    for cleaner in ("start", "stop"):
        prefix = f"dspark_test{os.getpid()}{cleaner}_"
        pgid = _dead_server_with_an_orphan(prefix)
        region = SHM_DIR / f"{prefix}0123"
        region.write_bytes(b"x" * 4096)
        state = tmp_path / "state" / "tritonserver-18999.json"
        state.parent.mkdir(exist_ok=True)
        state.write_text(json.dumps({"pid": pgid, "shm_prefix": prefix, "http_port": 18999}))
        if cleaner == "start":
            assert clean_stale() == [pgid]  # what start_server runs first
        else:
            result = CliRunner().invoke(build, ["stop", "--http-port", "18999"])
            assert f"tritonserver (pid {pgid}) was not running; removed what it left behind" in result.output
        assert not _group_alive(pgid) and not region.exists() and not state.exists()


def test_a_live_server_and_unrelated_processes_are_left_alone(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DSPARK_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "state").mkdir()
    alive = subprocess.Popen(["sleep", "60"], start_new_session=True)
    reused = _dead_server_with_an_orphan("unrelated_")  # a dead server's pid now leading someone else's group
    try:
        (tmp_path / "state" / "tritonserver-1.json").write_text(json.dumps({"pid": alive.pid, "shm_prefix": "p1_"}))
        (tmp_path / "state" / "tritonserver-2.json").write_text(json.dumps({"pid": reused, "shm_prefix": "p2_"}))
        assert clean_stale() == [reused]
        assert alive.poll() is None and _group_alive(reused)  # neither was ours to kill
        assert (tmp_path / "state" / "tritonserver-1.json").exists()
    finally:
        alive.kill()
        os.killpg(reused, 9)
