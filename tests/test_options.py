"""shards.options and shards.hub: generated options, config files, the reference's spellings; folder or hub id.

A toy config class stands in for the stages' (their own CLIs are tested in their test files),
so each rule is seen on its own: underscore spellings, multi-value options, --config precedence
and unknown keys, the other stage's options refused by name, no-effect options noted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import click
import pytest
from click.testing import CliRunner

from shards.hub import locate, vae_location
from shards.options import Foreign, config_command, load_config_file, setting


@dataclass
class Toy:
    model: str = setting("", "The model.", "g", required=True, aliases=["--pretrained-model-name-or-path"])
    batch_size: int = setting(4, "Batch.", "g", aliases=["--train-batch-size"])
    rate: float = setting(1e-5, "Rate.", "g")
    mode: str = setting("a", "Mode.", "g", choices=("a", "b"))
    flag: bool = setting(False, "A flag.", "g")
    image: tuple[str, ...] = setting((), "Images.", "g", multiple=True)
    maybe: int | None = setting(None, "Optional.", "g")


FOREIGN = {
    "resolution": Foreign("is fixed at precompute: the cache holds one resolution"),
    "xformers": Foreign("SDPA is used", takes_value=False, accepted=True),
    "tokenizer_name": Foreign("MODEL's tokenizers are used", accepted=True),
}


@config_command(Toy, name="toy", foreign=FOREIGN, sections={"resolved": None})
def toy(config, **kw):
    click.echo(json.dumps(kw, sort_keys=True))


def run(*args):
    result = CliRunner().invoke(toy, list(args))
    return result


def values(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def test_underscore_spellings_aliases_and_multi_value_forms():
    got = values(run("--pretrained_model_name_or_path=m", "--train_batch_size", "8", "--flag", "--image", "a.png",
                     "b.png", "--rate=0.5", "--image=c.png"))
    assert got == {"model": "m", "batch_size": 8, "rate": 0.5, "mode": "a", "flag": True,
                   "image": ["a.png", "b.png", "c.png"], "maybe": None}
    # A negative number after a multi-value option is a value, not an option.
    assert values(run("--model", "m", "--image", "-1", "x"))["image"] == ["-1", "x"]
    assert values(run("--model", "m", "--batch-size", "2"))["batch_size"] == 2


def test_the_other_stages_options_are_refused_by_name_and_no_effect_ones_noted():
    result = run("--model", "m", "--resolution", "1024")
    assert result.exit_code == 2
    assert "--resolution is fixed at precompute: the cache holds one resolution" in result.output
    result = run("--model", "m", "--resolution=512")
    assert result.exit_code == 2 and "--resolution is fixed at precompute" in result.output
    result = CliRunner().invoke(toy, ["--model", "m", "--xformers", "--tokenizer_name", "t", "--batch-size", "3"])
    assert result.exit_code == 0, result.output
    assert "note: --xformers has no effect here: SDPA is used" in result.output
    assert "note: --tokenizer_name has no effect here: MODEL's tokenizers are used" in result.output
    assert json.loads(result.output.strip().splitlines()[-1])["batch_size"] == 3  # its value was consumed


def test_a_no_effect_setting_in_a_config_file_is_noted_as_on_the_command_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('model = "m"\nxformers = true\n')
    result = CliRunner().invoke(toy, ["--config", str(path)])
    assert result.exit_code == 0, result.output
    assert f"note: xformers in {path} has no effect here: SDPA is used" in result.output


@pytest.mark.parametrize("suffix", [".toml", ".yaml", ".json"])
def test_config_files_give_defaults_the_command_line_overrides(tmp_path, suffix):
    data = {"model": "from-file", "batch-size": 16, "image": ["x.png", "y.png"], "flag": True, "maybe": 3}
    path = tmp_path / f"c{suffix}"
    if suffix == ".toml":
        path.write_text('model = "from-file"\nbatch-size = 16\nimage = ["x.png", "y.png"]\nflag = true\nmaybe = 3\n')
    elif suffix == ".yaml":
        path.write_text("model: from-file\nbatch-size: 16\nimage: [x.png, y.png]\nflag: true\nmaybe: 3\n")
    else:
        path.write_text(json.dumps(data))
    got = values(run("--config", str(path)))
    assert got == {"model": "from-file", "batch_size": 16, "rate": 1e-5, "mode": "a", "flag": True,
                   "image": ["x.png", "y.png"], "maybe": 3}
    got = values(run("--config", str(path), "--batch_size", "2", "--model", "cli"))
    assert (got["batch_size"], got["model"], got["image"]) == (2, "cli", ["x.png", "y.png"])


def test_config_file_errors_name_the_file_and_every_unknown_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\nbogus: 1\nalso_bogus: 2\n")
    result = run("--config", str(bad))
    assert result.exit_code == 2
    assert str(bad) in result.output and "also_bogus, bogus" in result.output
    broken = tmp_path / "broken.toml"
    broken.write_text("model = [\n")
    result = run("--config", str(broken))
    assert result.exit_code == 2 and "cannot parse" in result.output
    result = run("--config", str(tmp_path / "missing.json"))
    assert result.exit_code == 2 and "missing.json" in result.output
    wrong = tmp_path / "c.ini"
    wrong.write_text("x")
    assert "unknown config format" in run("--config", str(wrong)).output
    # A run's saved file: its `resolved` facts are not settings and are skipped.
    saved = tmp_path / "train_config.json"
    saved.write_text(json.dumps({"model": "m", "batch_size": 5, "resolved": {"world_size": 2}}))
    assert load_config_file(saved, Toy, sections={"resolved": None}) == {"model": "m", "batch_size": 5}
    assert values(run("--config", str(saved)))["batch_size"] == 5


def test_config_file_values_of_the_wrong_type_are_named_not_converted(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "m"\nbatch-size = 2.9\nrate = {a = 1}\nflag = 1\nimage = [["a"], "x.png"]\nmaybe = true\n')
    result = run("--config", str(bad))
    assert result.exit_code == 2 and "Traceback" not in result.output
    message = " ".join(result.output.split())
    for problem in ("batch-size must be a whole number, got 2.9", "rate must be a number, got {'a': 1}",
                    "flag must be true or false, got 1", "image must be a string or a list of them, got [['a'], 'x.png']",
                    "maybe must be a whole number, got True"):
        assert problem in message, (problem, message)
    # What is the same number, or a string the option itself converts, is taken as typed.
    fine = tmp_path / "fine.json"
    fine.write_text(json.dumps({"model": "m", "batch-size": 8.0, "rate": 1, "maybe": "5", "image": "one.png"}))
    got = values(run("--config", str(fine)))
    assert (got["batch_size"], got["rate"], got["maybe"], got["image"]) == (8, 1.0, 5, ["one.png"])
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"model": "m", "batch-size": "many"}))
    result = run("--config", str(typo))
    assert result.exit_code == 2 and "'many' is not a valid integer" in result.output


def test_a_config_file_naming_the_other_stages_setting_says_where_it_belongs(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('model = "m"\nresolution = 1024\nxformers = true\nbogus = 1\n')
    message = " ".join(run("--config", str(path)).output.split())
    assert "unknown setting(s) bogus; resolution is fixed at precompute: the cache holds one resolution" in message
    path.write_text('model = "m"\nxformers = true\n')  # the reference's, with no effect here: taken and dropped
    assert values(run("--config", str(path)))["model"] == "m"


def test_a_name_is_a_folder_or_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "file.bin").write_bytes(b"x")
    assert locate("models/tiny").kind == "folder" and locate("models/tiny").ref == str(tmp_path / "models/tiny")
    assert locate("stabilityai/stable-diffusion-xl-base-1.0").kind == "hub"
    assert locate("sdxl").kind == "hub"
    # org/name where a local folder `org` exists: a missing folder, never a hub lookup.
    loc = locate("models/tinny")
    assert loc.kind == "missing"
    assert loc.problem("--model") == (f"--model models/tinny: no such folder ({tmp_path / 'models'} is a local "
                                      "folder, so this names a folder in it, not a hub id)")
    for name in ("./x", "/abs/x", "~/x", "a/b/c"):
        assert locate(name).kind == "missing" and locate(name).problem("--vae").endswith("no such folder")
    assert locate("file.bin").problem("--model") == "--model file.bin: is a file, not a folder"
    # A VAE folder on its own, or a model folder holding vae/.
    (tmp_path / "vae-only").mkdir()
    (tmp_path / "vae-only" / "config.json").write_text("{}")
    (tmp_path / "models" / "tiny" / "vae").mkdir()
    (tmp_path / "models" / "tiny" / "vae" / "config.json").write_text("{}")
    assert vae_location("vae-only") == (str(tmp_path / "vae-only"), None)
    assert vae_location("models/tiny") == (str(tmp_path / "models/tiny"), "vae")
    assert vae_location("madebyollin/sdxl-vae-fp16-fix") == ("madebyollin/sdxl-vae-fp16-fix", None)


def test_config_files_take_the_aliases_and_stack_in_order(tmp_path):
    """A key may be any of the option's names (the reference's too), once; several --config files
    apply in order, each read and checked whole."""
    base = tmp_path / "base.toml"
    base.write_text('pretrained_model_name_or_path = "m"\ntrain_batch_size = 2\nrate = 0.5\n')
    override = tmp_path / "override.yaml"
    override.write_text("train-batch-size: 6\n")
    got = values(run("--config", str(base), "--config", str(override)))
    assert (got["model"], got["batch_size"], got["rate"]) == ("m", 6, 0.5)
    assert values(run("--config", str(base), "--config", str(override), "--batch-size", "7"))["batch_size"] == 7
    twice = tmp_path / "twice.toml"
    twice.write_text('model = "m"\nbatch_size = 2\ntrain_batch_size = 3\n')
    result = run("--config", str(twice))
    assert result.exit_code == 2 and "train_batch_size and batch_size are the same setting; give it once" in \
        " ".join(result.output.split())
    broken = tmp_path / "broken.toml"
    broken.write_text("model = [\n")
    result = run("--config", str(broken), "--config", str(base))  # an earlier file is read too
    assert result.exit_code == 2 and "broken.toml: cannot parse" in result.output


def test_the_other_stages_files_are_named_as_such(tmp_path):
    run_config = tmp_path / "train_config.json"
    run_config.write_text(json.dumps({"model": "m", "learning_rate": 1e-5, "resolved": {"world_size": 1}}))
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"config": {"resolution": 1024}, "shards": [], "identity": {}}))
    result = CliRunner().invoke(toy_without_sections, ["--config", str(run_config)])
    assert result.exit_code == 2 and "a training run's saved settings (train_config.json): give it to `python -m " \
        "train --config`" in " ".join(result.output.split())
    result = run("--config", str(manifest))
    assert result.exit_code == 2 and "a cache's manifest, which holds `python -m precompute`'s settings" in \
        " ".join(result.output.split())
    assert "unknown setting" not in result.output


@config_command(Toy, name="toy2")
def toy_without_sections(config, **kw):
    click.echo(json.dumps(kw, sort_keys=True))
