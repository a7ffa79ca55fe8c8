"""LoRA files and the adapter machinery on the tiny random model: math, layouts, exact restores, errors.

Parity with diffusers' images is in test_lora_parity.py; here the adapted weights are checked against
W + scale·B·A computed independently, layouts against each other, and restores bit for bit.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lora_fixtures import (ATTENTION, CONV, lora_layers, original_names, write_kohya, write_old_diffusers,
                           write_peft)
from nanodiffusion.adapters.lora import LoRAAdapters
from nanodiffusion.adapters.lora_files import LoRALayer, read_lora_file
from nanodiffusion.adapters.lora_targets import module_names
from nanodiffusion.errors import UserError
from nanodiffusion.pipelines.text_to_image import TextToImage
from nanodiffusion.tokenizer import CLIPTokenizer
from nanodiffusion.weights import SDComponents, save_diffusers
from fixtures import tiny_ours


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.clip()


@pytest.fixture
def pipe(tokenizer):
    return tiny_ours(tokenizer=tokenizer)


def networks(pipe):
    return {"unet": pipe.unet, "text_encoder": pipe.text_encoder}


def weights(pipe) -> dict[str, torch.Tensor]:
    """Every tensor of the three networks, cloned."""
    return {f"{name}.{key}": value.detach().clone() for name in ("unet", "vae", "text_encoder")
            for key, value in getattr(pipe, name).state_dict().items()}


def expected(before, layers, scales) -> dict[str, torch.Tensor]:
    """W + Σ scale·up@down for each adapted weight, computed from the drawn factors in float32."""
    result = dict(before)
    for layer_set, scale in zip(layers, scales):
        for (network, module), (down, up) in layer_set.items():
            key = f"{network}.{module}.weight"
            product = (up.flatten(1) @ down.flatten(1)).view(before[key].shape)
            result[key] = result[key] + scale * product
    return result


def assert_weights(pipe, wanted, atol=1e-6):
    for key, value in weights(pipe).items():
        torch.testing.assert_close(value, wanted[key], atol=atol, rtol=0, msg=key)


def test_delta_of_a_conv_lora_is_its_two_stacked_convolutions():
    generator = torch.Generator().manual_seed(0)
    down, up = torch.randn(3, 5, 3, 3, generator=generator), torch.randn(7, 3, 1, 1, generator=generator)
    x = torch.randn(2, 5, 9, 9, generator=generator)
    layer = LoRALayer(down, up, scale=0.25)
    stacked = 0.25 * F.conv2d(F.conv2d(x, down, padding=1), up)          # LoCon: a kxk down conv, a 1x1 up
    torch.testing.assert_close(F.conv2d(x, layer.delta(), padding=1), stacked, atol=1e-5, rtol=1e-5)
    linear = LoRALayer(down.flatten(1), up.flatten(1), scale=2.0)
    features = torch.randn(4, 45, generator=generator)
    stacked = 2.0 * (features @ down.flatten(1).T) @ up.flatten(1).T
    torch.testing.assert_close(features @ linear.delta().T, stacked)


@pytest.mark.parametrize("alpha", [None, 2.0])
def test_kohya_lora_adds_alpha_over_rank_times_up_down(pipe, tmp_path, alpha):
    layers = lora_layers(networks(pipe), unet=ATTENTION + CONV, rank=4)
    before = weights(pipe)
    pipe.load_lora_weights(write_kohya(tmp_path / "style.safetensors", layers, alpha=alpha))
    assert_weights(pipe, expected(before, [layers], [1.0 if alpha is None else alpha / 4]))


def test_every_layout_gives_the_same_weights(pipe, tmp_path):
    """kohya with diffusers' or the original module names, diffusers/PEFT, and diffusers < 0.21 keys."""
    layers = lora_layers(networks(pipe), unet=ATTENTION + CONV)
    files = {"kohya": write_kohya(tmp_path / "a.safetensors", layers, alpha=2.0),
             "kohya-ldm": write_kohya(tmp_path / "b.safetensors", layers, alpha=2.0,
                                      ldm_names=original_names(pipe.unet)),
             "peft": write_peft(tmp_path / "c.safetensors", layers, alpha=2.0)}
    results = {}
    for layout, path in files.items():
        pipe.load_lora_weights(path)
        results[layout] = weights(pipe)
        pipe.unload_lora_weights()
    for layout in ("kohya-ldm", "peft"):
        assert all(torch.equal(results[layout][key], results["kohya"][key]) for key in results["kohya"])
    before = weights(pipe)
    pipe.load_lora_weights(write_old_diffusers(tmp_path / "d.safetensors", layers))
    assert_weights(pipe, expected(before, [layers], [1.0]))


def test_keys_without_network_prefix_are_the_unet_or_the_text_encoder(pipe, tmp_path):
    layers = lora_layers(networks(pipe), unet=("attn2.to_k",), text_encoder=("fc1",))
    tensors = {f"{name}.{part}.weight": value for (_, name), (down, up) in layers.items()
               for part, value in (("lora_A", down), ("lora_B", up))}
    save_file(tensors, str(tmp_path / "bare.safetensors"))
    before = weights(pipe)
    pipe.load_lora_weights(tmp_path / "bare.safetensors")
    assert_weights(pipe, expected(before, [layers], [1.0]))


def test_original_module_names_reach_the_right_modules(pipe):
    names = module_names("unet", pipe.unet)
    assert names["input_blocks_4_1_proj_in"] == "down_blocks.1.attentions.0.proj_in"
    assert names["input_blocks_3_0_op"] == "down_blocks.0.downsamplers.0.conv"
    assert names["input_blocks_1_0_emb_layers_1"] == "down_blocks.0.resnets.0.time_emb_proj"
    assert names["middle_block_1_transformer_blocks_0_attn2_to_k"] == \
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    assert names["output_blocks_2_2_conv"] == "up_blocks.0.upsamplers.0.conv"
    assert names["output_blocks_3_0_skip_connection"] == "up_blocks.1.resnets.0.conv_shortcut"
    text = module_names("text_encoder", pipe.text_encoder)
    assert text["text_model_encoder_layers_1_mlp_fc2"] == text["encoder.layers.1.mlp.fc2"] == \
        "text_model.encoder.layers.1.mlp.fc2"


def test_peft_metadata_alpha_pattern_sets_per_module_scales(pipe, tmp_path):
    layers = lora_layers(networks(pipe), unet=("to_q", "to_k"), text_encoder=(), rank=4)
    config = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"attn1.to_q": 2}}
    tensors = {f"unet.{name}.{part}.weight": value for (_, name), (down, up) in layers.items()
               for part, value in (("lora_A", down), ("lora_B", up))}
    save_file(tensors, str(tmp_path / "peft.safetensors"), metadata={"lora_adapter_metadata": str(config)
                                                                      .replace("'", '"')})
    lora = read_lora_file(tmp_path / "peft.safetensors")
    scales = {name: layer.scale for (_, name), layer in lora.layers.items()}
    assert {scale for name, scale in scales.items() if name.endswith("attn1.to_q")} == {0.5}
    assert {scale for name, scale in scales.items() if not name.endswith("attn1.to_q")} == {2.0}


def test_two_loras_with_weights_add_up(pipe, tmp_path):
    first = lora_layers(networks(pipe), seed=1)
    second = lora_layers(networks(pipe), unet=ATTENTION + CONV, text_encoder=(), rank=2, seed=2)
    before = weights(pipe)
    pipe.load_lora_weights(write_kohya(tmp_path / "first.safetensors", first, alpha=2.0))
    pipe.load_lora_weights(write_peft(tmp_path / "second.safetensors", second))
    assert pipe.lora.get_active_adapters() == ["second"]                   # as diffusers: the last one loaded
    assert_weights(pipe, expected(before, [second], [1.0]))
    pipe.set_adapters(["first", "second"], adapter_weights=[0.7, -0.3])
    assert_weights(pipe, expected(before, [first, second], [0.7 * 0.5, -0.3]))
    pipe.fuse_lora(lora_scale=0.5)
    assert_weights(pipe, expected(before, [first, second], [0.5 * 0.7 * 0.5, 0.5 * -0.3]))
    pipe.unfuse_lora()
    assert_weights(pipe, expected(before, [first, second], [0.7 * 0.5, -0.3]))


def test_unloading_restores_the_original_tensors_bit_for_bit(pipe, tmp_path):
    parameters = {name: parameter for name, parameter in pipe.unet.named_parameters()}
    before = weights(pipe)
    pipe.load_lora_weights(write_kohya(tmp_path / "a.safetensors", lora_layers(networks(pipe), seed=1),
                                       alpha=1))
    pipe.load_lora_weights(write_kohya(tmp_path / "b.safetensors",
                                       lora_layers(networks(pipe), unet=CONV, seed=2), alpha=3))
    pipe.set_adapters(["a", "b"], [0.5, 1.5])
    pipe.fuse_lora(0.8)
    pipe.unfuse_lora()
    pipe.set_adapters("a")
    pipe.unload_lora_weights()
    after = weights(pipe)
    assert all(torch.equal(after[key], value) for key, value in before.items())
    assert all(parameter is parameters[name] for name, parameter in pipe.unet.named_parameters())
    assert not pipe.lora._originals                                       # nothing is kept once restored


def test_memory_mapped_model_restores_bit_for_bit(pipe, tmp_path):
    """A model loaded without conversion runs on the file's pages; set aside, they are given back and
    re-read on restore."""
    save_diffusers(SDComponents(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer), tmp_path / "model")
    mapped = TextToImage.from_pretrained(tmp_path / "model")
    before = weights(mapped)
    mapped.load_lora_weights(write_kohya(tmp_path / "a.safetensors", lora_layers(networks(pipe), unet=CONV)))
    assert_weights(mapped, expected(before, [lora_layers(networks(pipe), unet=CONV)], [1.0]))
    mapped.unload_lora_weights()
    after = weights(mapped)
    assert all(torch.equal(after[key], value) for key, value in before.items())


def test_without_originals_the_first_application_is_exact_and_changes_are_differences(pipe, tmp_path):
    first, second = lora_layers(networks(pipe), seed=1), lora_layers(networks(pipe), unet=CONV, seed=2)
    exact = copy.deepcopy(pipe)
    exact.load_lora_weights(write_kohya(tmp_path / "a.safetensors", first, alpha=2.0))
    one_shot = LoRAAdapters(networks(pipe), restorable=False)
    before = weights(pipe)
    one_shot.load_lora_weights(tmp_path / "a.safetensors")
    assert all(torch.equal(value, weights(exact)[key]) for key, value in weights(pipe).items())
    assert not one_shot._originals
    one_shot.load_lora_weights(write_peft(tmp_path / "b.safetensors", second))
    one_shot.set_adapters(["a", "b"], [0.5, 2.0])
    assert_weights(pipe, expected(before, [first, second], [0.5 * 0.5, 2.0]), atol=1e-5)
    one_shot.unload_lora_weights()
    assert_weights(pipe, before, atol=1e-5)


def test_fused_weights_stay_after_unload(pipe, tmp_path):
    layers = lora_layers(networks(pipe))
    before = weights(pipe)
    pipe.load_lora_weights(write_kohya(tmp_path / "a.safetensors", layers))
    pipe.fuse_lora(lora_scale=0.5)
    with pytest.raises(UserError, match="unfuse_lora"):
        pipe.set_adapters("a", 0.3)
    pipe.unload_lora_weights()
    assert not pipe.lora._originals and not pipe.lora.adapters
    assert_weights(pipe, expected(before, [layers], [0.5]))


def test_bf16_model_gets_the_fp32_fused_weights_cast_to_bf16(pipe, tmp_path):
    with torch.no_grad():                             # weights a bf16 file could hold, in both models
        for parameter in pipe.unet.parameters():
            parameter.copy_(parameter.bfloat16())
    half = copy.deepcopy(pipe).to(dtype=torch.bfloat16)
    for model in (pipe, half):
        model.load_lora_weights(write_kohya(tmp_path / "a.safetensors", lora_layers(networks(pipe)), alpha=3))
        model.load_lora_weights(write_peft(tmp_path / "b.safetensors",
                                           lora_layers(networks(pipe), unet=CONV)))
        model.set_adapters(["a", "b"], [0.6, 1.1])
        model.fuse_lora(0.9)
    fused, fused_half = pipe.unet.state_dict(), half.unet.state_dict()
    assert all(torch.equal(fused[key].bfloat16(), fused_half[key]) for key in fused)


def test_casting_the_model_later_restores_the_cast_originals(pipe, tmp_path):
    pipe.load_lora_weights(write_kohya(tmp_path / "a.safetensors", lora_layers(networks(pipe))))
    cast = {key: value.bfloat16() for key, value in weights(copy.deepcopy(pipe)).items()}
    pipe.lora.unload_lora_weights()
    original = {key: value.bfloat16() for key, value in weights(pipe).items()}
    pipe.load_lora_weights(write_kohya(tmp_path / "a.safetensors", lora_layers(networks(pipe))))
    pipe.to(dtype=torch.bfloat16)
    assert all(torch.equal(value, cast[key]) for key, value in weights(pipe).items())
    pipe.unload_lora_weights()
    assert all(torch.equal(value, original[key]) for key, value in weights(pipe).items())


def test_loras_add_no_hooks_and_no_modules(pipe, tmp_path):
    """A step costs the same with LoRAs: the networks keep their modules, shapes and dtypes, and no hook."""
    def layout(model):
        return [(name, type(module), tuple((key, p.shape, p.dtype) for key, p in module.named_parameters(
            recurse=False))) for name, module in model.named_modules()]
    before = layout(pipe.unet), layout(pipe.text_encoder)
    pipe.load_lora_weights(write_kohya(tmp_path / "a.safetensors", lora_layers(networks(pipe), unet=CONV)))
    assert (layout(pipe.unet), layout(pipe.text_encoder)) == before
    for module in [*pipe.unet.modules(), *pipe.text_encoder.modules()]:
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_lora_changes_the_upsampler_output(pipe, tmp_path):
    """Upsample caches a kernel derived from its conv weight: a LoRA on that conv must reach the output."""
    upsampler = pipe.unet.up_blocks[0].upsamplers[0]
    x = torch.randn(1, 64, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = upsampler(x, (8, 8))
        pipe.load_lora_weights(write_kohya(tmp_path / "a.safetensors", lora_layers(
            networks(pipe), unet=("upsamplers.0.conv",), text_encoder=())))
        reference = F.conv2d(F.interpolate(x, size=(8, 8)), upsampler.conv.weight, upsampler.conv.bias,
                             padding=1)
        torch.testing.assert_close(upsampler(x, (8, 8)), reference, atol=1e-5, rtol=1e-5)
    assert (upsampler(x, (8, 8)) - before).abs().max() > 1e-3


def _tensors(**shapes):
    generator = torch.Generator().manual_seed(0)
    return {key.replace("__", "."): torch.randn(shape, generator=generator) for key, shape in shapes.items()}


Q = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
K2 = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
BAD_FILES = {
    "loha": ({f"{Q}.hada_w1_a": (64, 4), f"{Q}.hada_w1_b": (4, 64)}, "LyCORIS LoHa"),
    "lokr": ({f"{Q}.lokr_w1": (8, 8), f"{Q}.lokr_w2": (8, 8)}, "LyCORIS LoKr"),
    "lora_mid": ({f"{Q}.lora_down.weight": (4, 64), f"{Q}.lora_up.weight": (64, 4),
                  f"{Q}.lora_mid.weight": (4, 4, 3, 3)}, "lora_mid"),
    "dora": ({f"{Q}.lora_down.weight": (4, 64), f"{Q}.lora_up.weight": (64, 4), f"{Q}.dora_scale": (1, 64)},
             "DoRA"),
    "embedding": ({"emb_params": (2, 768)}, "textual-inversion embedding"),
    "checkpoint": ({"model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3)}, "full model checkpoint"),
    "unknown": ({"encoder.weight": (3, 3)}, "not a LoRA in a layout"),
    "mixed": ({f"{Q}.lora_down.weight": (4, 64), f"{Q}.lora_up.weight": (64, 4),
               "unet.conv_in.lora_A.weight": (4, 4, 3, 3), "unet.conv_in.lora_B.weight": (32, 4, 1, 1)},
              "mixes"),
    "sdxl-te2": ({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 1280),
                  "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": (1280, 4)}, "SDXL"),
    "sdxl-unet": ({f"{Q.replace('blocks_0', 'blocks_1')}.lora_down.weight": (4, 64),
                   f"{Q.replace('blocks_0', 'blocks_1')}.lora_up.weight": (64, 4)}, "SDXL"),
    "sd2-unet": ({f"{K2}.lora_down.weight": (4, 1024), f"{K2}.lora_up.weight": (64, 4)},
                 "made for SD v2.x: its cross-attention reads 1024-wide text states, this model's 32-wide"),
    "sd2-text": ({f"{TE_Q}.lora_down.weight": (4, 1024), f"{TE_Q}.lora_up.weight": (1024, 4)},
                 r"made for SD v2.x \(OpenCLIP ViT-H\): its text encoder is 1024 wide, this model's 32"),
    "shape": ({f"{Q}.lora_down.weight": (4, 64), f"{Q}.lora_up.weight": (48, 4)},
              r"shape \(48, 64\) but the model's is \(64, 64\)"),
    "rank": ({f"{Q}.lora_down.weight": (4, 64), f"{Q}.lora_up.weight": (64, 3)}, "rank 4 .* but 3"),
    "missing-up": ({f"{Q}.lora_down.weight": (4, 64)}, "no up matrix"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_files_that_cannot_apply_say_why(pipe, tmp_path, case):
    shapes, message = BAD_FILES[case]
    save_file(_tensors(**{key.replace(".", "__"): shape for key, shape in shapes.items()}),
              str(tmp_path / "bad.safetensors"))
    before = weights(pipe)
    with pytest.raises(UserError, match=message):
        pipe.load_lora_weights(tmp_path / "bad.safetensors")
    assert not pipe.lora.adapters
    assert all(torch.equal(value, before[key]) for key, value in weights(pipe).items())


def test_pickle_loras_are_refused(pipe, tmp_path):
    torch.save({f"{Q}.lora_down.weight": torch.zeros(4, 64)}, tmp_path / "old.pt")
    with pytest.raises(UserError, match=".safetensors only"):
        pipe.load_lora_weights(tmp_path / "old.pt")


def test_adapter_api_errors(pipe, tmp_path):
    path = write_kohya(tmp_path / "a.safetensors", lora_layers(networks(pipe)))
    with pytest.raises(UserError, match="no active LoRA"):
        pipe.fuse_lora()
    pipe.load_lora_weights(path)
    with pytest.raises(UserError, match="already loaded"):
        pipe.load_lora_weights(path)
    for names, weights_, message in [(["b"], None, "unknown adapter 'b'; loaded: a"),
                                     (["a"], [1.0, 2.0], "1 adapter names but 2"),
                                     (["a"], {"unet": 1.0}, "per UNet block"), (["a", "a"], None, "repeat")]:
        with pytest.raises(UserError, match=message):
            pipe.set_adapters(names, weights_)
    pipe.fuse_lora()
    with pytest.raises(UserError, match="fused already"):
        pipe.fuse_lora()
    with pytest.raises(UserError, match="unfuse_lora"):
        pipe.load_lora_weights(path, adapter_name="again")


@pytest.mark.parametrize("name, metadata, is_lcm", [
    ("lcm-lora-sdv1-5", {}, True), ("LCM_LoRA_Weights_SD15", {}, True), ("style", {}, False),
    ("pytorch_lora_weights", {"modelspec.title": "Latent Consistency LoRA"}, True),
    ("style", {"ss_output_name": "my_lcm"}, True), ("overlcmx", {"ss_output_name": "alcmost"}, False),
    ("lcm-lora-sdv1-5/pytorch_lora_weights", {}, True), ("ink/pytorch_lora_weights", {}, False)])
def test_lcm_loras_are_recognised_and_the_settings_suggested(pipe, tmp_path, name, metadata, is_lcm):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    path = write_kohya(tmp_path / f"{name}.safetensors", lora_layers(networks(pipe), text_encoder=()),
                       metadata=metadata)
    assert read_lora_file(path).is_lcm == is_lcm
    pipe.load_lora_weights(path, adapter_name="x")
    hint = pipe.lora.lcm_hint("euler", 20, 7.5)
    assert (hint is not None) == is_lcm
    if is_lcm:
        assert "--sampler lcm --steps 4 --guidance 1" in hint
        assert pipe.lora.lcm_hint("lcm", 4, 1.0) is None


def test_manager_works_on_bare_networks(pipe, tmp_path):
    """The pipeline's methods only delegate: the manager alone adapts a UNet and a text encoder."""
    adapters = LoRAAdapters(networks(pipe))
    layers = lora_layers(networks(pipe))
    before = weights(pipe)
    assert adapters.load_lora_weights(write_kohya(tmp_path / "a.safetensors", layers), "mine") == "mine"
    assert_weights(pipe, expected(before, [layers], [1.0]))
