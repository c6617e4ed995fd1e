"""precompute.encoders: the math must be exactly diffusers' (encode_prompt, latent_dist * scale).

Everything runs on the tiny SDXL from conftest; the encoder classes get in-memory modules (no
files), `load_encoders` gets the folder.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from precompute.encoders import (
    EncoderError,
    LatentEncoder,
    ModelLoadError,
    NonFiniteLatentError,
    PromptEncoder,
    check_model_sources,
    load_encoders,
    module_fingerprint,
    tokenizer_fingerprint,
)

PROMPTS = [
    "red circle with blue background",
    "",
    "photo of a cat on the grass, high quality",
    # far past 77 tokens: SDXL truncates, and so must we
    " ".join(["a small red circle with a thick outline on a pale background"] * 12),
]


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(tiny_model))


def _prompt_encoder(pipe, dtype=torch.float32) -> PromptEncoder:
    return PromptEncoder(pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2, dtype=dtype)


def _reference(pipe, prompt):
    pe, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    return pe, pooled


def test_prompt_embeddings_equal_encode_prompt(pipe):
    enc = _prompt_encoder(pipe)
    pe, pooled = enc(PROMPTS)
    te, te2 = pipe.text_encoder.config, pipe.text_encoder_2.config
    assert pe.shape == (len(PROMPTS), 77, te.hidden_size + te2.hidden_size)
    assert pooled.shape == (len(PROMPTS), te2.projection_dim)
    assert pe.dtype == pooled.dtype == torch.float32
    # The same batch through diffusers: bit-identical.
    ref_pe, ref_pooled = _reference(pipe, PROMPTS)
    assert torch.equal(pe, ref_pe)
    assert torch.equal(pooled, ref_pooled)
    # One prompt at a time (another batch shape, so allow float noise only).
    for i, prompt in enumerate(PROMPTS):
        one_pe, one_pooled = _reference(pipe, prompt)
        torch.testing.assert_close(pe[i : i + 1], one_pe, rtol=0, atol=1e-6)
        torch.testing.assert_close(pooled[i : i + 1], one_pooled, rtol=0, atol=1e-6)
    # Different prompts give different embeddings (the test would be vacuous otherwise).
    assert not torch.allclose(pe[0], pe[2])


def test_overlong_prompt_is_truncated_like_sdxl(pipe):
    enc = _prompt_encoder(pipe)
    long = PROMPTS[3]
    counts = enc.token_counts(PROMPTS)
    assert counts[3] > 77 and all(n <= 77 for n in counts[:3])
    assert [n > enc.info.max_length for n in counts] == [False, False, False, True]
    # What survives truncation is all the encoders see: cutting the text itself changes nothing.
    ids = pipe.tokenizer(long, truncation=True, max_length=77).input_ids[1:-1]
    cut = pipe.tokenizer.decode(ids)
    a, b = enc([long]), enc([cut])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_prompt_encoder_bf16_returns_fp32_close_to_fp32(tiny_model):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    parts = [
        CLIPTokenizer.from_pretrained(str(tiny_model), subfolder="tokenizer"),
        CLIPTokenizer.from_pretrained(str(tiny_model), subfolder="tokenizer_2"),
        CLIPTextModel.from_pretrained(str(tiny_model), subfolder="text_encoder"),
        CLIPTextModelWithProjection.from_pretrained(str(tiny_model), subfolder="text_encoder_2"),
    ]
    ref = PromptEncoder(*parts)(PROMPTS[:1])
    out = PromptEncoder(*parts, dtype="bf16")(PROMPTS[:1])
    assert out[0].dtype == torch.float32 and parts[2].dtype == torch.bfloat16
    torch.testing.assert_close(out[0], ref[0], rtol=0.05, atol=0.05)


def _pixels(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_latent_moments_equal_vae_posterior(pipe):
    vae = pipe.vae
    x = _pixels()
    mean, std = LatentEncoder(vae)(x)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    sf = vae.config.scaling_factor
    assert sf == 0.13025
    assert mean.shape == std.shape == (2, vae.config.latent_channels, 8, 8)
    assert torch.equal(mean, dist.mean * sf)
    assert torch.equal(std, dist.std * sf)
    assert (std > 0).all() and not torch.equal(mean[0], mean[1])


def test_latent_shift_factor_applied_before_scaling(pipe):
    from diffusers import AutoencoderKL

    shifted = AutoencoderKL.from_config({**pipe.vae.config, "shift_factor": 0.25, "scaling_factor": 1.5})
    shifted.load_state_dict(pipe.vae.state_dict())
    x = _pixels(1, seed=1)
    mean, std = LatentEncoder(shifted)(x)
    with torch.no_grad():
        dist = shifted.encode(x).latent_dist
    torch.testing.assert_close(mean, (dist.mean - 0.25) * 1.5, rtol=0, atol=1e-6)
    torch.testing.assert_close(std, dist.std * 1.5, rtol=0, atol=1e-6)


def test_non_finite_latents_raise_with_the_fix(pipe):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_config(pipe.vae.config)
    vae.load_state_dict(pipe.vae.state_dict())
    with torch.no_grad():
        # The weights stay below fp16's 65504, the activations of a textured image go beyond it (as
        # SDXL's VAE does on some images); a flat mid-grey one (all 0: conv_in gives its bias) is fine.
        vae.encoder.conv_in.weight.mul_(1e5)
    x = torch.cat([torch.zeros_like(_pixels(1)), _pixels(1), torch.zeros_like(_pixels(1))])
    enc = LatentEncoder(vae, dtype="fp16")
    mean, std, finite = enc.encode(x)
    assert finite.tolist() == [True, False, True] and finite.device.type == "cpu"
    assert torch.isfinite(mean[[0, 2]]).all() and torch.isfinite(std[[0, 2]]).all()
    assert not (torch.isfinite(mean[1]).all() and torch.isfinite(std[1]).all())
    with pytest.raises(NonFiniteLatentError) as err:
        enc(x)
    assert isinstance(err.value, EncoderError) and err.value.bad == [1]
    assert "image(s) [1] of a batch of 3" in str(err.value)
    assert "--vae-dtype fp32" in str(err.value) and "madebyollin/sdxl-vae-fp16-fix" in str(err.value)


def test_encode_dtypes_by_name_tf32_is_fp32_weights(pipe):
    """fp32 and tf32 hold fp32 weights (tf32 only allows TensorFloat-32 math on a CUDA GPU: on a
    CPU the two encode bit-identically); bf16 and fp16 encode in half precision and return fp32
    moments close to fp32's."""
    import copy

    from precompute.encoders import compute_dtype

    assert compute_dtype("tf32") == (torch.float32, True) and compute_dtype("fp32") == (torch.float32, False)
    assert compute_dtype("bf16") == (torch.bfloat16, False) and compute_dtype(torch.float16) == (torch.float16, False)
    with pytest.raises(ValueError):
        compute_dtype("int8")
    x = _pixels(2, seed=3)
    encoded = {}
    for name in ("fp32", "tf32", "bf16", "fp16"):
        enc = LatentEncoder(copy.deepcopy(pipe.vae), dtype=name)
        assert enc.dtype_name == name and enc.vae.dtype == compute_dtype(name)[0]
        encoded[name] = enc(x)
    assert all(torch.equal(a, b) for a, b in zip(encoded["fp32"], encoded["tf32"]))
    for name in ("bf16", "fp16"):
        assert encoded[name][0].dtype == torch.float32
        torch.testing.assert_close(encoded[name][0], encoded["fp32"][0], rtol=0.05, atol=0.02)


def test_latent_encoder_rejects_sizes_off_the_vae_grid(pipe):
    with pytest.raises(ValueError, match="multiple of the VAE factor 8"):
        LatentEncoder(pipe.vae)(_pixels(1, size=60))


def test_load_encoders_matches_pipeline_and_fingerprints(tiny_model, pipe):
    latent, prompt, ident = load_encoders(str(tiny_model))
    assert ident["model"] == str(tiny_model) and ident["vae"] is None
    assert ident["vae_fingerprint"] == module_fingerprint(pipe.vae)
    assert ident["text_encoder_fingerprint"] == module_fingerprint(pipe.text_encoder)
    assert ident["text_encoder_2_fingerprint"] == module_fingerprint(pipe.text_encoder_2)
    assert len({ident["vae_fingerprint"], ident["text_encoder_fingerprint"], ident["text_encoder_2_fingerprint"]}) == 3
    assert ident["tokenizer_fingerprint"] == tokenizer_fingerprint(pipe.tokenizer)
    assert ident["tokenizer_2_fingerprint"] == tokenizer_fingerprint(pipe.tokenizer_2)
    # Same vocabulary and merges, another pad token (SDXL's tokenizer_2 pads with "!").
    assert ident["tokenizer_fingerprint"] != ident["tokenizer_2_fingerprint"]
    assert (latent.info.channels, latent.info.vae_scale_factor, latent.info.shift_factor) == (4, 8, None)
    assert (prompt.info.max_length, prompt.info.prompt_dim, prompt.info.pooled_dim) == (77, 64, 32)
    ref = _reference(pipe, PROMPTS[:2])
    out = prompt(PROMPTS[:2])
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_load_encoders_vae_override_and_changed_weights(tiny_model, tmp_path):
    """--vae takes a VAE folder; one changed weight changes that fingerprint and only that one."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(tiny_model), subfolder="vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.5)  # the decoder: precompute never runs it, identity still sees it
    vae.save_pretrained(tmp_path / "other-vae")
    _, _, base = load_encoders(str(tiny_model))
    _, _, other = load_encoders(str(tiny_model), vae=str(tmp_path / "other-vae"))
    assert other["vae"] == str(tmp_path / "other-vae")
    assert other["vae_fingerprint"] != base["vae_fingerprint"]
    assert other["text_encoder_fingerprint"] == base["text_encoder_fingerprint"]
    assert other["text_encoder_2_fingerprint"] == base["text_encoder_2_fingerprint"]


def test_unreadable_model_folder_names_everything_missing(tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "text_encoder_2" / "config.json").unlink()
    for f in (broken / "tokenizer").iterdir():
        f.unlink()
    for f in (broken / "vae").glob("*.safetensors"):
        f.unlink()
    problems = check_model_sources(str(broken))
    assert f"{broken}/text_encoder_2: no config.json" in problems
    assert any(p.startswith(f"{broken}/tokenizer: no tokenizer files") for p in problems)
    assert any(p.startswith(f"{broken}/vae: no weights") for p in problems)
    assert len(problems) == 3
    with pytest.raises(ModelLoadError) as err:
        load_encoders(str(broken))
    assert "text_encoder_2: no config.json" in str(err.value) and "vae: no weights" in str(err.value)
    # A path that does not exist, and a --vae folder without config.json.
    (tmp_path / "empty-vae").mkdir()
    problems = check_model_sources(str(tmp_path / "nope" / "model"), vae=str(tmp_path / "empty-vae"))
    assert problems == [
        f"--model {tmp_path / 'nope' / 'model'}: no such folder",
        f"{tmp_path / 'empty-vae'}: no config.json",
        f"{tmp_path / 'empty-vae'}: no weights (*.safetensors or *.bin)",
    ]
    # A variant that is not there.
    assert f"{tiny_model}/text_encoder: no weights for variant 'fp16' (files: model.safetensors)" in check_model_sources(
        str(tiny_model), variant="fp16"
    )


def test_a_hub_id_that_cannot_be_fetched_says_it_was_looked_up_on_the_hub():
    # The suite runs with HF_HUB_OFFLINE=1, so this fails at once, as an unreachable hub would.
    with pytest.raises(ModelLoadError) as err:
        load_encoders("no-such-org/no-such-sdxl")
    message = str(err.value)
    assert message.startswith("cannot load no-such-org/no-such-sdxl/vae")
    assert "'no-such-org/no-such-sdxl' is not a local folder, so it was looked up as a hub id" in message


def test_tokenizer_fingerprint_names_what_decides_the_ids(tiny_model, tmp_path):
    """Re-saving a tokenizer elsewhere keeps its fingerprint; another pad token, special token,
    model_max_length or one merge fewer each change it."""
    from transformers import CLIPTokenizer

    def load(folder=tiny_model / "tokenizer_2"):
        return CLIPTokenizer.from_pretrained(folder)

    tok = load()
    base = tokenizer_fingerprint(tok)
    tok(["a prompt"], padding="max_length", max_length=77, truncation=True)  # using it changes nothing
    assert tokenizer_fingerprint(tok) == base
    load().save_pretrained(tmp_path / "copy")
    assert tokenizer_fingerprint(load(tmp_path / "copy")) == base
    changed = []
    for change in (
        lambda t: setattr(t, "pad_token", t.eos_token),
        lambda t: setattr(t, "model_max_length", 64),
        lambda t: t.add_special_tokens({"additional_special_tokens": ["<extra>"]}),
    ):
        tok = load()
        change(tok)
        changed.append(tokenizer_fingerprint(tok))
    assert len({base, *changed}) == 4
    # One merge fewer (built from vocab.json + merges.txt, as a slow-tokenizer folder is).
    merges = (tiny_model / "tokenizer_2" / "merges.txt").read_text().splitlines()
    for name, kept in (("all", merges), ("fewer", merges[:-1])):
        (tmp_path / name).mkdir()
        for f in ("vocab.json", "tokenizer_config.json"):
            shutil.copy(tiny_model / "tokenizer_2" / f, tmp_path / name / f)
        (tmp_path / name / "merges.txt").write_text("\n".join(kept) + "\n")
    assert tokenizer_fingerprint(load(tmp_path / "all")) != tokenizer_fingerprint(load(tmp_path / "fewer"))


def test_fingerprint_ignores_load_bookkeeping(tiny_model, tmp_path):
    """Re-saving a module elsewhere (other _name_or_path) keeps its fingerprint."""
    from transformers import CLIPTextModel

    te = CLIPTextModel.from_pretrained(str(tiny_model), subfolder="text_encoder")
    te.save_pretrained(tmp_path / "te")
    again = CLIPTextModel.from_pretrained(str(tmp_path / "te"))
    assert module_fingerprint(again) == module_fingerprint(te)


@pytest.mark.slow
def test_compiled_vae_encodes_what_the_eager_one_does(pipe):
    """--compile-vae: the VAE's encoder compiled in place (inductor; gcc on a CPU), same moments
    to float tolerance, the same module (its fingerprint is taken before and is unaffected)."""
    import copy

    x = _pixels(2, seed=4)
    eager = LatentEncoder(copy.deepcopy(pipe.vae))(x)
    compiled_encoder = LatentEncoder(copy.deepcopy(pipe.vae), compile=True)
    compiled = compiled_encoder(x)
    assert compiled_encoder.vae.encoder._compiled_call_impl is not None
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_tokenizers_that_do_not_fit_the_text_encoders_are_one_message_naming_the_model(tiny_model, tmp_path):
    """A model folder whose tokenizer_config.json lacks model_max_length, or whose two tokenizers
    disagree, or pad past the text encoder's positions: one ModelLoadError naming the model and
    each problem (it was a ValueError or OverflowError traceback)."""
    import json
    import shutil

    from precompute.encoders import load_encoders
    from precompute.errors import ModelLoadError

    cases = {
        "unset": {"tokenizer": None, "tokenizer_2": None},
        "disagree": {"tokenizer_2": 64},
        "too-long": {"tokenizer": 100, "tokenizer_2": 100},
    }
    messages = {}
    for name, lengths in cases.items():
        model = tmp_path / name
        shutil.copytree(tiny_model, model)
        for sub, length in lengths.items():
            config_file = model / sub / "tokenizer_config.json"
            config = json.loads(config_file.read_text())
            config.pop("model_max_length", None)
            if length is not None:
                config["model_max_length"] = length
            config_file.write_text(json.dumps(config))
        with pytest.raises(ModelLoadError) as err:
            load_encoders(str(model))
        messages[name] = str(err.value)
        assert messages[name].startswith(f"{model}: its tokenizers do not fit its text encoders:\n  - ")
    positions = 77  # the tiny model's text encoders, as SDXL's
    assert (f"tokenizer: model_max_length is not set in its tokenizer_config.json; set it to {positions} (its text "
            "encoder's max_position_embeddings; SDXL's is 77)") in messages["unset"]
    assert "tokenizer and tokenizer_2 disagree on model_max_length (77 and 64)" in messages["disagree"]
    assert "tokenizer_2: model_max_length 100 is more than the 77 positions its text encoder has" in messages["too-long"]
