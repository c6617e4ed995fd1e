"""The README's "Coming from train_t2i_adapter_sdxl.py": the guide's command, split as documented, runs.

The commands are read from README.md itself, so the docs cannot drift from what works: the
guide's example (the first block), its two-stage equivalent (the second) and its `make` form
(the third). The two-stage commands must carry every option of the guide, each to the stage the
README's rule sends it to, and are then run on the tiny model with only what cannot run offline
substituted (below). The `make` form must carry every option too.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from PIL import Image

from clirun import run_cli, run_launched

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Coming from train_t2i_adapter_sdxl.py"
MODEL_OPTIONS = {"pretrained-model-name-or-path", "revision", "variant", "cache-dir", "pretrained-vae-model-name-or-path"}
PRECOMPUTE_OPTIONS = {"dataset-name", "dataset-config-name", "train-data-dir", "image-column", "conditioning-image-column",
                      "caption-column", "resolution", "max-train-samples", "trust-remote-code"}


def _blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return [b.replace("\\\n", " ") for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def _options(argv: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """(--name with dashes, values) for every option of a command line."""
    out: list[tuple[str, tuple[str, ...]]] = []
    for token in argv:
        if token.startswith("--"):
            name, eq, value = token[2:].partition("=")
            out.append((name.replace("_", "-"), (value,) if eq else ()))
        elif out:
            out[-1] = (out[-1][0], out[-1][1] + (token,))
    return out


def _commands(block: str) -> list[list[str]]:
    return [shlex.split(c) for c in block.strip().split("\n\n")]


def test_the_two_stage_form_carries_every_option_of_the_guide_to_its_stage():
    guide, stages, make = _blocks()
    guide_cmd = [c for c in _commands(guide) if c[:2] == ["accelerate", "launch"]][0]
    precompute, train = _commands(stages)
    assert precompute[:3] == ["python", "-m", "precompute"] and train[:4] == ["accelerate", "launch", "-m", "train"]
    want = _options(guide_cmd[3:])
    got_p, got_t = _options(precompute[3:]), _options(train[4:])
    for name, values in want:
        where = [stage for stage, opts in (("precompute", got_p), ("train", got_t)) if (name, values) in opts]
        expected = (["precompute", "train"] if name in MODEL_OPTIONS else
                    ["precompute"] if name in PRECOMPUTE_OPTIONS else ["train"])
        assert where == expected, (name, values, where)
    extra = [o for o in got_p + got_t if o not in want]
    assert extra == [("cache", ("cache/fill50k",)), ("cache", ("cache/fill50k",))]  # the one thing added
    # The make form: the same options, through make's variables and ARGS.
    (make_cmd,) = _commands(make)
    variables = dict(t.split("=", 1) for t in make_cmd[2:] if not t.startswith("-") and "=" in t and t != "ARGS")
    via = {"MODEL": "pretrained-model-name-or-path", "DATASET": "dataset-name", "OUT": "output-dir",
           "RESOLUTION": "resolution", "STEPS": "max-train-steps", "BATCH": "train-batch-size", "LR": "learning-rate"}
    got_m = [(via[k], (v,)) for k, v in variables.items() if k in via] + _options(shlex.split(variables["ARGS"]))
    assert {n for n, _ in want} - {n for n, _ in got_m} == {"trust-remote-code"}  # it has no effect here anyway
    for name, values in got_m:
        assert (name, tuple(v.strip('"') for v in values)) in [(n, tuple(x.strip('"') for x in vs))
                                                               for n, vs in want], name


def _substitute(argv: list[str], subs: dict[str, str | None], values: dict[str, str]) -> list[str]:
    """Replace option values (`values`: option -> new value), then whole tokens (`subs`; None drops)."""
    out = []
    for token in argv:
        name = token[2:].split("=", 1)[0] if token.startswith("--") else None
        if name in values:
            token = f"--{name}={values[name]}"
        for old, new in subs.items():
            if token == old and new is None:
                token = None
                break
            if token is not None and old in token and new is not None:
                token = token.replace(old, new)
        if token is not None:
            out.append(token)
    return out


@pytest.mark.slow
def test_the_guides_command_split_in_two_runs_on_the_tiny_model(tiny_model, fill_data, tmp_path):
    # A local copy of fusing/fill50k's shape (the hub is not reachable here): image,
    # conditioning_image, text, in the hub's parquet layout, loaded by name like a hub id.
    rows = [json.loads(line) for line in (fill_data / "prompt.json").read_text().splitlines()]
    features = datasets.Features({"image": datasets.Image(), "conditioning_image": datasets.Image(),
                                  "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({
        "image": [{"bytes": (fill_data / r["target"]).read_bytes(), "path": None} for r in rows],
        "conditioning_image": [{"bytes": (fill_data / r["source"]).read_bytes(), "path": None} for r in rows],
        "text": [r["prompt"] for r in rows]}, features=features)
    dataset = tmp_path / "fill50k"
    (dataset / "data").mkdir(parents=True)
    ds.to_parquet(str(dataset / "data" / "train-00000-of-00001.parquet"))
    for i in (1, 2):
        Image.open(fill_data / f"source/{i}.png").save(tmp_path / f"conditioning_image_{i}.png")

    _, stages, _ = _blocks()
    precompute, train = _commands(stages)
    subs = {"$MODEL_DIR": str(tiny_model), "$OUTPUT_DIR": str(tmp_path / "out"), "fusing/fill50k": str(dataset),
            "cache/fill50k": str(tmp_path / "cache"), "./conditioning_image_": str(tmp_path / "conditioning_image_"),
            "--push_to_hub": None}  # no hub here
    values = {"resolution": "64",  # the tiny model's size (1024 px images of 64 px data would all be skipped)
              "max_train_steps": "2", "validation_steps": "2",  # minutes of CPU, not hours of GPU
              "mixed_precision": "bf16",  # fp16 needs a GPU
              "report_to": "tensorboard"}  # wandb is not installed here
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"),
           "HF_HOME": str(tmp_path / "hf")}
    p = subprocess.run([sys.executable, *_substitute(precompute, subs, values)[1:]], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "note: --trust_remote_code has no effect here" in p.stderr
    t = run_launched([sys.executable, "-m", "accelerate.commands.launch", *_substitute(train, subs, values)[2:]],
                     cwd=tmp_path, env=env, timeout=600)
    assert t.returncode == 0, t.stderr[-3000:]
    out = tmp_path / "out"
    config = json.loads((out / "train_config.json").read_text())
    assert (config["batch_size"], config["gradient_accumulation_steps"], config["learning_rate"], config["seed"],
            config["mixed_precision"], config["max_steps"]) == (1, 4, 1e-5, 42, "bf16", 2)
    assert config["validation_prompt"] == ["red circle with blue background", "cyan circle with brown floral background"]
    assert len(list((out / "validation").glob("step-000002-*.png"))) == 2
    assert (out / "diffusion_pytorch_model.safetensors").is_file() and (out / "README.md").is_file()


# Every option of train_t2i_adapter_sdxl.py (its parse_args), as it spells them.
REFERENCE_OPTIONS = """
pretrained_model_name_or_path pretrained_vae_model_name_or_path adapter_model_name_or_path revision variant
tokenizer_name output_dir cache_dir seed resolution detection_resolution crops_coords_top_left_h
crops_coords_top_left_w train_batch_size num_train_epochs max_train_steps checkpointing_steps
checkpoints_total_limit resume_from_checkpoint gradient_accumulation_steps gradient_checkpointing learning_rate
scale_lr lr_scheduler lr_warmup_steps lr_num_cycles lr_power use_8bit_adam dataloader_num_workers adam_beta1
adam_beta2 adam_weight_decay adam_epsilon max_grad_norm push_to_hub hub_token hub_model_id logging_dir allow_tf32
report_to mixed_precision enable_xformers_memory_efficient_attention set_grads_to_none dataset_name
dataset_config_name train_data_dir image_column conditioning_image_column caption_column max_train_samples
proportion_empty_prompts validation_prompt validation_image num_validation_images validation_steps
tracker_project_name trust_remote_code
""".split()


def test_every_reference_option_has_a_home():
    """Each is an option of a stage, or named by the other stage as belonging there, or accepted
    with a note: never 'no such option'."""
    from precompute.__main__ import main as precompute_main
    from train.__main__ import main as train_main

    def known(cmd) -> dict[str, str]:
        opts = {n.lstrip("-"): "option" for p in cmd.params for n in getattr(p, "opts", [])}
        for name, f in cmd.foreign.items():
            opts.setdefault(name, "noted" if f.accepted else "refused")
        return opts

    p, t = known(precompute_main), known(train_main)
    for option in REFERENCE_OPTIONS:
        name = option.replace("_", "-")
        assert name in p and name in t, option
        assert "option" in (p[name], t[name]) or (p[name], t[name]) == ("noted", "noted") or \
            "noted" in (p[name], t[name]), (option, p[name], t[name])
        # Refused by one stage means an option of the other (whose message sends it there): never
        # refused by one and only noted by the other, which would send the user in a circle.
        if p[name] == "refused":
            assert t[name] == "option", option
        if t[name] == "refused":
            assert p[name] == "option", option


def test_each_stage_names_every_option_of_the_other():
    """The tables of the other stage's options stay complete as options are added."""
    from precompute.__main__ import main as precompute_main
    from train.__main__ import main as train_main

    def opts(cmd) -> set[str]:
        return {n[2:] for p in cmd.params for n in getattr(p, "opts", []) if n.startswith("--")}

    p, t = opts(precompute_main), opts(train_main)
    assert t - p - set(precompute_main.foreign) == set()
    assert p - t - set(train_main.foreign) == {"verbose"}  # a logging switch, not a setting


# The other stage's options, through the real command lines (a subprocess each, as a user types
# them): refused with exit status 2, every one named with the stage to give it to, no traceback,
# and nothing done.

_BELONGS_TO_TRAIN = ("belongs to train: precompute only encodes the dataset into the cache. Pass it to "
                     "`python -m train` (changing it never re-encodes the cache)")
_FIXED_AT_PRECOMPUTE = ("is fixed at precompute: the cache holds what precompute encoded (see `python -m shards "
                        "stats CACHE`); pass it to `python -m precompute`, and train reads the result from the "
                        "cache's manifest")


def _stage(module: str, *args: str) -> subprocess.CompletedProcess:
    return run_cli(module, list(args), timeout=300)


def test_precompute_refuses_train_options_naming_train(tmp_path):
    p = _stage("precompute", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d"), "--cache",
               str(tmp_path / "c"), "--learning_rate=1e-5", "--train_batch_size", "4", "--output_dir",
               str(tmp_path / "o"), "--push_to_hub")
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and p.stdout == ""
    assert p.stderr.splitlines() == [
        f"Error: --learning_rate {_BELONGS_TO_TRAIN}", f"--train_batch_size {_BELONGS_TO_TRAIN}",
        f"--output_dir {_BELONGS_TO_TRAIN}", f"--push_to_hub {_BELONGS_TO_TRAIN}"]
    assert not (tmp_path / "c").exists() and not (tmp_path / "o").exists()


def test_train_refuses_resolution_as_fixed_at_precompute(tmp_path):
    p = _stage("train", "--model", str(tmp_path / "m"), "--cache", str(tmp_path / "c"), "--output-dir",
               str(tmp_path / "o"), "--resolution", "1024", "--max-steps", "2")
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and p.stdout == ""
    assert p.stderr.splitlines() == [f"Error: --resolution {_FIXED_AT_PRECOMPUTE}"]
    assert not (tmp_path / "o").exists()
