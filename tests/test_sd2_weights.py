"""SD 2.x networks and weights: parity with diffusers/transformers on tiny random weights, SD 2's published
configs, the OpenCLIP single-file layout (against diffusers' converter and a hand-written fixture), round
trips, the ε/v question of single files, and clear errors for what is not supported."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from nanodiffusion.errors import UserError
from nanodiffusion.nets.clip_text import SD2_TEXT, TINY_SD2_TEXT, CLIPTextConfig, CLIPTextModel
from nanodiffusion.nets.sd_unet import SD2_UNET, SD2_V_UNET, TINY_SD2_UNET, SDUNet, SDUNetConfig
from nanodiffusion.nets.vae import AutoencoderKL
from nanodiffusion.weights import single_file
from nanodiffusion.tokenizer import CLIPTokenizer
from nanodiffusion.weights import SDComponents, load_sd, save_diffusers, save_single_file
from nanodiffusion.weights.families import probe_prediction
from nanodiffusion.weights.single_file import to_original
from fixtures import (
    SD2_VAE, SD21_V_SCHEDULER_JSON, assert_same_weights, openclip_layout, randomize_, write_clip_tokenizer,
    write_sd2_tokenizer,
)

# stabilityai/stable-diffusion-2-1 unet/config.json (diffusers 0.10); the -base model's differs in
# sample_size 64 and upcast_attention false.
SD21_UNET_JSON = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0", "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4, "sample_size": 96,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "use_linear_projection": True,
    "upcast_attention": True,
}
# stabilityai/stable-diffusion-2-1 text_encoder/config.json (transformers 4.25): OpenCLIP ViT-H/14's text
# tower less its last layer, stale special ids included.
SD21_TEXT_JSON = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 2, "hidden_act": "gelu", "hidden_size": 1024, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 4096, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 16,
    "num_hidden_layers": 23, "pad_token_id": 1, "projection_dim": 512, "torch_dtype": "float32",
    "transformers_version": "4.25.0.dev0", "vocab_size": 49408,
}
UPCAST_SD2_UNET = dataclasses.replace(TINY_SD2_UNET, upcast_attention=True, num_res_blocks=2,
                                      attention_levels=(0, 1))


def random_sd2(seed: int = 0, prediction: str = "epsilon") -> SDComponents:
    """Tiny random SD 2-style components with CLIP's vocabulary and SD 2's tokenizer."""
    scheduler = dict(SD21_V_SCHEDULER_JSON, prediction_type=prediction)
    return SDComponents(unet=randomize_(SDUNet(TINY_SD2_UNET), seed, fresh=True),
                        vae=randomize_(AutoencoderKL(SD2_VAE), seed + 1, fresh=True),
                        text_encoder=randomize_(CLIPTextModel(TINY_SD2_TEXT), seed + 2, fresh=True),
                        tokenizer=CLIPTokenizer.clip(pad_token="!"), scheduler_config=scheduler)


@pytest.mark.parametrize("config", [TINY_SD2_UNET, UPCAST_SD2_UNET], ids=["tiny", "upcast"])
def test_sd2_unet_matches_diffusers(config):
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.UNet2DConditionModel.from_config(config.to_diffusers_config())
    randomize_(reference, 0, fresh=True)
    ours = SDUNet(SDUNetConfig.from_diffusers_config(reference.config)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    generator = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 12, generator=generator), torch.randn(2, 7, 64, generator=generator)
    t = torch.tensor([999.0, 17.0])
    with torch.no_grad():
        assert (ours(x, t, context) - reference(x, t, context).sample).abs().max() <= 1e-5


def test_sd2_presets_are_the_published_configs_and_diffusers_builds_the_same_tensors():
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    assert SDUNetConfig.from_diffusers_config(SD21_UNET_JSON) == SD2_V_UNET
    base = {**SD21_UNET_JSON, "sample_size": 64, "upcast_attention": False}
    assert SDUNetConfig.from_diffusers_config(base) == SD2_UNET
    assert SD2_UNET.heads(0) == 5 and SD2_UNET.channels(0) // SD2_UNET.heads(0) == 64   # 64-wide heads
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel.from_config(SD21_UNET_JSON)
        ours = SDUNet(SD2_V_UNET)
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD21_TEXT_JSON))
        our_text = CLIPTextModel(SD2_TEXT)
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 865_910_724
    assert sum(p.numel() for p in our_text.parameters()) == sum(p.numel() for p in text.parameters())
    read = CLIPTextConfig.from_transformers_config(SD21_TEXT_JSON)
    assert dataclasses.replace(read, bos_token_id=49406, eos_token_id=49407, pad_token_id=0) == SD2_TEXT


def test_full_size_sd2_configs_are_inferred_from_original_shapes():
    """What SD 2.x shapes cannot tell (head counts) follows its 64-wide heads; the rest is read."""
    with torch.device("meta"):
        components = SDComponents(unet=SDUNet(SD2_V_UNET), vae=AutoencoderKL(SD2_VAE),
                                  text_encoder=CLIPTextModel(SD2_TEXT))
    shapes = {key: value.shape for key, value in to_original(components).items()}
    unet = {key.removeprefix("model.diffusion_model."): shape for key, shape in shapes.items()}
    text = {key.removeprefix("cond_stage_model.model."): shape for key, shape in shapes.items()}
    assert single_file.infer_unet_config(unet, 64) == dataclasses.replace(
        SD2_V_UNET, upcast_attention=False, sample_size=64)
    assert single_file.infer_openclip_config(text) == SD2_TEXT
    assert text["transformer.resblocks.0.attn.in_proj_weight"] == (3072, 1024)


def test_penultimate_layer_of_the_whole_tower_is_the_last_of_ours():
    """SD 2 conditions on OpenCLIP's penultimate layer through the final LayerNorm (ldm's
    FrozenOpenCLIPEmbedder, layer="penultimate"); diffusers keeps the layers before it: so do we."""
    transformers = pytest.importorskip("transformers")
    whole = dataclasses.replace(TINY_SD2_TEXT, num_layers=TINY_SD2_TEXT.num_layers + 1)
    reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(**whole.to_transformers_config(),
                                                                       attn_implementation="eager"))
    randomize_(reference, 3, fresh=True)
    state = {k if k.startswith("text_model.") else f"text_model.{k}": v
             for k, v in reference.state_dict().items()}
    ours = CLIPTextModel(TINY_SD2_TEXT).eval()
    last = f"text_model.encoder.layers.{TINY_SD2_TEXT.num_layers}."
    ours.load_state_dict({k: v for k, v in state.items() if not k.startswith(last)}, strict=True)
    ids = CLIPTokenizer.clip(pad_token="!")(["a photo of a cat", "a red car"])
    with torch.no_grad():
        output = reference(ids, output_hidden_states=True)
        penultimate = reference.text_model.final_layer_norm(output.hidden_states[-2]) \
            if hasattr(reference, "text_model") else reference.final_layer_norm(output.hidden_states[-2])
        assert (ours(ids).hidden_states - penultimate).abs().max() <= 1e-5


def test_sd2_tokenizer_pads_with_exclamation_mark_like_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = write_sd2_tokenizer(tmp_path / "tokenizer")
    prompts = ["a photo of a cat", "an astronaut riding a horse on the moon"]
    expected = transformers.CLIPTokenizer.from_pretrained(folder)(prompts, padding="max_length",
                                                                  max_length=77).input_ids
    for ours in (CLIPTokenizer.from_pretrained(folder), CLIPTokenizer.clip(pad_token="!")):
        ids = ours(prompts)
        assert ids.tolist() == expected and ours.pad_token_id == 0 and ids[0, -1] == 0
    sd1 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "sd1"))
    assert sd1(prompts)[0, -1] == 49407                                 # SD v1.x pads with <|endoftext|>


def test_openclip_keys_match_diffusers_converter():
    utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    transformers = pytest.importorskip("transformers")
    components = random_sd2()
    original = {key: value.clone() for key, value in to_original(components).items()}
    assert original["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (192, 64)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_SD2_TEXT.to_transformers_config()))
    converted = utils.convert_open_clip_checkpoint(model, original)
    converted = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in converted.items()}
    ours = components.text_encoder.state_dict()
    assert converted.keys() == ours.keys()
    assert all(torch.equal(converted[key], ours[key]) for key in ours)
    unet = utils.convert_ldm_unet_checkpoint(original, TINY_SD2_UNET.to_diffusers_config())
    assert all(torch.equal(unet[key], value) for key, value in components.unet.state_dict().items())


def assert_same_tensors(a: SDComponents, b: SDComponents) -> None:
    for name, network in a.networks().items():
        first, second = network.state_dict(), b.networks()[name].state_dict()
        assert first.keys() == second.keys(), name
        assert all(torch.equal(first[key], second[key]) for key in first), name


def test_a_file_in_sd2s_original_layout_loads_and_infers_its_configs(tmp_path):
    """The whole OpenCLIP tower (one block more, its projection), no metadata, ComfyUI's `v_pred` marker."""
    components = random_sd2(prediction="v_prediction")
    state = {key: value.clone() for key, value in to_original(components).items()
             if not key.startswith("cond_stage_model.")}
    state.update(openclip_layout(components.text_encoder.state_dict()))
    save_file({**state, "v_pred": torch.zeros(0)}, tmp_path / "v2.safetensors")
    loaded = load_sd(tmp_path / "v2.safetensors")
    assert loaded.unet.config == dataclasses.replace(TINY_SD2_UNET, sample_size=96)     # 768-v
    assert loaded.text_encoder.config == TINY_SD2_TEXT
    assert loaded.vae.config == dataclasses.replace(SD2_VAE, sample_size=512)
    assert_same_tensors(components, loaded)
    assert loaded.scheduler_config["prediction_type"] == "v_prediction"
    assert loaded.tokenizer.pad_token == "!" and loaded.tokenizer.vocab_size == 49408


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_sd2_safetensors_round_trip_keeps_configs(tmp_path, prediction):
    components = random_sd2(prediction=prediction)
    save_single_file(components, tmp_path / "model.safetensors")
    loaded = load_sd(tmp_path / "model.safetensors")
    assert_same_weights(components, loaded)
    assert loaded.scheduler_config == components.scheduler_config


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_sd2_ckpt_round_trip_infers_configs(tmp_path, monkeypatch, prediction):
    """A .ckpt has no metadata: a v model keeps ComfyUI's `v_pred` marker, an ε model goes to the probe."""
    probed = []
    monkeypatch.setattr(single_file, "probe_prediction", lambda unet: probed.append(unet) or "epsilon")
    components = random_sd2(prediction=prediction)
    save_single_file(components, tmp_path / "model.ckpt")
    loaded = load_sd(tmp_path / "model.ckpt", trust_pickle=True)
    assert loaded.scheduler_config["prediction_type"] == prediction
    assert len(probed) == (prediction == "epsilon")
    size = 96 if prediction == "v_prediction" else 64
    assert loaded.unet.config == dataclasses.replace(TINY_SD2_UNET, sample_size=size)
    assert loaded.text_encoder.config == TINY_SD2_TEXT
    assert_same_tensors(components, loaded)


def test_sd2_diffusers_folder_round_trip(tmp_path):
    components = random_sd2(prediction="v_prediction")
    save_diffusers(components, tmp_path / "model")
    loaded = load_sd(tmp_path / "model")
    assert_same_weights(components, loaded)
    assert loaded.tokenizer.pad_token == "!"


class ExactGaussianNet(torch.nn.Module):
    """The exact ε- or v-predictor for N(0, 1) latents under SD's schedule: a stand-in UNet for the probe."""

    def __init__(self, prediction: str):
        super().__init__()
        self.prediction, self.weight = prediction, torch.nn.Parameter(torch.zeros(()))
        self.config = SimpleConfig()
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)

    def forward(self, x, t, context):
        a = self.alphas_cumprod[t.long()].float().reshape(-1, 1, 1, 1)
        x0 = a.sqrt() * x                           # E[x0 | x_t] for x0 ~ N(0, 1): sqrt(ᾱ)·x_t
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if self.prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0


@dataclasses.dataclass
class SimpleConfig:
    in_channels: int = 4
    context_dim: int = 8


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_the_probe_tells_eps_from_v_on_exact_predictors(prediction):
    assert probe_prediction(ExactGaussianNet(prediction)) == prediction


@pytest.mark.parametrize("tensors, message", [
    ({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(8)}, "SDXL checkpoint"),
    ({"model.diffusion_model.label_emb.0.0.weight": torch.zeros(8, 8),
      "cond_stage_model.model.ln_final.weight": torch.zeros(8)}, "SD 2.1 unCLIP"),
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 9, 3, 3),
      "cond_stage_model.model.ln_final.weight": torch.zeros(8)}, r"inpainting model \(9 input channels"),
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 5, 3, 3),
      "cond_stage_model.model.ln_final.weight": torch.zeros(8)}, "depth-conditioned model"),
])
def test_unsupported_single_files_are_named(tmp_path, tensors, message):
    stub = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}
    save_file({**stub, **tensors}, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match=message):
        load_sd(tmp_path / "model.safetensors")


@pytest.mark.parametrize("pipeline, unet_inputs, message", [
    ("StableDiffusionXLPipeline", 4, "an SDXL model"),
    ("StableDiffusionInpaintPipeline", 9, "inpainting model"),
    ("StableDiffusionDepth2ImgPipeline", 5, "depth-conditioned model"),
    ("StableDiffusionPipeline", 9, r"inpainting model \(9 input channels"),
])
def test_unsupported_diffusers_folders_are_named(tmp_path, pipeline, unet_inputs, message):
    components = random_sd2()
    save_diffusers(components, tmp_path / "model")
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    (tmp_path / "model" / "model_index.json").write_text(json.dumps({**index, "_class_name": pipeline}))
    config = json.loads((tmp_path / "model" / "unet" / "config.json").read_text())
    config["in_channels"] = unet_inputs
    (tmp_path / "model" / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message):
        load_sd(tmp_path / "model")
