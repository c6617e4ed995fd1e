"""train.config and the `python -m train` CLI: every problem in one message, every knob in --help."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import pytest
from PIL import Image
from click.testing import CliRunner

from train.__main__ import main
from train.config import LR_SCHEDULERS, ConfigError, TrainConfig


def _cfg(tmp_path, **kw) -> TrainConfig:
    (tmp_path / "cache").mkdir(exist_ok=True)
    (tmp_path / "model").mkdir(exist_ok=True)
    base = dict(model=str(tmp_path / "model"), cache=str(tmp_path / "cache"), output_dir=str(tmp_path / "out"))
    return TrainConfig(**{**base, **kw})


def test_valid_config_passes(tmp_path):
    assert _cfg(tmp_path).validate(cuda_available=False) == []


def test_a_checkpoint_named_as_listed_or_as_the_reference_names_it_resumes_from_its_folder(tmp_path):
    step = tmp_path / "out" / "checkpoints" / "step-000200"
    step.mkdir(parents=True)
    for name in ("step-000200", "checkpoint-200", "checkpoint-200/"):
        assert _cfg(tmp_path, resume=name).resume == str(step)
    cfg = _cfg(tmp_path, resume="checkpoint-300")  # no such step: refused, listing what is there
    assert cfg.resume == "checkpoint-300"
    with pytest.raises(ConfigError, match=re.escape("--resume 'checkpoint-300' is neither 'latest', 'none', a "
                                                    "checkpoint folder nor the name of one in OUT/checkpoints (there: "
                                                    "step-000200)")):
        cfg.validate(cuda_available=False)


def test_report_to_all_means_every_supported_tracker_that_is_installed(tmp_path, monkeypatch):
    import importlib.util

    cfg = _cfg(tmp_path, report_to="all")
    assert cfg.trackers == ["tensorboard"]  # wandb is not installed here
    cfg.validate(cuda_available=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert cfg.trackers == []
    with pytest.raises(ConfigError, match="--report-to all needs one of tensorboard, wandb installed"):
        cfg.validate(cuda_available=False)


def test_every_problem_is_listed_at_once(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    cfg = _cfg(
        tmp_path,
        cache=str(tmp_path / "no-cache"),
        batch_size=0,
        learning_rate=-1.0,
        adam_beta2=1.5,
        caption_dropout=2.0,
        mixed_precision="fp16",
        lr_scheduler="piecewise_constant",
        validation_image=(str(image), str(tmp_path / "missing.png")),
        validation_prompt=("one", "two", "three"),
        resume=str(tmp_path / "no-checkpoint"),
        validation_resolution=100,
    )
    with pytest.raises(ConfigError) as err:
        cfg.validate(cuda_available=False)
    problems = err.value.problems
    expected = [
        "cache folder",
        "--batch-size must be >= 1",
        "--learning-rate must be > 0",
        "--adam-beta2 must be in [0, 1)",
        "--caption-dropout must be in [0, 1]",
        "fp16 needs a CUDA GPU",
        "piecewise_constant needs --lr-step-rules",
        "2 validation images and 3 validation prompts",
        "missing.png' does not exist",
        "--resume",
        "--validation-resolution must be a multiple of 8 (of the model's coarsest stride, 32 px for SDXL, checked "
        "when it loads) from 8 to 4096, got 100",
    ]
    for text in expected:
        assert sum(text in p for p in problems) == 1, (text, problems)
    assert len(problems) == len(expected)
    assert f"{len(expected)} problem(s)" in str(err.value)


@pytest.mark.parametrize("rules, problem", [
    ("-1:10,0.1", "multiplier '-1' must be a finite number > 0"),  # a negative learning rate
    ("1:10,nan", "multiplier 'nan' must be a finite number > 0"),
    ("garbage", "multiplier 'garbage' is not a number"),
    ("1:5", "'1:5' should be the final MULTIPLIER"),
    ("1:1.5,0.1", "step '1.5' is not a whole number"),
    ("1:20,0.1:10,0.01", "step 10 must be >= 1 and after the step before it"),
    ("0.5:x:3,0.1", "'0.5:x:3' should be MULTIPLIER:STEP"),
])
def test_piecewise_rules_are_checked_before_anything_loads(tmp_path, rules, problem):
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, lr_scheduler="piecewise_constant", lr_step_rules=rules).validate(cuda_available=False)
    assert err.value.problems == [f"--lr-step-rules {rules!r}: {problem} (the form is MULTIPLIER:STEP,...,MULTIPLIER, "
                                  "e.g. '1:10,0.1:20,0.01')"]
    assert _cfg(tmp_path, lr_scheduler="piecewise_constant",
                lr_step_rules="1:10,0.1:20,0.01").validate(cuda_available=False) == []


@pytest.mark.parametrize("name", ["learning_rate", "max_grad_norm", "adam_epsilon", "caption_dropout", "ema_decay"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_numbers_that_are_not_finite_are_refused(tmp_path, name, value):
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, **{name: value}).validate(cuda_available=False)
    flag = "--" + name.replace("_", "-")
    assert f"{flag} must be a finite number, got {value}" in err.value.problems


def test_an_output_folder_of_something_else_is_refused(tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    (out / "config.json").write_text("{}")
    (out / "logs").mkdir()  # many projects have one: no sign of a run
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, output_dir=str(out)).validate(cuda_available=False)
    assert err.value.problems == [
        f"--output-dir {out}: the folder holds files of something else (README.md, config.json, logs) and no "
        "training run (no .lock, train_config.json, checkpoints, logs/metrics.jsonl); training would write over or "
        "among them: choose a new or empty folder"]
    assert (out / "README.md").read_text() == "my notes"
    # A cache folder is something else too; an empty folder, a new one and an earlier run's are fine.
    cache = tmp_path / "cache"
    (cache / "shards").mkdir(parents=True)
    (cache / "manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds files of something else \\(manifest.json, shards\\)"):
        _cfg(tmp_path, output_dir=str(cache)).validate(cuda_available=False)
    (tmp_path / "empty").mkdir()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "README.md").write_text("the card")
    logged = tmp_path / "logged"  # a run killed before its first checkpoint: its metrics are the sign
    (logged / "logs").mkdir(parents=True)
    (logged / "logs" / "metrics.jsonl").write_text("")
    for ok in ("empty", "new", "run", "logged"):
        assert _cfg(tmp_path, output_dir=str(tmp_path / ok)).validate(cuda_available=False) == []


def test_validation_images_that_are_no_images_are_refused_before_any_model_loads(tmp_path):
    text, empty, cut = tmp_path / "text.png", tmp_path / "empty.png", tmp_path / "cut.png"
    text.write_text("hello")
    empty.write_bytes(b"")
    Image.new("RGB", (64, 64), (200, 10, 10)).save(cut)
    cut.write_bytes(cut.read_bytes()[:60])  # the header survives, the data does not
    # A JPEG cut inside its scan data: PIL's verify() passes it (it checks no JPEG data), only
    # decoding every pixel, as validation will, finds it.
    jpeg = tmp_path / "cut.jpg"
    Image.effect_noise((64, 64), 60).convert("RGB").save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:-400])
    with Image.open(jpeg) as im:
        im.verify()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"image": "text.png", "prompt": "a"}) + "\n")
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, validation_image=(str(empty), str(cut), str(jpeg)), validation_prompt=("p",),
             validation_file=str(pairs)).validate(cuda_available=False)
    problems = err.value.problems
    assert len(problems) == 4, problems
    assert problems[0] == f"validation image '{empty}' cannot be used: file is empty (0 bytes)"
    assert problems[1] == f"validation image '{cut}' cannot be used: cannot decode: OSError: image file is truncated"
    assert problems[2].startswith(f"validation image '{jpeg}' cannot be used: cannot decode: OSError: image file is "
                                  "truncated (")
    assert problems[3] == (f"--validation-file {pairs}: image '{text}' cannot be used: not a recognised image format "
                           "(5 bytes)")


def test_missing_optional_packages_are_problems(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("bitsandbytes", "wandb") else real(name, *a))
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, use_8bit_adam=True, report_to="wandb").validate(cuda_available=True)
    assert any("pip install bitsandbytes" in p for p in err.value.problems)
    assert any("pip install wandb" in p for p in err.value.problems)


def test_8bit_adam_needs_a_gpu(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, use_8bit_adam=True).validate(cuda_available=False)
    assert err.value.problems == ["--use-8bit-adam needs a CUDA GPU (bitsandbytes' 8-bit AdamW has no CPU kernels "
                                  "here): drop it on CPU"]
    assert _cfg(tmp_path, use_8bit_adam=True).validate(cuda_available=True) == []


def test_push_to_hub_needs_a_login_at_start(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(ConfigError, match="--push-to-hub needs a hub login"):
        _cfg(tmp_path, push_to_hub=True).validate(cuda_available=False)
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    assert _cfg(tmp_path, push_to_hub=True).validate(cuda_available=False) == []


def test_ddp_timeout_reaches_the_process_group(tmp_path):
    from datetime import timedelta

    from train.loop import make_accelerator

    with pytest.raises(ConfigError, match="--ddp-timeout-minutes must be >= 1, got 0"):
        _cfg(tmp_path, ddp_timeout_minutes=0).validate(cuda_available=False)
    accelerator = make_accelerator(_cfg(tmp_path, ddp_timeout_minutes=90))
    # accelerate hands this handler's timeout to torch.distributed.init_process_group
    assert accelerator.init_handler.timeout == timedelta(minutes=90)


def test_checkpoint_limit_is_raised_to_two_with_a_note(tmp_path):
    from train.config import resolve

    cfg = _cfg(tmp_path, checkpoints_total_limit=1)
    resolved = resolve(cfg, cuda_available=False)
    notes = resolved.notes
    assert resolved.config.checkpoints_total_limit == 2
    assert len(notes) == 1 and "raised to 2" in notes[0]
    assert cfg.checkpoints_total_limit == 1 and cfg.validate(cuda_available=False) == list(notes)  # cfg is unchanged


@pytest.mark.parametrize(
    "images,prompts,pairs",
    [
        (("a",), ("p", "q"), [("a", "p"), ("a", "q")]),  # 1:N
        (("a", "b"), ("p",), [("a", "p"), ("b", "p")]),  # N:1
        (("a", "b"), ("p", "q"), [("a", "p"), ("b", "q")]),  # N:N
    ],
)
def test_validation_pairs(tmp_path, images, prompts, pairs):
    assert _cfg(tmp_path, validation_image=images, validation_prompt=prompts).validation_pairs() == pairs


def test_validation_needs_both_images_and_prompts(tmp_path):
    with pytest.raises(ConfigError, match="--validation-prompt given without --validation-image"):
        _cfg(tmp_path, validation_prompt=("p",)).validate(cuda_available=False)


def test_dict_round_trip(tmp_path):
    cfg = _cfg(tmp_path, validation_prompt=("p", "q"), max_steps=7)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        TrainConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_help_documents_every_field():
    result = CliRunner().invoke(main, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in result.output, f.name
    for name in LR_SCHEDULERS:
        assert name in result.output
    # the reference script's names work too
    assert "--pretrained-model-name-or-path" in result.output and "--max-train-steps" in result.output


def test_cli_user_error_is_a_message_not_a_traceback(tmp_path):
    result = CliRunner().invoke(main, [
        "--model", str(tmp_path / "m"), "--cache", str(tmp_path / "c"), "--output-dir", str(tmp_path / "o"),
        "--batch-size", "0", "--validation-prompt", "p",
    ])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    for text in (f"--model {tmp_path / 'm'}: no such folder", "cache folder", "--batch-size must be >= 1", "without --validation-image"):
        assert text in result.output


@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_every_lr_scheduler_builds_and_steps(tmp_path, name):
    import torch

    from train.optim import OptimizerSpec, ScheduleSpec, make_lr_scheduler, make_optimizer

    cfg = _cfg(tmp_path, lr_scheduler=name, lr_warmup_steps=2, lr_num_cycles=2, lr_power=2.0,
               lr_step_rules="1:3,0.1" if name == "piecewise_constant" else None, learning_rate=1.0)
    cfg.validate(cuda_available=False)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = make_optimizer(OptimizerSpec.of(cfg, cfg.learning_rate), [param])
    scheduler = make_lr_scheduler(ScheduleSpec.of(cfg, total_steps=10), optimizer)
    lrs = []
    for _ in range(10):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    warm = name not in ("constant", "piecewise_constant")
    assert lrs[0] == (0.0 if warm else 1.0)
    assert max(lrs) == 1.0
    if name in ("linear", "cosine", "polynomial"):
        assert lrs[-1] < lrs[2]  # decays after warm-up
    if name == "piecewise_constant":
        assert lrs == [1.0] * 3 + [0.1] * 7


def test_mixed_precision_comes_from_accelerate_when_unset(tmp_path):
    from train.config import resolve_mixed_precision

    assert resolve_mixed_precision("bf16", {"ACCELERATE_MIXED_PRECISION": "fp16"}) == ("bf16", "--mixed-precision")
    assert resolve_mixed_precision(None, {"ACCELERATE_MIXED_PRECISION": "BF16"}) == (
        "bf16", "accelerate launch (its --mixed_precision flag or config file)")
    config = tmp_path / "hf" / "accelerate" / "default_config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("compute_environment: LOCAL_MACHINE\nmixed_precision: bf16\n")
    assert resolve_mixed_precision(None, {"HF_HOME": str(tmp_path / "hf")}) == (
        "bf16", f"the accelerate config file {config}")
    other = tmp_path / "other.yaml"
    other.write_text("mixed_precision: fp16\n")
    assert resolve_mixed_precision(None, {"ACCELERATE_CONFIG_FILE": str(other)})[0] == "fp16"
    assert resolve_mixed_precision(None, {"HF_HOME": str(tmp_path / "none")}) == (
        "no", "default (no --mixed-precision and no accelerate setting)")


def _accelerate(*args: str, **environ: str):
    from shards.launcher import Parent

    return Parent(argv=("/venv/bin/python3", "/venv/bin/accelerate", "launch", *args, "-m", "train"), environ=environ)


def test_the_stated_source_of_accelerates_precision_is_the_one_it_used(tmp_path):
    """accelerate launch exports ACCELERATE_MIXED_PRECISION in every case; which case it was is
    read from the launcher's own command line and config file, as accelerate decides it."""
    from train.config import resolve_mixed_precision

    home = tmp_path / "hf"
    default = home / "accelerate" / "default_config.yaml"
    launched = lambda value, parent: resolve_mixed_precision(None, {"ACCELERATE_MIXED_PRECISION": value}, parent)
    # Neither a flag nor a config file: accelerate's default, not "its flag or config file".
    assert launched("no", _accelerate(HF_HOME=str(home))) == (
        "no", "accelerate launch's default: no --mixed_precision and no accelerate config file")
    assert launched("bf16", _accelerate("--mixed_precision", "bf16", HF_HOME=str(home))) == (
        "bf16", "accelerate launch --mixed_precision")
    default.parent.mkdir(parents=True)
    default.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nmixed_precision: bf16\n")
    assert launched("bf16", _accelerate(HF_HOME=str(home))) == (
        "bf16", f"the accelerate config file {default} (accelerate launch's default config file)")
    # The flag beats the file; --cpu makes accelerate ignore its default file.
    assert launched("no", _accelerate("--mixed-precision=no", HF_HOME=str(home))) == (
        "no", "accelerate launch --mixed_precision")
    assert launched("no", _accelerate("--cpu", HF_HOME=str(home)))[1].startswith("accelerate launch's default")
    other = tmp_path / "other.yaml"
    other.write_text("distributed_type: 'NO'\nfp16: true\n")  # the legacy spelling
    assert launched("fp16", _accelerate("--config_file", str(other), HF_HOME=str(home))) == (
        "fp16", f"the accelerate config file {other} (accelerate launch --config_file)")
    other.write_text("distributed_type: 'NO'\n")
    assert launched("no", _accelerate("--config_file", str(other))) == (
        "no", f"accelerate launch's default: neither --mixed_precision nor its config file {other} sets one")
    # What the launcher's reading does not explain (the file changed since) is not guessed at.
    assert launched("fp16", _accelerate(HF_HOME=str(home))) == (
        "fp16", "accelerate launch (its --mixed_precision flag or config file)")
    # Set by hand, or by a launcher that is not accelerate's: the variable, named as such.
    from shards.launcher import Parent

    assert launched("BF16", Parent(argv=("bash",), environ={})) == (
        "bf16", "the ACCELERATE_MIXED_PRECISION environment variable")


@pytest.mark.slow
def test_accelerate_launch_with_its_config_file_end_to_end(tmp_path):
    """The real `accelerate launch`, an accelerate config file under a temporary HF_HOME (where
    `accelerate config` writes it), and a process that resolves its precision as train does."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    probe = tmp_path / "probe.py"
    probe.write_text(f"import json, sys\nsys.path.insert(0, {str(repo)!r})\n"
                     "from train.config import resolve_mixed_precision\n"
                     "print(json.dumps(resolve_mixed_precision(None)))\n")
    home = tmp_path / "hf"
    config = home / "accelerate" / "default_config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nmixed_precision: bf16\n"
                      "num_processes: 1\nuse_cpu: true\n")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}, "HF_HOME": str(home)}

    def resolved(*launch: str) -> list[str]:
        p = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_processes", "1",
                            "--dynamo_backend", "no", str(probe)], env=env, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout.strip().splitlines()[-1])

    assert resolved() == ["bf16", f"the accelerate config file {config} (accelerate launch's default config file)"]
    assert resolved("--mixed_precision", "no") == ["no", "accelerate launch --mixed_precision"]
    config.unlink()
    assert resolved() == ["no", "accelerate launch's default: no --mixed_precision and no accelerate config file"]


def test_the_reference_scripts_command_line_parses(tmp_path):
    """Its spellings, names and multi-value forms give the same config as ours."""
    args = ["--pretrained_model_name_or_path=m", "--cache", "c", "--output_dir=o", "--train_batch_size=1",
            "--gradient_accumulation_steps=4", "--max_train_steps=15000", "--learning_rate=1e-5",
            "--validation_image", "a.png", "b.png", "--validation_prompt", "red circle", "cyan circle",
            "--validation_steps=100", "--report_to=tensorboard", "--seed=42", "--mixed_precision=bf16",
            "--proportion_empty_prompts", "0.1", "--dataloader_num_workers", "3", "--resume_from_checkpoint", "latest",
            "--enable_xformers_memory_efficient_attention", "--set_grads_to_none", "--tokenizer_name", "t"]
    ctx = main.make_context("train", args)
    p = ctx.params
    assert (p["model"], p["output_dir"], p["batch_size"], p["gradient_accumulation_steps"], p["max_steps"]) == (
        "m", "o", 1, 4, 15000)
    assert p["validation_image"] == ("a.png", "b.png") and p["validation_prompt"] == ("red circle", "cyan circle")
    assert (p["caption_dropout"], p["num_workers"], p["resume"], p["seed"], p["mixed_precision"]) == (
        0.1, 3, "latest", 42, "bf16")
    ours = main.make_context("train", ["--model", "m", "--cache", "c", "--output-dir", "o", "--batch-size", "1",
                                       "--validation-image", "a.png", "--validation-image", "b.png"]).params
    assert ours["validation_image"] == p["validation_image"] and ours["batch_size"] == 1


_NO_EFFECT_NOTES = [
    "note: --enable_xformers_memory_efficient_attention has no effect here: attention runs through PyTorch's "
    "scaled_dot_product_attention (flash / memory-efficient kernels), which is what xformers gave the reference",
    "note: --set_grads_to_none has no effect here: gradients are always set to None between steps "
    "(optimizer.zero_grad(set_to_none=True))",
    "note: --tokenizer_name has no effect here: train uses MODEL's tokenizers (to embed the validation prompts) "
    "and checks them against the ones the cache was encoded with",
]
_WITH_NO_EFFECT = ["--model", "m", "--cache", "c", "--output-dir", "o", "--enable_xformers_memory_efficient_attention",
                   "--set_grads_to_none", "--tokenizer_name", "X", "--batch-size", "3"]


@pytest.mark.parametrize("ranks", [{}, {"RANK": "0", "LOCAL_RANK": "0"}, {"LOCAL_RANK": "0"}])
def test_no_effect_options_print_one_note_each_on_the_main_process(ranks, monkeypatch, capsys):
    for name in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in ranks.items():
        monkeypatch.setenv(name, value)
    params = main.make_context("train", list(_WITH_NO_EFFECT)).params
    assert params["batch_size"] == 3 and params["model"] == "m"  # "X" was --tokenizer_name's value, consumed
    captured = capsys.readouterr()
    assert captured.err.splitlines() == _NO_EFFECT_NOTES and captured.out == ""


@pytest.mark.parametrize("ranks", [{"RANK": "1", "LOCAL_RANK": "1"}, {"RANK": "3", "LOCAL_RANK": "0"},
                                   {"LOCAL_RANK": "1"}])
def test_no_effect_notes_are_not_repeated_by_the_other_ranks(ranks, monkeypatch, capsys):
    """RANK (global) decides; LOCAL_RANK only when RANK is not set: node 1's local rank 0 is rank 3."""
    for name in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in ranks.items():
        monkeypatch.setenv(name, value)
    assert main.make_context("train", list(_WITH_NO_EFFECT)).params["batch_size"] == 3
    assert capsys.readouterr().err == ""


def test_no_effect_notes_through_the_real_command(tmp_path):
    """The whole command: the notes, once each, then the run's own refusal (no model here)."""
    paths = {"m": str(tmp_path / "m"), "c": str(tmp_path / "c"), "o": str(tmp_path / "o")}
    args = [paths.get(a, a) for a in _WITH_NO_EFFECT]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert lines[:3] == _NO_EFFECT_NOTES and all(line not in lines[3:] for line in _NO_EFFECT_NOTES)
    assert lines[3].startswith("error: ") and f"--model {tmp_path / 'm'}: no such folder" in result.stderr


def test_precompute_options_given_to_train_name_precompute():
    result = CliRunner().invoke(main, ["--model", "m", "--cache", "c", "--output-dir", "o", "--resolution=1024",
                                       "--dataset_name", "fusing/fill50k", "--flip", "--buckets", "sdxl"])
    assert result.exit_code == 2
    out = result.output
    assert "--resolution=1024" not in out and "--resolution is fixed at precompute" in out
    assert "--dataset_name belongs to precompute, which reads the dataset once into the cache" in out
    assert "--flip is fixed at precompute" in out and "--buckets is fixed at precompute" in out


def test_a_saved_config_repeats_the_run(tmp_path, monkeypatch):
    """train_config.json, as a run writes it, is a --config file; command-line flags override it.
    Its local paths are absolute, so it names the same files from any working directory; hub ids
    and URLs are kept as typed."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "c").mkdir()
    cfg = TrainConfig(model="runs/tiny", cache="c", output_dir="runs/out", vae="madebyollin/sdxl-vae-fp16-fix",
                      local_cache="~/shard-cache", max_steps=7, validation_prompt=("p",), validation_image=("a.png",),
                      validation_cache="s3://bucket/held-out")
    saved = tmp_path / "train_config.json"
    saved.write_text(json.dumps({**cfg.to_dict(), "resolved": {"world_size": 1}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    params = main.make_context("train", ["--config", str(saved)]).params
    params.pop("config")
    assert TrainConfig(**params) == dataclasses.replace(
        cfg, model=str(tmp_path / "runs" / "tiny"), cache=str(tmp_path / "c"), output_dir=str(tmp_path / "runs" / "out"),
        local_cache=str(Path.home() / "shard-cache"), validation_image=(str(tmp_path / "a.png"),))
    params = main.make_context("train", ["--config", str(saved), "--max-steps", "9"]).params
    assert params["max_steps"] == 9 and params["validation_prompt"] == ("p",)


def test_secrets_never_reach_what_a_run_writes(tmp_path):
    from shards.secrets import redact

    assert redact("https://host.example/c/fill?sv=2024&sig=abc%2Bdef") == "https://host.example/c/fill?sv=REDACTED&sig=REDACTED"
    assert redact("https://alice:pw@host.example/c") == "https://alice:REDACTED@host.example/c"
    assert redact("https://token@host.example/c") == "https://REDACTED@host.example/c"
    for plain in ("cache/fill", "/abs/path", "s3://bucket/prefix", "stabilityai/sdxl", None):
        assert redact(plain) == plain
    cfg = _cfg(tmp_path, cache="https://host.example/c?sig=s3cr3t", hub_token="hf_abc")
    d = cfg.to_dict()
    assert d["cache"] == "https://host.example/c?sig=REDACTED" and d["hub_token"] is None
    assert "s3cr3t" not in json.dumps(d) and "hf_abc" not in json.dumps(d)


def test_an_unwritable_output_dir_is_refused_before_anything_loads(tmp_path):
    """As root, permission bits do not stop a write; a read-only filesystem does (/sys here)."""
    out = Path("/sys/kernel/t2i-adapter-test-out")
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, output_dir=str(out)).validate(cuda_available=False)
    assert f"--output-dir {out}: cannot write there" in str(err.value)
    assert any(why in str(err.value) for why in ("Operation not permitted", "Read-only file system",
                                                  "Permission denied"))
    fine = tmp_path / "new" / "run"
    assert _cfg(tmp_path, output_dir=str(fine)).validate(cuda_available=False) == []
    # Probed where it would be created, not created: a refused run leaves no empty folder behind.
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".tmp-write-test-*"))


def test_precompute_records_no_secret_of_its_locations():
    from precompute.config import PrecomputeConfig

    cfg = PrecomputeConfig(model="m", data="https://host.example/tars/{00000..00003}.tar?sv=1&sig=s3cr3t",
                           cache="s3://bucket/c")
    assert cfg.resolved()["data"] == "https://host.example/tars/{00000..00003}.tar?sv=REDACTED&sig=REDACTED"
    assert "s3cr3t" not in json.dumps(cfg.resolved())


# ---------------------------------------------------------------------------------------------
# Knowing when the adapter is good: validation loss, EMA, validation files


def test_validation_loss_and_ema_settings_are_checked_together(tmp_path):
    cfg = _cfg(tmp_path, validation_split=1.5, validation_cache=str(tmp_path / "no-such-cache"),
               validation_loss_steps=0, validation_loss_timesteps=0, ema_decay=1.0, save_ema=True)
    with pytest.raises(ConfigError) as err:
        cfg.validate(cuda_available=False)
    assert err.value.problems == [
        "--validation-split must be a fraction in [0, 1), got 1.5",
        "--validation-split and --validation-cache both name the validation loss's samples: give one",
        f"validation cache folder {str(tmp_path / 'no-such-cache')!r} does not exist",
        "--validation-loss-steps must be >= 1, got 0",
        "--validation-loss-timesteps must be >= 1, got 0",
        "--ema-decay must be in [0, 1) (0 = no EMA), got 1.0",
    ]
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, ema_warmup_steps=10, save_ema=True).validate(cuda_available=False)
    assert err.value.problems == ["--ema-warmup-steps needs --ema-decay (the EMA is off)",
                                  "--save-ema needs --ema-decay (there is no EMA to save)"]
    assert _cfg(tmp_path, validation_split=0.05, ema_decay=0.999, ema_warmup_steps=100,
                save_ema=True).validate(cuda_available=False) == []


def test_validation_file_pairs_from_jsonl_and_csv(tmp_path):
    (tmp_path / "conds").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / "conds" / name)
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text('{"image": "conds/a.png", "prompt": "a cat"}\n\n'
                     f'{{"conditioning_image": "{tmp_path / "conds/b.png"}", "text": "a dog"}}\n')
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text('image,prompt\nconds/b.png,"a bird, flying"\n')
    cfg = _cfg(tmp_path, validation_image=(str(tmp_path / "conds/a.png"),), validation_prompt=("first",),
               validation_file=str(jsonl))
    assert cfg.validate(cuda_available=False) == [] and cfg.validation_enabled
    assert cfg.validation_pairs() == [(str(tmp_path / "conds/a.png"), "first"),
                                      (str(tmp_path / "conds/a.png"), "a cat"),
                                      (str(tmp_path / "conds/b.png"), "a dog")]
    alone = _cfg(tmp_path, validation_file=str(csv_file))
    assert alone.validation_enabled and alone.validation_pairs() == [(str(tmp_path / "conds/b.png"), "a bird, flying")]
    # As Excel saves "CSV UTF-8": a byte-order mark, CRLF line ends.
    csv_file.write_bytes('\ufeffimage,prompt\r\nconds/b.png,"a bird, flying"\r\n'.encode("utf-8"))
    excel = _cfg(tmp_path, validation_file=str(csv_file))
    assert excel.validate(cuda_available=False) == []
    assert excel.validation_pairs() == [(str(tmp_path / "conds/b.png"), "a bird, flying")]


def test_a_bad_validation_file_lists_every_problem(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "missing.png", "prompt": "x"}\nnot json\n{"image": "a.png"}\n[1, 2]\n')
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, validation_file=str(bad)).validate(cuda_available=False)
    problems = [p.replace(str(bad), "FILE") for p in err.value.problems]
    assert problems[0].startswith("--validation-file FILE: line 2 is not JSON (")
    assert problems[1:] == [
        "--validation-file FILE: line 3 lacks a prompt (prompt or text), as a non-empty string",
        "--validation-file FILE: line 4 is not an object",
        f"--validation-file FILE: image {str(tmp_path / 'missing.png')!r} does not exist",
    ]
    other = tmp_path / "pairs.txt"
    other.write_text("x")
    for path, message in ((other, "unknown format '.txt'; use .jsonl (JSON lines) or .csv"),
                          (tmp_path / "none.jsonl", "cannot read it (No such file or directory)")):
        with pytest.raises(ConfigError) as err:
            _cfg(tmp_path, validation_file=str(path)).validate(cuda_available=False)
        assert err.value.problems == [f"--validation-file {path}: {message}"]


def test_settings_a_run_does_not_use_are_said(tmp_path):
    """Given, but without effect in this run: one note each (resolve logs them), never dropped
    without a word."""
    from train.config import resolve

    cfg = _cfg(tmp_path, max_steps=5, num_epochs=3, lr_warmup_steps=100, lr_power=2.0, validation_loss_steps=1,
               validation_steps=7, validation_resolution=64, hub_model_id="me/x", hub_public=True,
               tracker_project_name="p", validation_cache=str(tmp_path / "cache"))
    notes = resolve(cfg, cuda_available=False, environ={}).notes
    assert notes[:-1] == (
        "--num-epochs 3 is not used: --max-steps 5 sets the run's length",
        "--lr-warmup-steps 100 is not used by the constant learning-rate schedule",
        "--lr-power 2.0 is not used by the constant learning-rate schedule",
        "--validation-steps 7 is not used: no validation images are rendered without --validation-image and "
        "--validation-prompt (or --validation-file)",
        "--validation-resolution 64 is not used: no validation images are rendered without --validation-image and "
        "--validation-prompt (or --validation-file)",
        "--hub-model-id me/x is not used without --push-to-hub",
        "--hub-public is not used without --push-to-hub",
        "--tracker-project-name p is not used with --report-to none (metrics go to OUT/logs/metrics.jsonl)",
    )
    assert notes[-1].startswith(f"--validation-cache is the training cache itself ({tmp_path / 'cache'})")
    # The same settings where they are used: nothing to say.
    used = _cfg(tmp_path, num_epochs=3, lr_scheduler="polynomial", lr_warmup_steps=100, lr_power=2.0,
                validation_split=0.25, validation_loss_steps=1, report_to="tensorboard", tracker_project_name="p")
    assert resolve(used, cuda_available=False, environ={}).notes == ()
    assert resolve(_cfg(tmp_path, lr_warmup_steps=0), cuda_available=False, environ={}).notes == ()  # none asked
    no_loss = _cfg(tmp_path, validation_loss_timesteps=3)
    assert resolve(no_loss, cuda_available=False, environ={}).notes == (
        "--validation-loss-timesteps 3 is not used: no validation loss is measured without --validation-split or "
        "--validation-cache",)


def test_num_epochs_on_the_command_line_beats_a_config_files_max_steps(tmp_path):
    """A preset sets max-steps; --num-epochs typed on the command line is what the user asked for."""
    from train.__main__ import _command_line_length_wins

    preset = tmp_path / "preset.toml"
    preset.write_text("max-steps = 40\nbatch-size = 8\n")
    base = ["--config", str(preset), "--model", "m", "--cache", "c", "--output-dir", "o"]
    for extra, want in ((["--num-epochs", "3"], (None, 3)), (["--num_train_epochs", "2"], (None, 2)),
                        (["--num-epochs", "3", "--max-steps", "9"], (9, 3)), ([], (40, 1))):
        with main.make_context("train", base + extra) as ctx:
            options = {k: v for k, v in ctx.params.items() if k != "config"}
            _command_line_length_wins(options)
        assert (options["max_steps"], options["num_epochs"]) == want, extra


def test_an_output_dir_inside_the_cache_folder_is_refused(tmp_path):
    """The run's files among the cache's would make the cache folder one a later precompute refuses."""
    for out in (tmp_path / "cache" / "run1", tmp_path / "cache"):
        with pytest.raises(ConfigError) as err:
            _cfg(tmp_path, output_dir=str(out)).validate(cuda_available=False)
        assert (f"--output-dir {out}: is inside the cache folder {tmp_path / 'cache'}: a run's files go in a folder of "
                "their own, outside the cache") in str(err.value)
    assert _cfg(tmp_path, output_dir=str(tmp_path / "cache-run")).validate(cuda_available=False) == []
    assert _cfg(tmp_path, cache="s3://bucket/cache", output_dir=str(tmp_path / "out")).validate(
        cuda_available=False) == []


def test_wrong_kinds_of_paths_and_sizes_past_any_use_are_named(tmp_path):
    """A folder given as a validation image, a file as a validation cache, a validation size that
    would exhaust memory before anything is said: each one line, before anything loads."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "x.json").write_text("{}")
    for kw, message in (
            (dict(validation_image=(str(tmp_path),), validation_prompt=("p",)),
             f"validation image {str(tmp_path)!r} is a folder, not an image"),
            (dict(validation_cache=str(tmp_path / "model" / "x.json")), "is a file, not a cache folder"),
            (dict(validation_resolution=100000), "from 8 to 4096, got 100000")):
        with pytest.raises(ConfigError) as err:
            _cfg(tmp_path, **kw).validate(cuda_available=False)
        assert message in str(err.value), err.value
    from train.config import resolve

    notes = resolve(_cfg(tmp_path, lr_step_rules="1:2,0.1"), cuda_available=False, environ={}).notes
    assert notes == ("--lr-step-rules 1:2,0.1 is not used by the constant learning-rate schedule",)
