"""No command destroys or writes into its inputs: an output that is, contains or lies inside an input
(symlinks resolved) is refused before anything is touched, with or without --force (exit code 1)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from dspark_trt.builder.cli import main
from dspark_trt.runtime.atomic import OutputExistsError, UnsafeOutputError, check_output


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (and the set of directories and links): any change shows."""
    found: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = "link -> " + os.readlink(path)
        elif path.is_dir():
            found[key] = "dir"
        else:
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def build(*args: object) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_refused(result, output: str, input_name: str) -> None:
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "refused, nothing was written" in text and output in text and input_name in text, text
    assert "Traceback" not in result.output


# -- the helper ----------------------------------------------------------------------------------------------


def test_check_output_relations_and_symlinks(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(src)
    for out, relation in ((src, "is"), (tmp_path, "contains"), (src / "sub" / "new", "lies inside"),
                          (tmp_path / "link", "is"), (tmp_path / "link" / "new", "lies inside")):
        for force in (False, True):
            with pytest.raises(UnsafeOutputError, match=f"{relation} the input"):
                check_output(out, inputs=[src], force=force)
    # The input itself given through a link is resolved too.
    with pytest.raises(UnsafeOutputError, match="is the input"):
        check_output(src, inputs=[tmp_path / "link"], force=True)
    assert check_output(tmp_path / "elsewhere", inputs=[src]) == tmp_path / "elsewhere"
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(OutputExistsError):
        check_output(tmp_path / "elsewhere", inputs=[src])


def test_check_output_refuses_places_that_cannot_hold_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("x")
    for out, words in ((Path("/proc/dspark-out"), "/proc, a kernel pseudo-filesystem"),
                       (Path("/sys/dspark-out"), "/sys, a kernel pseudo-filesystem"),
                       (tmp_path / "file" / "out", "is a file, not a directory")):
        with pytest.raises(UnsafeOutputError, match=words):
            check_output(out, force=True)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (Path("."), Path(".."), work):
        with pytest.raises(UnsafeOutputError, match="the current directory"):
            check_output(out, force=True)
    check_output(Path("build/out"))  # inside the current directory is fine


def test_a_file_output_may_replace_only_its_own_kind_inside_an_input(tmp_path: Path) -> None:
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "manifest.json").write_text("{}")
    (engine / "sps_table.json").write_text("mine")
    mine = lambda f: f.read_text() == "mine"  # noqa: E731
    assert check_output(engine / "new.json", inputs=[engine], replaceable=mine)
    assert check_output(engine / "sps_table.json", inputs=[engine], force=True, replaceable=mine)
    with pytest.raises(UnsafeOutputError, match="would replace a file of the input"):
        check_output(engine / "manifest.json", inputs=[engine], force=True, replaceable=mine)
    with pytest.raises(UnsafeOutputError, match="is the input"):
        check_output(engine, inputs=[engine], force=True, replaceable=mine)


# -- every command ---------------------------------------------------------------------------------------------


def test_convert_never_touches_its_inputs(qwen3_copy: Path, tmp_path: Path) -> None:
    target, drafter = qwen3_copy / "target", qwen3_copy / "drafter"
    (tmp_path / "link_pair").symlink_to(qwen3_copy)
    (tmp_path / "link_target").symlink_to(target)
    before = digest(qwen3_copy)
    cases = [(qwen3_copy, "contains"), (target, "is"), (drafter, "is"), (drafter / "new", "lies inside"),
             (tmp_path / "link_pair", "contains"), (tmp_path / "link_target", "is"),
             (tmp_path / "link_pair" / "target", "is")]
    for out, relation in cases:
        for force in ([], ["--force"]):
            result = build("convert", "--target", target, "--drafter", drafter, "--tp", 2, "-o", out, *force)
            assert_refused(result, str(out), f"{relation} the input")
    # The inputs given through links: the output is the real directory.
    result = build("convert", "--target", tmp_path / "link_target", "--drafter", drafter, "-o", target, "--force")
    assert_refused(result, str(target), "is the input")
    assert digest(qwen3_copy) == before
    assert not list(qwen3_copy.rglob(".*partial*")) and not (drafter / "new").exists()


def test_convert_v4_never_touches_its_input(v4_copy: Path) -> None:
    before = digest(v4_copy)
    for out in (v4_copy / "target", v4_copy):
        assert_refused(build("convert", "--target", v4_copy / "target", "--tp", 2, "-o", out, "--force"), str(out),
                       "the input")
    assert digest(v4_copy) == before


@pytest.fixture
def ckpt_copy(qwen3_ckpt: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(qwen3_ckpt, dst)
    return dst


def test_engine_export_and_plugins_never_touch_the_checkpoint(ckpt_copy: Path, tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(ckpt_copy)
    before = digest(ckpt_copy)
    commands = {"engine": ["engine", ckpt_copy], "export": ["export", ckpt_copy],
                "plugins": ["plugins", "--arch", "sm_90", "--ckpt", ckpt_copy]}
    for name, command in commands.items():
        for out, relation in ((ckpt_copy, "is"), (tmp_path, "contains"), (ckpt_copy / "sub", "lies inside"),
                              (tmp_path / "link", "is")):
            assert_refused(build(*command, "-o", out, "--force"), str(out), f"{relation} the input"), name
    assert digest(ckpt_copy) == before


def test_repo_never_touches_the_engine_or_cost_table(ckpt_copy: Path, tmp_path: Path) -> None:
    engine = tmp_path / "engine"
    assert build("engine", ckpt_copy, "-o", engine).exit_code == 0
    table = tmp_path / "tables" / "sps.json"
    table.parent.mkdir()
    table.write_text("{}")
    before = digest(tmp_path)
    for out, relation in ((engine, "is"), (engine / "repo", "lies inside"), (engine / "checkpoint", "lies inside"),
                          (table.parent, "contains"), (tmp_path, "contains")):
        result = build("repo", engine, "--sps-table", table, "-o", out, "--force")
        assert_refused(result, str(out), f"{relation} the input")
    assert digest(tmp_path) == before


def test_profile_and_calibrate_never_replace_a_file_of_the_engine(ckpt_copy: Path) -> None:
    before = digest(ckpt_copy)
    manifest = ckpt_copy / "manifest.json"
    assert_refused(build("profile", ckpt_copy, "-o", manifest, "--force"), str(manifest),
                   "would replace a file of the input")
    weights = ckpt_copy / "draft" / "rank0.safetensors"
    assert_refused(build("calibrate", ckpt_copy, "-o", weights), str(weights), "would replace a file of the input")
    assert digest(ckpt_copy) == before


def test_fixture_and_train_never_touch_their_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dspark_trt.builder.corpus
    import dspark_trt.builder.train

    corpus = tmp_path / "lib" / "python3"
    corpus.mkdir(parents=True)
    (corpus / "os.py").write_text("import sys\n")
    monkeypatch.setattr(dspark_trt.builder.corpus, "stdlib_root", lambda: corpus)
    monkeypatch.setattr(dspark_trt.builder.train, "stdlib_root", lambda: corpus)
    before = digest(tmp_path)
    for out in (corpus, tmp_path / "lib"):
        assert_refused(build("fixture", "qwen3", out, "--force"), str(out), "the input")
        assert_refused(build("train", out, "--force", "--target-steps", 1, "--drafter-steps", 1), str(out),
                       "the input")
    result = build("train", tmp_path / "run", "--ablation", tmp_path / "run" / "target", "--target-steps", 1)
    assert_refused(result, str(tmp_path / "run" / "target"), "lies inside the input")
    assert digest(tmp_path) == before


def test_fixture_refuses_to_replace_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    monkeypatch.chdir(work)
    for out in (".", ".."):
        result = build("fixture", "qwen3", out, "--force")
        assert result.exit_code == 1 and "the current directory" in result.output, result.output
    assert (work / "notes.txt").read_text() == "keep me"


def test_unwritable_output_locations_are_one_line_errors(qwen3_pair: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for out, words in (("/proc/dspark", "kernel pseudo-filesystem"), ("/sys/dspark", "kernel pseudo-filesystem"),
                       (tmp_path / "file" / "out", "is a file, not a directory")):
        result = build("convert", "--target", qwen3_pair / "target", "--drafter", qwen3_pair / "drafter", "-o", out)
        assert result.exit_code == 1 and words in result.output and "Traceback" not in result.output, result.output
