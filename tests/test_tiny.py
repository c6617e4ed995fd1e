"""precompute.tiny: the offline tiny SDXL keeps SDXL's conventions and loads in both pipelines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from precompute.buckets import model_granularity, vae_scale_factor
from precompute.fill import PALETTE
from precompute.tiny import build_tiny_sdxl, main
from train.step import adapter_kwargs_for

SDXL = Path(__file__).parent / "assets" / "sdxl-base-1.0"  # SDXL base 1.0's real configs
SDXL_SCHEDULER = {
    # SDXL base 1.0's scheduler_config.json. The shared copy is compared too when present.
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}
SDXL_UNET_CONFIG = {  # the parts of SDXL base 1.0's unet/config.json adapter_kwargs_for reads
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
}
SDXL_ADAPTER = {  # TencentARC's SDXL adapters and diffusers' training script
    "in_channels": 3, "channels": [320, 640, 1280, 1280], "num_res_blocks": 2,
    "downscale_factor": 16, "adapter_type": "full_adapter_xl",
}
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def _config(model: Path, component: str, name: str = "config.json") -> dict:
    return json.loads((model / component / name).read_text())


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_model)


def test_folder_is_a_diffusers_sdxl_pipeline(tiny_model):
    index = json.loads((tiny_model / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["tokenizer"] == index["tokenizer_2"] == ["transformers", "CLIPTokenizer"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    for component in COMPONENTS:
        assert (tiny_model / component).is_dir(), component
    for component in ("unet", "vae"):
        assert (tiny_model / component / "diffusion_pytorch_model.safetensors").is_file()
    for component in ("text_encoder", "text_encoder_2"):
        assert (tiny_model / component / "model.safetensors").is_file()
    for component in ("tokenizer", "tokenizer_2"):
        # The raw BPE files ship too, so older transformers (slow CLIPTokenizer) can load them.
        assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in (tiny_model / component).iterdir()}
    assert not list(tiny_model.rglob("*.bin")) and not list(tiny_model.rglob("*.pt*")), "no pickle files"


def test_configs_follow_sdxl_conventions(tiny_model):
    unet = _config(tiny_model, "unet")
    te = _config(tiny_model, "text_encoder")
    te2 = _config(tiny_model, "text_encoder_2")
    vae = _config(tiny_model, "vae")

    assert unet["cross_attention_dim"] == te["hidden_size"] + te2["hidden_size"] == 64
    assert unet["addition_embed_type"] == "text_time"
    assert unet["projection_class_embeddings_input_dim"] == unet["addition_time_embed_dim"] * 6 + te2["projection_dim"]
    assert unet["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert unet["up_block_types"] == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert unet["mid_block_type"] == "UNetMidBlock2DCrossAttn"
    assert unet["in_channels"] == unet["out_channels"] == vae["latent_channels"] == 4
    # Not SDXL's widths: code under test must read dimensions from configs.
    assert unet["cross_attention_dim"] != 2048 and te2["projection_dim"] != 1280

    assert vae["scaling_factor"] == 0.13025
    assert vae_scale_factor(vae["block_out_channels"]) == 8 and len(vae["block_out_channels"]) == 4
    assert vae["force_upcast"] is True
    assert unet["sample_size"] * vae_scale_factor(vae["block_out_channels"]) == 64  # pipelines default to 64 px

    vocab = json.loads((tiny_model / "tokenizer" / "vocab.json").read_text())
    for cfg in (te, te2):
        assert cfg["vocab_size"] == len(vocab)
        assert cfg["max_position_embeddings"] == 77
        assert cfg["eos_token_id"] == vocab["<|endoftext|>"] and cfg["bos_token_id"] == vocab["<|startoftext|>"]
    assert te2["pad_token_id"] == vocab["!"]


def test_scheduler_is_sdxl_euler(tiny_model):
    from diffusers import EulerDiscreteScheduler

    ours = _config(tiny_model, "scheduler", "scheduler_config.json")
    assert ours.pop("_class_name") == "EulerDiscreteScheduler"
    ours.pop("_diffusers_version")
    shared = SDXL / "scheduler" / "scheduler_config.json"
    references = [SDXL_SCHEDULER] + ([json.loads(shared.read_text())] if shared.is_file() else [])
    for reference in references:
        reference = {k: v for k, v in reference.items() if not k.startswith("_")}
        # Every SDXL key with SDXL's value; extra keys only where diffusers adds its defaults.
        assert {k: ours[k] for k in reference} == reference
    sched = EulerDiscreteScheduler.from_pretrained(tiny_model, subfolder="scheduler")
    assert sched.config.prediction_type == "epsilon" and sched.config.timestep_spacing == "leading"
    # scaled_linear betas 0.00085 .. 0.012 over 1000 steps give SDXL's max sigma of ~14.61.
    assert float(sched.sigmas.max()) == pytest.approx(14.6146, abs=1e-3)


def test_tokenizers_pad_as_sdxl(pipe):
    tok, tok2 = pipe.tokenizer, pipe.tokenizer_2
    assert tok.pad_token == "<|endoftext|>" and tok2.pad_token == "!"
    assert tok.model_max_length == tok2.model_max_length == 77
    prompt = "red circle with blue background"
    ids = tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    ids2 = tok2(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == len(ids2) == 77
    words = prompt.split()
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert ids[: len(words) + 2] == ids2[: len(words) + 2]
    assert ids[0] == bos and ids[len(words) + 1] == eos
    assert set(ids[len(words) + 2 :]) == {eos}
    assert set(ids2[len(words) + 2 :]) == {tok2.convert_tokens_to_ids("!")}
    assert tok2.convert_tokens_to_ids("!") != eos
    # Over-long prompts are cut to 77 with the eos kept last, as CLIP does.
    long_ids = tok(" ".join(["red"] * 200), padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long_ids) == 77 and long_ids[-1] == eos


def test_fill_prompts_tokenize_to_whole_words(pipe):
    """Every colour name and the fill template are single tokens, so captions embed sensibly."""
    for name in PALETTE:
        prompt = f"{name} circle with {name} background"
        tokens = pipe.tokenizer.tokenize(prompt)
        assert tokens == [w + "</w>" for w in prompt.split()], (prompt, tokens)
    # Unknown words still tokenize (byte-level fallback), never to the unknown token.
    tokens = pipe.tokenizer.tokenize("zebra ÄÖ 123")
    assert tokens and pipe.tokenizer.unk_token not in tokens


def test_pooled_embedding_taken_at_eos(pipe):
    """text_encoder_2 must pool at the eos token, so its config must carry the real eos id."""
    ids = pipe.tokenizer_2(
        ["red circle", "blue circle with red background"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    enc = pipe.text_encoder_2
    with torch.no_grad():
        out = enc(ids, output_hidden_states=True)
        eos_pos = (ids == pipe.tokenizer_2.eos_token_id).int().argmax(dim=1)
        expected = enc.text_projection(out.last_hidden_state[torch.arange(2), eos_pos])
    assert eos_pos.tolist() == [3, 6]
    torch.testing.assert_close(out.text_embeds, expected)
    assert out.text_embeds.shape == (2, 32)
    # hidden_states[-2] (what SDXL concatenates) is a real transformer layer, not the embeddings.
    assert len(out.hidden_states) == enc.config.num_hidden_layers + 1 >= 3


def test_same_seed_same_bytes_other_seed_other_weights(tiny_model, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, [str(tmp_path / "again"), "--seed", "0"])
    assert result.exit_code == 0, result.output
    assert "tiny SDXL written to" in result.output
    assert _files(tmp_path / "again") == _files(tiny_model)

    other = build_tiny_sdxl(tmp_path / "seed1", seed=1)
    ours, theirs = _files(tiny_model), _files(other)
    assert ours.keys() == theirs.keys()
    weights = [name for name in ours if name.endswith(".safetensors")]
    assert len(weights) == 4
    for name in weights:
        assert ours[name] != theirs[name], name
    for name in set(ours) - set(weights):
        assert ours[name] == theirs[name], f"{name}: configs and tokenizers do not depend on the seed"


def test_build_leaves_the_global_torch_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_sdxl(tmp_path / "m", seed=5)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)
    # Re-running over its own earlier output replaces it (what a repeated `make` does).
    first = _files(tmp_path / "m")
    build_tiny_sdxl(tmp_path / "m", seed=5)
    assert _files(tmp_path / "m") == first
    assert [p.name for p in tmp_path.iterdir()] == ["m"], "no temporary folder left behind"


def test_build_replaces_its_own_output_but_refuses_other_folders(tmp_path):
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="precious"):
        build_tiny_sdxl(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["precious"], "no temporary folder left behind"


def test_sdxl_pipeline_renders(pipe):
    out = pipe(
        "red circle with blue background",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (1, 64, 64, 3)
    assert np.isfinite(out).all() and 0.0 <= out.min() and out.max() <= 1.0


def test_adapter_kwargs_for_sdxl_gives_sdxl_adapter():
    assert adapter_kwargs_for(SDXL_UNET_CONFIG, 8) == SDXL_ADAPTER
    for name in ("unet/config.json", "adapter/config.json"):
        if not (SDXL / name).is_file():
            return
    real_unet = json.loads((SDXL / "unet" / "config.json").read_text())
    real_vae = json.loads((SDXL / "vae" / "config.json").read_text())
    real_adapter = json.loads((SDXL / "adapter" / "config.json").read_text())
    real_adapter.pop("_class_name")
    assert adapter_kwargs_for(real_unet, vae_scale_factor(real_vae["block_out_channels"])) == real_adapter == SDXL_ADAPTER


def test_adapter_features_all_reach_the_tiny_unet(pipe):
    """All four adapter maps are consumed (diffusers silently drops a mid-block map of the wrong shape)."""
    from diffusers import T2IAdapter

    kwargs = adapter_kwargs_for(dict(pipe.unet.config), vae_scale_factor(pipe.vae.config.block_out_channels))
    assert kwargs == {
        "in_channels": 3, "channels": [32, 64, 64, 64], "num_res_blocks": 2,
        "downscale_factor": 16, "adapter_type": "full_adapter_xl",
    }
    torch.manual_seed(0)
    adapter = T2IAdapter(**kwargs)
    cond = torch.rand(1, 3, 64, 64)
    latents = torch.randn(1, 4, 8, 8)
    context = {
        "encoder_hidden_states": torch.randn(1, 77, pipe.unet.config.cross_attention_dim),
        "added_cond_kwargs": {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])},
    }
    with torch.no_grad():
        features = adapter(cond)
        assert [tuple(f.shape) for f in features] == [(1, 32, 4, 4), (1, 64, 4, 4), (1, 64, 2, 2), (1, 64, 2, 2)]
        residuals = [f * 10 for f in features]
        plain = pipe.unet(latents, 500, **context).sample
        # Perturbing only the last (mid-block) map must change the output: it was used.
        mid_only = [torch.zeros_like(f) for f in features[:3]] + [residuals[3]]
        with_mid = pipe.unet(latents, 500, down_intrablock_additional_residuals=mid_only, **context).sample
        pending = list(residuals)
        with_all = pipe.unet(latents, 500, down_intrablock_additional_residuals=pending, **context).sample
    assert pending == [], "the UNet left adapter maps unused"
    assert not torch.allclose(plain, with_mid) and not torch.allclose(plain, with_all)


def test_adapter_pipeline_renders(tiny_model):
    from diffusers import StableDiffusionXLAdapterPipeline, T2IAdapter

    unet = _config(tiny_model, "unet")
    vae = _config(tiny_model, "vae")
    torch.manual_seed(0)
    adapter = T2IAdapter(**adapter_kwargs_for(unet, vae_scale_factor(vae["block_out_channels"])))
    pipe = StableDiffusionXLAdapterPipeline.from_pretrained(tiny_model, adapter=adapter)
    cond = Image.new("RGB", (64, 64))
    out = pipe(
        "red circle with blue background",
        image=cond,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_precompute_granularity_is_the_adapters_coarsest_stride(pipe):
    """The derivation the module docstring gives, as behaviour: downscale_factor = 2 x the VAE
    factor, and the side granularity precompute validates --resolution and buckets against is
    the coarsest stride at which train's UNet takes adapter features, 2 x downscale_factor
    (32 px for SDXL and for the tiny model alike)."""
    from train.step import unet_residual_shapes

    for unet, vae_blocks in ((dict(pipe.unet.config), pipe.vae.config.block_out_channels),
                             (SDXL_UNET_CONFIG, [128, 256, 512, 512])):
        f = vae_scale_factor(vae_blocks)
        kwargs = adapter_kwargs_for(unet, f)
        down, mid = unet_residual_shapes(unet, f)
        coarsest = max(s.stride for s in down + ([mid] if mid else []))
        assert (f, kwargs["downscale_factor"]) == (8, 16)
        assert model_granularity(f, len(unet["down_block_types"])) == coarsest == 2 * kwargs["downscale_factor"] == 32
