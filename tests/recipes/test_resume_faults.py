"""Resuming, and faults mid-run, through the real ``tune run``: a hostile or damaged checkpoint,
one of another model or LoRA rank, a full disk while saving, a second Ctrl-C, a diverging run.
Each ends in one ``error:`` line naming the checkpoint, and leaves the last good one intact.

The runs resumed here are copies of one run trained once for the module (checkpoints at steps
2 and 4), damaged in one way each.
"""

import json
import os
import pathlib
import pickle
import resource
import shutil
import signal
import subprocess
import time

import pytest

from attune.checkpoint.manifest import write_manifest
from attune.training import Checkpointer
from attune.training.checkpointer import MANIFEST_FILE, SHARDED_DIR, STATE_DIR
from tests.conftest import tune_command
from tests.recipes.conftest import run_tune_in_process, the_error, train, write_config

RECIPES = {"full": "full_finetune_single_device", "lora": "lora_finetune_single_device"}
BASES = {"full": "tiny/full", "lora": "tiny/lora"}
OVERRIDES = {"max_steps": 4, "checkpointer.save_every_n_steps": 2, "checkpointer.keep_last_n": None}
SHARDED = f"{STATE_DIR}/{SHARDED_DIR}"


class Touch:
    """Unpickling it creates a file: what a hostile checkpoint would do instead."""

    def __init__(self, path):
        self.path = pathlib.Path(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def trained_run(kind, checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"trained_{kind}")
    train(RECIPES[kind], write_config(folder, checkpoint, BASES[kind], **OVERRIDES))
    return folder / "run"


@pytest.fixture(scope="module")
def full_run(checkpoint, tmp_path_factory):
    """A full fine-tuning run of 4 steps, checkpointed at steps 2 and 4."""
    return trained_run("full", checkpoint, tmp_path_factory)


@pytest.fixture(scope="module")
def lora_run(checkpoint, tmp_path_factory):
    """A LoRA run (rank 64) of 4 steps, checkpointed at steps 2 and 4."""
    return trained_run("lora", checkpoint, tmp_path_factory)


def copy_of(run, tmp_path, checkpoint, kind="full", **overrides):
    """A copy of a trained run in ``tmp_path/run``, and its config."""
    shutil.copytree(run, tmp_path / "run")
    return write_config(tmp_path, checkpoint, BASES[kind], **{**OVERRIDES, **overrides})


def resume(config, *overrides, kind="full"):
    args = ("run", RECIPES[kind], "--config", str(config), "resume_from_checkpoint=true")
    return run_tune_in_process(*args, *overrides)


def test_a_crafted_metadata_file_runs_nothing(full_run, tmp_path, checkpoint):
    config = copy_of(full_run, tmp_path, checkpoint)
    folder = tmp_path / "run" / "checkpoints" / "step_4"
    marker = tmp_path / "ran"
    (folder / SHARDED / ".metadata").write_bytes(pickle.dumps(Touch(marker)))
    write_manifest(folder, folder / STATE_DIR / MANIFEST_FILE)  # as a forger would
    line = the_error(resume(config))
    assert not marker.exists()
    assert f"cannot resume from {folder}: {SHARDED}/.metadata is not a valid attune" in line
    assert "not trusted" in line and "pathlib.Path.touch" in line


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def garbage(path):
    path.write_bytes(b"\x80\x02garbage" * (path.stat().st_size // 9))


@pytest.mark.parametrize(
    ("file", "damage", "manifest", "says"),
    [
        (f"{SHARDED}/__0_0.distcp", truncate, True, "the file is truncated"),
        ("model.safetensors", flip_a_byte, True, "does not match its checksum"),
        # checkpoints written before manifests existed: the loaders' own checks, one line each
        (f"{STATE_DIR}/state.pt", garbage, False, "is corrupt or truncated"),
        (f"{SHARDED}/.metadata", garbage, False, "is corrupt"),
        (f"{SHARDED}/__0_0.distcp", truncate, False, "is truncated"),
    ],
)
def test_a_damaged_checkpoint_is_one_line_naming_the_one_to_resume_instead(
    full_run, tmp_path, checkpoint, file, damage, manifest, says
):
    config = copy_of(full_run, tmp_path, checkpoint)
    checkpoints = tmp_path / "run" / "checkpoints"
    if not manifest:
        for step in (2, 4):
            (checkpoints / f"step_{step}" / STATE_DIR / MANIFEST_FILE).unlink()
    damage(checkpoints / "step_4" / file)
    line = the_error(resume(config))
    assert f"cannot resume from {checkpoints / 'step_4'}: {file} " in line and says in line
    instead = f"resume_from_checkpoint={checkpoints / 'step_2'}"
    assert line.endswith(f"resume from step_2 instead: {instead}")
    if file.endswith("distcp") and manifest:
        # the suggestion works as given
        result = run_tune_in_process("run", RECIPES["full"], "--config", str(config), instead)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"resumed from {checkpoints / 'step_2'} at step 2" in result.stdout


def test_a_checkpoint_from_before_manifests_still_resumes(full_run, tmp_path, checkpoint):
    config = copy_of(full_run, tmp_path, checkpoint, max_steps=5)
    folder = tmp_path / "run" / "checkpoints" / "step_4"
    (folder / STATE_DIR / MANIFEST_FILE).unlink()
    result = resume(config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {folder} at step 4" in result.stdout


def other_model(checkpoint, folder, **changes):
    """A random model like ``checkpoint`` but for ``changes`` to its config."""
    transformers = pytest.importorskip("transformers")
    shutil.copytree(checkpoint, folder)
    settings = json.loads((folder / "config.json").read_text())
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**settings, **changes}))
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"hidden_size": 32, "intermediate_size": 64}, "has shape (570, 64)"),
        ({"num_hidden_layers": 3}, "the weights lack model.layers.2."),
    ],
)
def test_a_checkpoint_of_another_model_shape_is_one_line(
    full_run, tmp_path, checkpoint, changes, says
):
    config = copy_of(full_run, tmp_path, checkpoint)
    model = other_model(checkpoint, tmp_path / "other_model", **changes)
    line = the_error(resume(config, f"model.path={model}"))
    folder = tmp_path / "run" / "checkpoints" / "step_4"
    assert f"cannot resume from {folder}: its weights do not load into this run's model" in line
    assert says in line


def test_a_lora_checkpoint_resumed_with_another_rank_is_one_line(lora_run, tmp_path, checkpoint):
    config = copy_of(lora_run, tmp_path, checkpoint, kind="lora")
    line = the_error(resume(config, "lora.rank=8", kind="lora"))
    folder = tmp_path / "run" / "checkpoints" / "step_4"
    assert f"cannot resume from {folder}: it was trained with lora.rank=64, and this run " in line
    assert "lora_A.weight has shape [64, 64], this run's [8, 64]" in line


def test_a_full_disk_mid_save_is_one_line_and_keeps_the_last_checkpoint(
    full_run, tmp_path, checkpoint
):
    config = copy_of(full_run, tmp_path, checkpoint)
    checkpoints = tmp_path / "run" / "checkpoints"
    shutil.rmtree(checkpoints / "step_4")  # the resumed run saves it again, and runs out
    weights = (checkpoints / "step_2" / "model.safetensors").stat().st_size
    shard = (checkpoints / "step_2" / SHARDED / "__0_0.distcp").stat().st_size
    assert weights < shard

    def small_disk():
        # files may not grow past this: the optimizer's shard is the first that must
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = (weights + shard) // 2
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    env = {k: v for k, v in os.environ.items() if k != "ATTUNE_DEBUG"}
    command = [*tune_command(), "run", RECIPES["full"], "--config", str(config)]
    result = subprocess.run(
        [*command, "resume_from_checkpoint=true"],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=small_disk,
        timeout=240,
    )
    line = the_error(result)
    assert "cannot save checkpoint step_4" in line and "(File too large)" in line
    assert f"the latest complete checkpoint is still {checkpoints / 'step_2'}" in line
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_2"]  # no partial folder
    Checkpointer(tmp_path / "run").check_resumable(checkpoints / "step_2")


def interrupt_twice(folder, checkpoint, cache):
    """A run interrupted by two Ctrl-C 20 ms apart: the first asks for a checkpoint and a clean
    stop, the second comes while that step or checkpoint is still being written."""
    overrides = {
        "checkpointer.save_every_n_steps": 1,
        "checkpointer.keep_last_n": 2,
        "dataset.cache_dir": str(cache),  # the module's, already built
    }
    folder.mkdir()
    config = write_config(folder, checkpoint, "tiny/full", max_steps=400, **overrides)
    env = {k: v for k, v in os.environ.items() if k != "ATTUNE_DEBUG"}
    process = subprocess.Popen(
        [*tune_command(), "run", RECIPES["full"], "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    metrics = folder / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            process.send_signal(signal.SIGINT)
            time.sleep(0.02)
            process.send_signal(signal.SIGINT)
            break
        time.sleep(0.02)
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def test_a_second_ctrl_c_stops_at_once_in_one_line_without_a_torn_checkpoint(
    full_run, tmp_path, checkpoint
):
    # Two signals that reach a process the scheduler left waiting are one signal: then the run
    # stops cleanly after one Ctrl-C (checked too), and the case is tried again.
    cache = tmp_path.parent / "hf_cache"  # built by full_run's training
    for attempt in range(3):
        result = interrupt_twice(tmp_path / f"attempt_{attempt}", checkpoint, cache)
        checkpointer = Checkpointer(tmp_path / f"attempt_{attempt}" / "run")
        latest = checkpointer.latest()
        assert all(p.name.startswith("step_") for p in checkpointer.directory.iterdir())
        checkpointer.check_resumable(latest)  # the latest is whole
        if "interrupted twice" in result.stderr:
            break
        assert result.returncode == 128 + signal.SIGINT and "stopped by signal" in result.stdout
    line = the_error(result, code=128 + signal.SIGINT)
    assert "interrupted twice: stopped at once, without saving" in line
    assert f"the latest complete checkpoint is {latest};" in line


def test_a_diverging_run_stops_before_saving_bad_weights(tmp_path, checkpoint):
    overrides = {"optimizer.lr": 1.0e10, "checkpointer.save_every_n_steps": 1}
    config = write_config(tmp_path, checkpoint, "tiny/full", **overrides)
    result = run_tune_in_process("run", RECIPES["full"], "--config", str(config))
    line = the_error(result)
    assert "the update multiplied the weights' norm by" in line and "at step 1;" in line
    assert "no good checkpoint was saved before it" in line
    assert not Checkpointer(tmp_path / "run").checkpoints()
