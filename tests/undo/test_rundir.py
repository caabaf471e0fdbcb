"""Run directory: atomic files, torn-tail tolerance, markers, and the flags guard."""

import json
import os

import pytest

from undo_jax.undo.rundir import (
    RunDir,
    RunDirError,
    append_jsonl_durable,
    atomic_write_jsonl,
    read_jsonl,
)


def test_atomic_jsonl_round_trip_leaves_no_temp_files(tmp_path):
    rows = [{"id": "a", "x": 1}, {"id": "b", "text": "ünïcode"}]
    atomic_write_jsonl(tmp_path / "d.jsonl", rows)
    assert read_jsonl(tmp_path / "d.jsonl") == rows
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl"]


def test_torn_tail_is_tolerated_only_when_asked(tmp_path):
    path = tmp_path / "p.jsonl"
    append_jsonl_durable(path, [{"id": "a"}])
    with open(path, "a") as f:
        f.write('{"id": "b", "cut')
    assert read_jsonl(path, tolerate_torn_tail=True) == [{"id": "a"}]
    with pytest.raises(RunDirError, match=r"p.jsonl:2"):
        read_jsonl(path)


def test_markers_hold_their_info(tmp_path):
    rd = RunDir(tmp_path / "run")
    assert not rd.is_done(1, "train")
    rd.mark_done(1, "train", {"seconds": 1.5})
    assert rd.is_done(1, "train")
    assert rd.marker_info(1, "train")["seconds"] == 1.5
    assert rd.iterations() == [1]


def test_prepare_refuses_other_flags_unless_allowed(tmp_path):
    rd = RunDir(tmp_path / "run")
    assert rd.prepare(["--lr=0.1"], {"lr": 0.1}, allow_change=False) is False
    assert rd.prepare(["--lr=0.1"], {"lr": 0.1}, allow_change=False) is True
    rd.mark_done(1, "data")  # a finished stage: from here on the identity flags must match
    with pytest.raises(RunDirError, match=r"--lr=0.1.*--lr=0.2.*--allow_flag_change") as e:
        rd.prepare(["--lr=0.2"], {"lr": 0.2}, allow_change=False)
    assert "\n" not in str(e.value)
    rd.prepare(["--lr=0.2"], {"lr": 0.2}, allow_change=True)
    assert json.loads((rd.root / "identity.json").read_text()) == {"lr": 0.2}
    assert rd.flags_path.read_text() == "--lr=0.2\n"
    assert len(list(rd.root.glob("flags.*.txt"))) == 1  # the earlier flags are kept


def test_a_run_dir_without_a_finished_stage_takes_other_flags(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.prepare(["--data_source=/nonexistent"], {"data_source": "/nonexistent"}, allow_change=False)
    assert rd.prepare(["--data_source=demo"], {"data_source": "demo"}, allow_change=False) is True
    assert json.loads((rd.root / "identity.json").read_text()) == {"data_source": "demo"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_parent_is_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(RunDirError, match="not writable"):
            RunDir(locked / "run").prepare([], {}, allow_change=False)
    finally:
        locked.chmod(0o700)


def test_run_dir_under_a_file_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(RunDirError, match="not writable") as e:
        RunDir(blocker / "run").prepare([], {}, allow_change=False)
    assert "\n" not in str(e.value)
    assert blocker.read_text() == "not a folder"
