"""Checkpoints written whole, with a manifest; resumes that refuse a bad or hostile checkpoint
before loading anything; a full disk or an interrupt mid-save that leaves the last one intact.

The checkpoints here are real ones (torch.distributed.checkpoint's own files) of a tiny model
and its AdamW state, saved through :class:`Checkpointer` as a recipe saves them.
"""

import io
import os
import pathlib
import pickle
import signal
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from attune.checkpoint.manifest import write_manifest
from attune.checkpoint.sharded import UntrustedCheckpoint, read_metadata
from attune.errors import CheckpointError
from attune.training import Checkpointer, StopSignals
from attune.training.checkpointer import MANIFEST_FILE, SHARDED_DIR, STATE_DIR


class Touch:
    """Unpickling it creates a file: what a hostile checkpoint would do instead."""

    def __init__(self, path):
        self.path = pathlib.Path(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


class InterruptWhenSaved:
    """Saving it raises ``KeyboardInterrupt``: a Ctrl-C in the middle of DCP's writes."""

    def __reduce__(self):
        raise KeyboardInterrupt


def trained(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def save(checkpointer, step, model, optimizer, write_weights=None, sharded=None):
    def weights(folder):
        save_file(dict(model.state_dict()), folder / "model.safetensors")

    sharded = sharded or {"optimizer": get_optimizer_state_dict(model, optimizer)}
    return checkpointer.save(step, write_weights or weights, {"step": step}, sharded=sharded)


@pytest.fixture
def saved(tmp_path):
    """A run folder with checkpoints step_1 and step_2; returns (checkpointer, model, opt)."""
    checkpointer = Checkpointer(tmp_path)
    model, optimizer = trained()
    save(checkpointer, 1, model, optimizer)
    save(checkpointer, 2, model, optimizer)
    return checkpointer, model, optimizer


def fresh_template(model):
    """The sharded state as a resumed run lays it out (its optimizer has no state yet)."""
    model.zero_grad(set_to_none=True)  # as a resumed run's model has no gradients yet
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return {"optimizer": get_optimizer_state_dict(model, optimizer)}


def test_a_checkpoint_gets_a_manifest_and_loads_back(saved):
    checkpointer, model, optimizer = saved
    folder = checkpointer.latest()
    manifest = (folder / STATE_DIR / MANIFEST_FILE).read_text()
    for name in ("model.safetensors", "state.pt", ".metadata", "__0_0.distcp"):
        assert name in manifest
    checkpointer.verify(folder)
    state = checkpointer.load_sharded(folder, fresh_template(model))
    expected = get_optimizer_state_dict(model, optimizer)["state"]["weight"]["exp_avg"]
    assert torch.equal(state["optimizer"]["state"]["weight"]["exp_avg"], expected)
    assert not [p for p in checkpointer.directory.iterdir() if p.name.startswith(".")]


def truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("file", "change", "says"),
    [
        (f"{STATE_DIR}/{SHARDED_DIR}/__0_0.distcp", truncate, "is truncated"),
        ("model.safetensors", flip_a_byte, "does not match its checksum"),
        (f"{STATE_DIR}/state.pt", pathlib.Path.unlink, "is missing"),
    ],
)
def test_the_manifest_catches_a_changed_file_and_names_the_other_checkpoint(
    saved, file, change, says
):
    checkpointer, _, _ = saved
    folder = checkpointer.latest()
    change(folder / file)
    if file.endswith("state.pt"):  # then it is no longer listed as complete
        folder = checkpointer.directory / "step_2"
    with pytest.raises(CheckpointError) as error:
        checkpointer.check_resumable(folder)
    message = str(error.value)
    assert "\n" not in message
    assert f"cannot resume from {folder}: {file} " in message and says in message
    assert f"resume_from_checkpoint={checkpointer.directory / 'step_1'}" in message


def test_a_checkpoint_without_a_manifest_still_loads(saved):
    checkpointer, model, _ = saved
    folder = checkpointer.latest()
    (folder / STATE_DIR / MANIFEST_FILE).unlink()
    checkpointer.check_resumable(folder)
    checkpointer.load_sharded(folder, fresh_template(model))
    # the metadata's own record of offsets still catches a truncated shard
    truncate(folder / STATE_DIR / SHARDED_DIR / "__0_0.distcp")
    with pytest.raises(CheckpointError, match=r"__0_0.distcp is truncated .*step_1 instead"):
        checkpointer.check_resumable(folder)


def test_a_crafted_metadata_file_is_refused_without_running_it(saved, tmp_path):
    checkpointer, model, _ = saved
    folder = checkpointer.latest()
    metadata = folder / STATE_DIR / SHARDED_DIR / ".metadata"
    marker = tmp_path / "ran"
    metadata.write_bytes(pickle.dumps(Touch(marker)))
    write_manifest(folder, folder / STATE_DIR / MANIFEST_FILE)  # as a forger would
    with pytest.raises(CheckpointError, match=r"not trusted: it asks to run pathlib.Path.touch"):
        checkpointer.check_resumable(folder)
    with pytest.raises(CheckpointError, match="not trusted"):
        checkpointer.load_sharded(folder, fresh_template(model))
    assert not marker.exists()
    # what DCP's own reader does with it (plain pickle): the file appears
    with open(metadata, "rb") as handle:
        pickle.load(handle)
    assert marker.exists()


def test_a_crafted_training_state_is_refused_without_running_it(saved, tmp_path):
    checkpointer, _, _ = saved
    folder = checkpointer.latest()
    marker = tmp_path / "ran"
    torch.save({"step": 2, "rng": Touch(marker)}, folder / STATE_DIR / "state.pt")
    write_manifest(folder, folder / STATE_DIR / MANIFEST_FILE)
    with pytest.raises(CheckpointError, match=r"state.pt is not a valid .* not trusted"):
        checkpointer.check_resumable(folder)
    assert not marker.exists()
    (folder / STATE_DIR / "state.pt").write_bytes(b"\x80\x02garbage" * 100)
    write_manifest(folder, folder / STATE_DIR / MANIFEST_FILE)
    with pytest.raises(CheckpointError, match=r"state.pt is corrupt or truncated"):
        checkpointer.check_resumable(folder)


def test_metadata_pointing_outside_its_folder_or_garbage_is_refused(saved):
    checkpointer, _, _ = saved
    folder = checkpointer.latest()
    path = folder / STATE_DIR / SHARDED_DIR / ".metadata"
    metadata = read_metadata(path)
    for info in metadata.storage_data.values():
        info.relative_path = "../../../model.safetensors"
    path.write_bytes(pickle.dumps(metadata))
    (folder / STATE_DIR / MANIFEST_FILE).unlink()
    with pytest.raises(UntrustedCheckpoint, match="outside its own folder"):
        checkpointer.verify(folder)
    path.write_bytes(os.urandom(300))
    with pytest.raises(CheckpointError, match=r"sharded/.metadata is corrupt"):
        checkpointer.verify(folder)


def test_a_crafted_value_in_the_sharded_state_is_not_unpickled(tmp_path):
    model, optimizer = trained()
    marker = tmp_path / "ran"
    state = get_optimizer_state_dict(model, optimizer)
    state["param_groups"][0]["lr"] = Touch(marker)
    checkpointer = Checkpointer(tmp_path / "run")
    folder = save(checkpointer, 1, model, optimizer, sharded={"optimizer": state})
    with pytest.raises(
        CheckpointError,
        match=r"cannot resume from .*: its value optimizer.param_groups.0.lr is not a valid .* not trusted: it asks to run ",
    ):
        checkpointer.load_sharded(folder, fresh_template(model))
    assert not marker.exists()
    # DCP's default planner unpickles it with weights_only=False: the file appears
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(fresh_template(model), checkpoint_id=str(folder / STATE_DIR / SHARDED_DIR))
    assert marker.exists()


def test_a_full_disk_mid_save_keeps_the_last_checkpoint(saved):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    checkpointer, model, optimizer = saved

    def weights_on_a_full_disk(folder):
        (folder / "config.json").symlink_to("/dev/full")  # a real ENOSPC from the kernel
        with open(folder / "config.json", "w") as handle:
            handle.write("{}" * 10_000)

    with pytest.raises(CheckpointError) as error:
        save(checkpointer, 3, model, optimizer, write_weights=weights_on_a_full_disk)
    message = str(error.value)
    assert "the disk is full (No space left on device)" in message
    assert f"the latest complete checkpoint is still {checkpointer.directory / 'step_2'}" in message
    assert sorted(p.name for p in checkpointer.directory.iterdir()) == ["step_1", "step_2"]
    checkpointer.verify(checkpointer.latest())


class InterruptedFile(io.FileIO):
    """A file whose third write is interrupted by a Ctrl-C."""

    def write(self, data):
        self.writes = getattr(self, "writes", 0) + 1
        if self.writes == 3:
            raise KeyboardInterrupt
        return super().write(data)


def test_an_interrupt_mid_save_comes_out_as_itself_and_removes_the_partial_folder(saved):
    checkpointer, model, optimizer = saved
    # torch.distributed.checkpoint wraps it in its own exception
    with pytest.raises(KeyboardInterrupt):
        save(checkpointer, 3, model, optimizer, sharded={"x": InterruptWhenSaved()})

    # torch.save turns it into "unexpected pos ..." when it comes in the middle of a write
    def interrupted_weights(folder):
        with InterruptedFile(folder / "weights.pt", "wb") as handle:
            torch.save(dict(model.state_dict()), handle)

    with pytest.raises(KeyboardInterrupt):
        save(checkpointer, 3, model, optimizer, write_weights=interrupted_weights)
    assert sorted(p.name for p in checkpointer.directory.iterdir()) == ["step_1", "step_2"]


def test_a_second_ctrl_c_stops_at_once_naming_the_latest_checkpoint():
    before = signal.getsignal(signal.SIGINT)
    with StopSignals(latest=lambda: "out/checkpoints/step_3") as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.requested == signal.SIGINT
        with pytest.raises(KeyboardInterrupt) as interrupt:
            signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)  # a third is ignored while the run cleans up
    assert "stopped at once" in str(interrupt.value)
    assert "the latest complete checkpoint is out/checkpoints/step_3" in str(interrupt.value)
    assert signal.getsignal(signal.SIGINT) is before
