import pytest
import torch

from trainlab.engine.checkpoint import Checkpoint, latest_checkpoint, list_checkpoints, save_checkpoint
from trainlab.engine.errors import CheckpointError


def save(root, step, keep=3, value=1.0):
    return save_checkpoint(root, step, {"w.pt": {"w": torch.full((3,), value)}}, {"config.json": '{"a": 1}'},
                           task="toy", keep=keep)


def test_round_trip_and_keep_newest(tmp_path):
    for s in (1, 2, 3, 4):
        save(tmp_path, s, keep=2, value=float(s))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000003", "step_0000004"]
    ck = latest_checkpoint(tmp_path, "toy")
    assert ck.step == 4 and torch.equal(ck.tensors("w.pt")["w"], torch.full((3,), 4.0))
    assert ck.json("config.json") == {"a": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_truncated_file_is_detected_and_the_previous_checkpoint_used(tmp_path):
    save(tmp_path, 1, value=1.0)
    p = save(tmp_path, 2, value=2.0)
    data = (p / "w.pt").read_bytes()
    (p / "w.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="checksum"):
        Checkpoint(p, "toy").tensors("w.pt")
    ck = latest_checkpoint(tmp_path, "toy")
    assert ck.step == 1


def test_a_folder_without_meta_is_not_a_checkpoint(tmp_path):
    save(tmp_path, 1)
    half = tmp_path / "step_0000002"
    half.mkdir()
    (half / "w.pt").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path, "toy").step == 1


def test_wrong_task_is_refused(tmp_path):
    p = save(tmp_path, 1)
    with pytest.raises(CheckpointError, match="task"):
        Checkpoint(p, "chat")


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    from trainlab.engine.faults import damage_checkpoint

    p = save(tmp_path, 1)
    target = tmp_path / "pwned"
    # a real torch archive carrying a code-running pickle, its checksum forged too:
    # only weights_only stands between this file and os.makedirs
    damage_checkpoint(p, "malicious pickle", target, file="w.pt")
    with pytest.raises(CheckpointError, match="refused"):
        Checkpoint(p, "toy").tensors("w.pt")
    assert not target.exists()


def test_resume_checkpoint_skips_what_does_not_load_and_names_it(tmp_path):
    from trainlab.engine.checkpoint import move_aside, resume_checkpoint

    save(tmp_path, 1, value=1.0)
    save(tmp_path, 2, value=2.0)
    p3 = save(tmp_path, 3, value=3.0)
    (p3 / "w.pt").write_bytes(b"torn")
    ck, damaged = resume_checkpoint(tmp_path, "toy")
    assert ck.step == 2 and torch.equal(ck.tensors("w.pt")["w"], torch.full((3,), 2.0))
    assert [(p.name, "checksum" in why) for p, why in damaged] == [("step_0000003", True)]
    aside = move_aside(p3)
    assert aside.name.startswith("damaged-step_0000003") and (aside / "w.pt").read_bytes() == b"torn"
    save(tmp_path, 3, value=3.0, keep=1)  # a resumed run saving step 3 again, keeping one
    assert (aside / "w.pt").read_bytes() == b"torn"  # neither overwritten nor pruned
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000003"]


def test_a_save_cleans_up_what_a_killed_save_left(tmp_path):
    save(tmp_path, 1)
    (tmp_path / ".tmp-step_0000002-999").mkdir()
    (tmp_path / ".tmp-step_0000002-999" / "w.pt").write_bytes(b"half")
    (tmp_path / ".del-step_0000000-999").mkdir()
    assert latest_checkpoint(tmp_path, "toy").step == 1  # leftovers are never mistaken for checkpoints
    save(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000001", "step_0000002"]
