"""The CLIs teach through --help and answer with meaningful exit codes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dspark_trt.builder.cli import main as build
from dspark_trt.client.cli import main as client


@pytest.mark.parametrize("verb, words", [
    (None, ["fixture", "inspect", "convert", "Exit codes"]),
    ("fixture", ["qwen3", "deepseek-v4", "--seed", "nothing is downloaded"]),
    ("inspect", ["drafter", "--json", "exit code 1"]),
    ("convert", ["--tp", "--draft-tp", "--dequantize", "rank{N}.safetensors", "manifest.json", "--force"]),
])
def test_build_help_explains_each_verb(verb: str | None, words: list[str]) -> None:
    result = CliRunner().invoke(build, ([verb] if verb else []) + ["--help"])
    assert result.exit_code == 0
    for word in words:
        assert word in result.output, f"{word!r} missing from `dspark-build {verb or ''} --help`"


def test_build_help_lists_every_exit_code() -> None:
    """`dspark-build --help` names each exit code the commands use (0-5), one line each."""
    import re

    from dspark_trt.builder import cli_common as cli

    text = CliRunner().invoke(build, ["--help"]).output
    listed = {int(code) for code in re.findall(r"^\s+(\d)\s+\w", text.split("Exit codes:")[1], re.MULTILINE)}
    used = {0, 2, cli.EXIT_INVALID_INPUT, cli.EXIT_OUTPUT_EXISTS, cli.EXIT_SERVER, cli.EXIT_MISSING_DEPENDENCY}
    assert listed == used == {0, 1, 2, 3, 4, 5}


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert CliRunner().invoke(build, ["convert", "--target", str(tmp_path)]).exit_code == 2  # no -o
    assert CliRunner().invoke(build, ["fixture", "llama", str(tmp_path)]).exit_code == 2
    assert CliRunner().invoke(build, ["convert", "--target", str(tmp_path), "-o", "x", "--tp", "0"]).exit_code == 2


def test_missing_checkpoint_is_exit_1(tmp_path: Path) -> None:
    result = CliRunner().invoke(build, ["inspect", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "config.json not found" in result.output


def test_console_scripts_are_installed() -> None:
    for script in ("dspark-build", "dspark-client"):
        path = shutil.which(script) or str(Path(sys.executable).parent / script)
        result = subprocess.run([path, "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "Usage:" in result.stdout


def test_client_reports_an_unreachable_server() -> None:
    result = CliRunner().invoke(client, ["health", "--url", "127.0.0.1:9", "--timeout", "1"])
    assert result.exit_code == 4
    assert "no Triton server reachable at 127.0.0.1:9" in result.output


def test_serve_refuses_a_port_that_is_taken(tmp_path: Path) -> None:
    """Another server on the port would answer the readiness check in place of ours."""
    import socket

    from dspark_trt.runtime.tp import free_port

    (tmp_path / "ensemble").mkdir()
    (tmp_path / "ensemble" / "config.pbtxt").write_text('name: "ensemble"\n')
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        free = [str(free_port()) for _ in range(2)]  # only the grpc port is taken
        result = CliRunner().invoke(build, ["serve", str(tmp_path), "--grpc-port", str(port), "--http-port", free[0],
                                            "--metrics-port", free[1], "--pid-file", str(tmp_path / "pid")])
    assert result.exit_code == 5
    assert f"grpc port {port} on 127.0.0.1 is in use" in result.output
    assert not (tmp_path / "pid").exists()


def test_client_refuses_a_seed_outside_int64_before_sending() -> None:
    result = CliRunner().invoke(client, ["generate", "x", "--url", "127.0.0.1:9", "--seed", str(2**63)])
    assert result.exit_code == 2 and "Invalid value for '--seed'" in result.output


def test_train_passes_every_knob(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dspark-build train` carries every knob the old argparse CLI had through to train_pair."""
    import dspark_trt.builder.train
    from dspark_trt.builder.train_drafter import DrafterRecipe

    calls: list[dict] = []
    monkeypatch.setattr(dspark_trt.builder.train, "train_pair", lambda out, **kw: calls.append({"out": out, **kw}))
    result = CliRunner().invoke(build, [
        "train", str(tmp_path / "run"), "--seed", "3", "--target-steps", "7", "--drafter-steps", "5,4",
        "--ablation", str(tmp_path / "abl"), "--draft-layers", "3", "--markov-rank", "8", "--random-init",
        "--distill-rows", "11", "--target-threads", "4", "--drafter-threads", "2", "--resume", "--force", "--quiet"])
    assert result.exit_code == 0, result.output
    (call,) = calls
    assert call["drafter_recipe"] == DrafterRecipe(layers=3, markov_rank=8, distill_rows=11, init_from_target=False)
    assert {k: call[k] for k in ("seed", "steps_target", "steps_drafter", "target_threads", "drafter_threads",
                                 "resume", "force", "quiet")} == {
        "seed": 3, "steps_target": 7, "steps_drafter": [5, 4], "target_threads": 4, "drafter_threads": 2,
        "resume": True, "force": True, "quiet": True}
    assert call["ablation"] == tmp_path / "abl"
    calls.clear()
    assert CliRunner().invoke(build, ["train", str(tmp_path / "run")]).exit_code == 0
    assert calls[0]["drafter_recipe"] == DrafterRecipe() and not calls[0]["quiet"]


def test_command_modules_do_not_import_each_other(tmp_path: Path) -> None:
    """cli_engine's commands report errors through cli_common alone: running one never imports cli.py."""
    code = ("import sys; from click.testing import CliRunner; from dspark_trt.builder.cli_engine import engine; "
            f"r = CliRunner().invoke(engine, [{str(tmp_path)!r}, '-o', {str(tmp_path / 'out')!r}]); "
            "print(r.exit_code, 'dspark_trt.builder.cli' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["1", "False"], result.stdout + result.stderr
