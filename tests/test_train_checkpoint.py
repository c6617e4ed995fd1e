"""train.checkpoint: pickle-free state round trip, atomic save, keep-last-K, incomplete ones ignored."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers import T2IAdapter
from diffusers.optimization import get_scheduler

from train.checkpoint import (
    COMPLETE_FILE,
    Checkpoint,
    CheckpointError,
    TrainState,
    checkpoints_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_tree,
    read_checkpoint,
    resolve_resume,
    resume_problems,
    save_checkpoint,
    save_tree,
)


def test_tree_round_trip_without_pickle(tmp_path):
    np.random.seed(3)
    tree = {
        "state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.randn(3, 2)}, 7: {"bf16": torch.ones(2, dtype=torch.bfloat16)}},
        "groups": [{"betas": (0.9, 0.999), "lr": 1e-5, "foreach": None, "nan": float("nan"), "name": "$x"}],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "bytes": torch.get_rng_state(),
    }
    files = save_tree(tmp_path, "thing", tree)
    assert sorted(p.name for p in files) == ["thing.json", "thing.safetensors"]
    back = load_tree(tmp_path, "thing")
    assert set(back["state"]) == {0, 7}  # int keys survive JSON
    assert torch.equal(back["state"][0]["exp_avg"], tree["state"][0]["exp_avg"])
    assert back["state"][7]["bf16"].dtype == torch.bfloat16
    assert back["groups"][0]["betas"] == (0.9, 0.999) and isinstance(back["groups"][0]["betas"], tuple)
    assert math.isnan(back["groups"][0]["nan"]) and back["groups"][0]["name"] == "$x"
    assert back["numpy"][0] == "MT19937" and back["numpy"][1].dtype == np.uint32
    assert np.array_equal(back["numpy"][1], tree["numpy"][1]) and back["numpy"][2:] == tree["numpy"][2:]
    assert back["python"] == tree["python"]
    assert torch.equal(back["bytes"], tree["bytes"])


def test_tree_refuses_objects_it_cannot_encode(tmp_path):
    with pytest.raises(TypeError, match="cannot checkpoint a object"):
        save_tree(tmp_path, "bad", {"x": object()})


class _Run:
    """A tiny adapter with an optimizer and schedule that have taken real steps."""

    def __init__(self, seed: int):
        torch.manual_seed(seed)
        self.adapter = T2IAdapter(in_channels=3, channels=[8, 16, 16, 16], num_res_blocks=1, downscale_factor=8,
                                  adapter_type="full_adapter_xl")
        self.optimizer = torch.optim.AdamW(self.adapter.parameters(), lr=1e-3)
        self.scheduler = get_scheduler("cosine", self.optimizer, num_warmup_steps=2, num_training_steps=10)
        self.generator = torch.Generator().manual_seed(seed)

    def step(self):
        x = torch.rand(2, 3, 32, 32, generator=self.generator)
        loss = sum(f.square().mean() for f in self.adapter(x))
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()


@pytest.fixture
def accelerator():
    return Accelerator(cpu=True)


def _save(accelerator, out, run, step, keep=2, meta=None):
    return save_checkpoint(accelerator, out, state=TrainState(global_step=step, epoch=1, batches_done=step, samples_seen=4 * step),
                           adapter=run.adapter, optimizer=run.optimizer, lr_scheduler=run.scheduler,
                           noise_generator=run.generator, meta=meta or {"world_size": 1, "config": {}}, keep=keep)


def test_save_and_load_restore_everything(tmp_path, accelerator):
    run = _Run(0)
    for _ in range(3):
        run.step()
    path = _save(accelerator, tmp_path, run, 3)
    assert path == checkpoints_dir(tmp_path) / "step-000003"
    suffixes = {p.suffix for p in path.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".safetensors", ""}  # "" = COMPLETE: nothing that needs unpickling
    expected_noise = torch.rand(4, generator=run.generator)
    expected_global = torch.rand(4)
    run.step()
    expected_weights = {k: v.clone() for k, v in run.adapter.state_dict().items()}

    other = _Run(1)  # different init, no steps
    state = load_checkpoint(read_checkpoint(path), accelerator, adapter=other.adapter, optimizer=other.optimizer,
                            lr_scheduler=other.scheduler, noise_generator=other.generator)
    assert state == TrainState(global_step=3, epoch=1, batches_done=3, samples_seen=12)
    assert torch.equal(torch.rand(4, generator=other.generator), expected_noise)
    assert torch.equal(torch.rand(4), expected_global)
    other.step()  # the same step from the restored state is bitwise the same
    for k, v in other.adapter.state_dict().items():
        assert torch.equal(v, expected_weights[k]), k
    assert other.scheduler.get_last_lr() == run.scheduler.get_last_lr()


def test_keep_last_k_and_incomplete_ones_are_ignored(tmp_path, accelerator):
    run = _Run(0)
    for step in (1, 2, 3, 4):
        run.step()
        _save(accelerator, tmp_path, run, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]

    root = checkpoints_dir(tmp_path)
    # A save that died before COMPLETE, one damaged afterwards, and a temp folder: all ignored.
    shutil.copytree(root / "step-000004", root / "step-000009")
    (root / "step-000009" / COMPLETE_FILE).unlink()
    shutil.copytree(root / "step-000004", root / "step-000008")
    (root / "step-000008" / "optimizer.safetensors").write_bytes(b"short")
    shutil.copytree(root / "step-000004", root / ".tmp-step-000010")
    assert latest_checkpoint(tmp_path) == root / "step-000004"
    assert resolve_resume("latest", tmp_path) == root / "step-000004"
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_resume(str(root / "step-000009"), tmp_path)
    with pytest.raises(CheckpointError, match="incomplete"):
        read_checkpoint(root / "step-000008")

    # The next save cleans the temp leftover, keeps the damaged folders for a human, and still
    # keeps the newest two complete checkpoints.
    run.step()
    _save(accelerator, tmp_path, run, 5, keep=2)
    names = sorted(p.name for p in root.iterdir())
    assert names == ["step-000004", "step-000005", "step-000008", "step-000009"]


def test_a_leftover_temp_folder_of_the_same_step_is_replaced(tmp_path, accelerator):
    run = _Run(0)
    tmp = checkpoints_dir(tmp_path) / ".tmp-step-000001"
    tmp.mkdir(parents=True)
    (tmp / "junk").write_text("from a crashed save")
    path = _save(accelerator, tmp_path, run, 1)
    assert not tmp.exists() and not (path / "junk").exists()
    listing = json.loads((path / COMPLETE_FILE).read_text())["files"]
    assert "adapter/diffusion_pytorch_model.safetensors" in listing and "rng-rank00000.json" in listing


def test_resume_problems_list_every_difference(tmp_path):
    """Each difference once, the data stream's (train.data.stream_identity) among them."""
    from streams import identity_of

    from shards.manifest import ShardRecord

    records = [ShardRecord(index=i, name=f"shard-{i:06d}.tar", samples=4, bytes=100, sha256=f"{i}" * 64,
                           keys=[f"{i:04d}-{j:04d}" for j in range(4)]) for i in range(4)]

    def stream(**kw):
        base = dict(batch_size=4, seed=0, world_size=2, num_workers=2)
        return identity_of(records, **{**base, **kw})

    saved = {"world_size": 2, "manifest_id": "a" * 64, "learning_rate": 1e-5, "total_steps": 100,
             "stream": stream(), "config": {"batch_size": 4, "num_workers": 2, "seed": 0, "max_steps": 100}}
    ckpt = Checkpoint(path=tmp_path, state=TrainState(), meta=saved)
    now = {"world_size": 1, "manifest_id": "b" * 64, "learning_rate": 1e-5, "total_steps": 200,
           "stream": stream(batch_size=8, world_size=1, num_workers=0),
           "config": {"batch_size": 8, "num_workers": 0, "seed": 0, "max_steps": 200}}
    problems = resume_problems(ckpt, now)
    assert problems == [
        "number of processes: checkpoint 2, now 1",
        f"cache manifest id (a different cache): checkpoint {'a' * 64!r}, now {'b' * 64!r}",
        "--batch-size: checkpoint 4, now 8",
        "--num-workers: checkpoint 2, now 0",
    ]  # the world size is in the stream too: listed once. Training longer (constant LR) is allowed.


@pytest.mark.parametrize("schedule,refused", [("constant", False), ("constant_with_warmup", False),
                                              ("piecewise_constant", False), ("linear", True), ("cosine", True),
                                              ("cosine_with_restarts", True), ("polynomial", True)])
def test_resume_refuses_another_length_only_for_schedules_that_depend_on_it(tmp_path, schedule, refused):
    saved = {"world_size": 1, "manifest_id": "a", "learning_rate": 1e-5, "total_steps": 100,
             "config": {"lr_scheduler": schedule, "max_steps": 100}}
    ckpt = Checkpoint(path=tmp_path, state=TrainState(), meta=saved)
    now = {**saved, "total_steps": 200, "config": {"lr_scheduler": schedule, "max_steps": 200}}
    problems = resume_problems(ckpt, now)
    if refused:
        assert problems == [f"total optimizer steps (--max-steps / --num-epochs), which shape the {schedule} "
                            "learning-rate schedule: checkpoint 100, now 200 (only constant and piecewise_constant "
                            "schedules can be extended on resume)"]
    else:
        assert problems == []
    assert resume_problems(ckpt, saved) == []


def test_resume_refuses_changed_adamw_settings(tmp_path):
    """optimizer.load_state_dict restores the saved param groups: new values would be ignored."""
    adam = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "adam_weight_decay": 1e-2}
    saved = {"world_size": 1, "manifest_id": "a", "learning_rate": 1e-5, "config": dict(adam)}
    ckpt = Checkpoint(path=tmp_path, state=TrainState(), meta=saved)
    now = {**saved, "config": {"adam_beta1": 0.8, "adam_beta2": 0.99, "adam_epsilon": 1e-6, "adam_weight_decay": 0.0}}
    assert resume_problems(ckpt, now) == [
        "--adam-beta1: checkpoint 0.9, now 0.8", "--adam-beta2: checkpoint 0.999, now 0.99",
        "--adam-epsilon: checkpoint 1e-08, now 1e-06", "--adam-weight-decay: checkpoint 0.01, now 0.0"]


def test_a_folder_that_is_no_checkpoint_is_called_that_not_an_interrupted_save(tmp_path):
    from train.checkpoint import proof_problems

    (tmp_path / "manifest.json").write_text("{}")  # e.g. the cache, given to --resume by mistake
    assert proof_problems(tmp_path) == ["not a checkpoint folder (no COMPLETE, state.json or adapter/; checkpoints "
                                        "are OUT/checkpoints/step-NNNNNN)"]
    (tmp_path / "state.json").write_text("{}")  # a checkpoint whose save died before COMPLETE
    assert proof_problems(tmp_path) == ["no COMPLETE (its save was interrupted)"]


def _rewrite(folder, name, edit):
    """Edit one JSON file of a checkpoint and re-record every hash in COMPLETE, as someone who
    rewrites a checkpoint on purpose would: only the content checks can catch it."""
    from train.checkpoint import _fsync_tree

    if name is not None:
        path = folder / name
        path.write_text(edit(path.read_text()))
    listing = _fsync_tree(folder)
    listing.pop(COMPLETE_FILE, None)
    (folder / COMPLETE_FILE).write_text(json.dumps({"files": listing}))


def test_complete_may_only_list_regular_files_inside_the_checkpoint(tmp_path, accelerator):
    """A COMPLETE naming /dev/zero (0 bytes, as its size reads) would be hashed forever, a FIFO
    would block, `../x` would prove files elsewhere: each makes the checkpoint unprovable, and
    `latest` falls back to the one before."""
    from train.checkpoint import proof_problems

    run = _Run(0)
    for step in (1, 2):
        run.step()
        _save(accelerator, tmp_path, run, step)
    latest = checkpoints_dir(tmp_path) / "step-000002"
    good = json.loads((latest / COMPLETE_FILE).read_text())
    zero = {"bytes": 0, "sha256": "0" * 64}
    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "fifo", latest / "link")
    cases = {"/dev/zero": "is not a path inside the checkpoint", "../../../fifo": "is not a path inside the checkpoint",
             "link": "link is not a regular file"}
    for name, problem in cases.items():
        (latest / COMPLETE_FILE).write_text(json.dumps({"files": {**good["files"], name: zero}}))
        assert any(problem in p for p in proof_problems(latest)), (name, proof_problems(latest))
        warnings = []
        assert resolve_resume("latest", tmp_path, warn=warnings.append).name == "step-000001"
        assert len(warnings) == 1 and problem in warnings[0]
    (latest / COMPLETE_FILE).write_text(json.dumps({"files": {**good["files"], "adapter/x": {"bytes": -1,
                                                                                             "sha256": "nope"}}}))
    assert "COMPLETE lists 'adapter/x' without a byte count and a sha256" in proof_problems(latest)[0]
    (latest / COMPLETE_FILE).write_text("[" * 100_000 + "]" * 100_000)  # no RecursionError
    assert "nests 100000 levels deep" in proof_problems(latest)[0]


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.replace('"epoch": 1', '"epoch": -3'), "epoch must be whole numbers >= 0"),
    (lambda s: s.replace('"global_step": 2', '"global_step": "2"'), "global_step must be whole numbers >= 0"),
    (lambda s: s.replace('"config": {}', '"config": "x"'), "config is not an object"),
    (lambda s: "[" * 100_000 + "]" * 100_000, "nests 100000 levels deep"),
    (lambda s: s.replace('"epoch": 1', '"epoch": 1' + "0" * 5000), "a number of over"),
])
def test_a_rewritten_state_file_is_a_checkpoint_error(tmp_path, accelerator, edit, message):
    run = _Run(0)
    run.step()
    path = _save(accelerator, tmp_path, run, 2)
    _rewrite(path, "state.json", edit)
    with pytest.raises(CheckpointError, match=rf"checkpoint {path}: cannot read state.json: .*{message}"):
        read_checkpoint(path)


def test_a_rewritten_optimizer_hyperparameter_is_refused_at_load_not_at_the_first_step(tmp_path, accelerator):
    run = _Run(0)
    run.step()
    path = _save(accelerator, tmp_path, run, 1)
    _rewrite(path, "optimizer.json", lambda s: re.sub(r'"lr": [0-9.e-]+', '"lr": "abc"', s, count=1))
    other = _Run(1)
    with pytest.raises(CheckpointError, match=r"optimizer.json/.safetensors does not restore \(ValueError: param "
                                              r"group 0: lr is 'abc', not a float like this optimizer's"):
        load_checkpoint(read_checkpoint(path), accelerator, adapter=other.adapter, optimizer=other.optimizer,
                        lr_scheduler=other.scheduler, noise_generator=other.generator)


def test_resume_refuses_another_validation_measure_only_when_both_measure(tmp_path):
    """The validation curve and its best are one measure: its cache and timesteps stay."""
    base = {"validation_split": 0.1, "validation_loss_timesteps": 8, "validation_cache": None}
    saved = {"world_size": 1, "manifest_id": "a", "learning_rate": 1e-5, "config": base}
    ckpt = Checkpoint(path=tmp_path, state=TrainState(), meta=saved)
    now = {**saved, "config": {**base, "validation_loss_timesteps": 2}}
    assert resume_problems(ckpt, now) == [
        "--validation-loss-timesteps: checkpoint 8, now 2 (the validation loss curve would go on in another "
        "measure; measure differently in a new run)"]
    unmeasured = {**saved, "config": {**base, "validation_split": 0.0}}
    assert resume_problems(Checkpoint(path=tmp_path, state=TrainState(), meta=unmeasured),
                           {**now, "config": {**now["config"], "validation_split": 0.0, "validation_cache": "/v"}}) == []


def test_links_among_the_checkpoints_are_unlinked_never_followed_and_never_fail_a_save(tmp_path, accelerator):
    """A link planted as a step folder (the one this save publishes, or one pruning removes) or as
    a leftover temp/trash folder: removed as a link, its target untouched, the save done."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    out = tmp_path / "out"
    run = _Run(0)
    run.step()
    _save(accelerator, out, run, 1, keep=1)
    root = checkpoints_dir(out)
    for name in ("step-000002", ".tmp-step-000099", ".trash-step-000006"):
        os.symlink(victim, root / name)
    run.step()
    path = _save(accelerator, out, run, 2, keep=1)
    assert path == root / "step-000002" and not path.is_symlink() and read_checkpoint(path).state.global_step == 2
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]
    assert (victim / "keep.txt").read_text() == "mine"
