"""CLIP text encoder: parity with transformers' CLIPTextModel and diffusers' clip skip; config round trips."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from nanodiffusion.errors import UserError
from nanodiffusion.nets.clip_text import SD15_TEXT, TINY_TEXT, CLIPTextConfig, CLIPTextModel

# A small config with its own token ids (BOS 98, EOS 99) and an MLP width unlike the others.
SMALL = CLIPTextConfig(vocab_size=100, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=37,
                       max_positions=16, bos_token_id=98, eos_token_id=99, pad_token_id=99)

# SD v1.x's text_encoder/config.json as published (transformers 4.22), stale eos_token_id 2 included.
SD15_CONFIG_JSON = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
    "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0, "initializer_range": 0.02,
    "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768,
    "torch_dtype": "float32", "transformers_version": "4.22.0.dev0", "vocab_size": 49408,
}


def reference_model(config: CLIPTextConfig):
    """transformers' CLIPTextModel (eager attention), all weights random, LayerNorms too (seed 0, fp32)."""
    transformers = pytest.importorskip("transformers")
    reference_config = transformers.CLIPTextConfig(**config.to_transformers_config(),
                                                   attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(reference_config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def file_keys(reference) -> dict[str, torch.Tensor]:
    """The reference's state dict keyed as in a diffusers `text_encoder/` file."""
    # transformers >= 5 drops the `text_model.` prefix inside CLIPTextModel; the files (and we) keep it.
    return {key if key.startswith("text_model.") else f"text_model.{key}": value
            for key, value in reference.state_dict().items()}


def ours_from(reference, config: CLIPTextConfig) -> CLIPTextModel:
    """Our model with the reference's weights, loaded strictly."""
    state = file_keys(reference)
    model = CLIPTextModel(config).eval()
    model.load_state_dict(state, strict=True)
    return model


def token_ids(config: CLIPTextConfig, eos_positions: list[int], seed: int = 1) -> torch.Tensor:
    """(B, max_positions) random ids below BOS, each row BOS, words, EOS at its position, then EOS padding."""
    generator = torch.Generator().manual_seed(seed)
    shape = (len(eos_positions), config.max_positions)
    ids = torch.randint(0, config.bos_token_id, shape, generator=generator)
    ids[:, 0] = config.bos_token_id
    for row, position in enumerate(eos_positions):
        ids[row, position:] = config.eos_token_id
    return ids


def test_matches_transformers():
    reference = reference_model(SMALL)
    ours = ours_from(reference, SMALL)
    ids = token_ids(SMALL, [3, 9, 15])
    with torch.no_grad():
        expected, got = reference(ids), ours(ids)
    assert (got.hidden_states - expected.last_hidden_state).abs().max() <= 1e-5
    assert (got.pooled - expected.pooler_output).abs().max() <= 1e-5


def test_clip_skip_matches_diffusers_recipe():
    """diffusers' encode_prompt(clip_skip=k-1) takes hidden_states[-(k-1) - 1] through final_layer_norm.

    (diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion.py, `encode_prompt`; importing diffusers
    here would take longer than every other test together, so its two lines are restated.)
    """
    reference = reference_model(SMALL)
    ours = ours_from(reference, SMALL)
    ids = token_ids(SMALL, [4, 15])
    with torch.no_grad():
        hidden_states = reference(ids, output_hidden_states=True).hidden_states    # embeddings + each layer
        for clip_skip in range(1, SMALL.num_layers + 1):
            diffusers_clip_skip = clip_skip - 1
            expected = reference.final_layer_norm(hidden_states[-(diffusers_clip_skip + 1)])
            got = ours(ids, clip_skip=clip_skip)
            assert (got.hidden_states - expected).abs().max() <= 1e-5
            assert torch.equal(got.pooled, got.hidden_states[torch.arange(2), torch.tensor([4, 15])])


def test_attention_mask_matches_transformers():
    reference = reference_model(SMALL)
    ours = ours_from(reference, SMALL)
    ids = token_ids(SMALL, [3, 9, 15])
    mask = (torch.arange(SMALL.max_positions) <= torch.tensor([3, 9, 15])[:, None]).long()   # 0 after the EOS
    with torch.no_grad():
        expected, got = reference(ids, attention_mask=mask), ours(ids, attention_mask=mask)
    assert (got.hidden_states - expected.last_hidden_state).abs().max() <= 1e-5
    assert (got.pooled - expected.pooler_output).abs().max() <= 1e-5


def test_legacy_eos_token_id_pools_at_the_highest_id():
    """SD v1.x's config says eos_token_id=2: transformers then pools where the id is largest."""
    config = dataclasses.replace(SMALL, eos_token_id=2)
    reference = reference_model(config)
    ours = ours_from(reference, config)
    ids = token_ids(SMALL, [5, 12])
    ids[0, 2] = 99                                          # an id above BOS before the first EOS
    with torch.no_grad():
        expected, got = reference(ids), ours(ids)
    assert (got.pooled - expected.pooler_output).abs().max() <= 1e-5
    assert torch.equal(got.pooled[0], got.hidden_states[0, 2])


def test_state_dict_keys_mirror_transformers_and_accept_position_ids():
    reference = reference_model(SMALL)
    ours = ours_from(reference, SMALL)
    expected_keys = set(file_keys(reference))
    assert set(ours.state_dict()) == expected_keys
    assert "text_model.encoder.layers.2.mlp.fc1.weight" in expected_keys
    state = dict(ours.state_dict())
    # Files saved by transformers < 4.31 also hold this buffer.
    state["text_model.embeddings.position_ids"] = torch.arange(SMALL.max_positions)[None]
    CLIPTextModel(SMALL).load_state_dict(state, strict=True)
    del state["text_model.final_layer_norm.bias"]
    with pytest.raises(RuntimeError, match="final_layer_norm.bias"):
        CLIPTextModel(SMALL).load_state_dict(state, strict=True)


def test_transformers_loads_our_weights_and_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = CLIPTextModel(TINY_TEXT).eval()
    save_file(dict(ours.state_dict()), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(TINY_TEXT.to_transformers_config()))
    reference, info = transformers.CLIPTextModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info                     # no missing, unexpected or mismatched keys
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407, 49407]])     # "a photo of a cat"
    with torch.no_grad():
        expected, got = reference.eval()(ids), ours(ids)
    assert (got.hidden_states - expected.last_hidden_state).abs().max() <= 1e-5
    assert (got.pooled - expected.pooler_output).abs().max() <= 1e-5


def test_config_round_trips():
    for config in (TINY_TEXT, SD15_TEXT, SMALL):
        assert CLIPTextConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
        assert CLIPTextConfig.from_transformers_config(config.to_transformers_config()) == config
    sd15 = CLIPTextConfig.from_transformers_config(SD15_CONFIG_JSON)
    assert dataclasses.replace(sd15, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407) == SD15_TEXT
    with pytest.raises(UserError, match="unknown"):
        CLIPTextConfig.from_dict({**TINY_TEXT.to_dict(), "hidden_act": "gelu"})
    with pytest.raises(UserError, match="text_config"):
        CLIPTextConfig.from_transformers_config({"text_config": SD15_CONFIG_JSON})
    with pytest.raises(ValueError, match="divisible"):
        CLIPTextConfig(hidden_size=30, num_heads=4)


def test_config_round_trips_through_transformers():
    transformers = pytest.importorskip("transformers")
    for config in (TINY_TEXT, SD15_TEXT, SMALL):
        stored = transformers.CLIPTextConfig(**config.to_transformers_config()).to_dict()
        assert CLIPTextConfig.from_transformers_config(stored) == config
    stored = transformers.CLIPTextConfig(**SD15_CONFIG_JSON).to_dict()
    assert CLIPTextConfig.from_transformers_config(stored) == CLIPTextConfig.from_transformers_config(
        SD15_CONFIG_JSON)


def test_sd15_parameter_count():
    with torch.device("meta"):
        model = CLIPTextModel(SD15_TEXT)
    assert sum(parameter.numel() for parameter in model.parameters()) == 123_060_480


def test_batch_equals_single_rows():
    torch.manual_seed(0)
    model = CLIPTextModel(SMALL).eval()
    ids = token_ids(SMALL, [2, 7, 15])
    with torch.no_grad():
        batch = model(ids, clip_skip=2)
        for row in range(3):
            single = model(ids[row:row + 1], clip_skip=2)
            assert torch.allclose(batch.hidden_states[row], single.hidden_states[0], atol=1e-6)
            assert torch.allclose(batch.pooled[row], single.pooled[0], atol=1e-6)
        shorter = model(ids[:2, :8])                    # fewer positions than max_positions
    assert shorter.hidden_states.shape == (2, 8, 32) and shorter.pooled.shape == (2, 32)


def test_bad_input_fails_clearly():
    model = CLIPTextModel(SMALL)
    ids = token_ids(SMALL, [3])
    with pytest.raises(UserError, match="clip_skip"):
        model(ids, clip_skip=0)
    with pytest.raises(UserError, match="clip_skip"):
        model(ids, clip_skip=SMALL.num_layers + 1)
    with pytest.raises(UserError, match="at most 16"):
        model(torch.cat([ids, ids], dim=1))
    with pytest.raises(UserError, match="end-of-text"):
        model(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(UserError, match="integer"):
        model(ids.float())


def test_float16_stays_close_to_float32():
    torch.manual_seed(0)
    model = CLIPTextModel(TINY_TEXT).eval()
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407, 49407]])
    with torch.no_grad():
        full = model(ids)
        half = model.half()(ids)
    assert half.hidden_states.dtype == torch.float16
    assert (half.hidden_states.float() - full.hidden_states).abs().max() < 2e-2
