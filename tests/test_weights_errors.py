"""Bad weight files fail with a message saying what the file is and what to do, never a stack of internals."""

import argparse
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nanodiffusion.errors import UserError
from nanodiffusion.weights import load_sd, save_diffusers, save_single_file
from nanodiffusion.weights.single_file import to_original
from fixtures import random_components

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def components():
    return random_components()


@pytest.fixture
def folder(tmp_path, components):
    save_diffusers(components, tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture
def original(components) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in to_original(components).items()}


@pytest.fixture(scope="module")
def configs_metadata(components, tmp_path_factory) -> dict[str, str]:
    """The metadata save_single_file writes (our configs), so edited tiny files still load."""
    path = tmp_path_factory.mktemp("single") / "model.safetensors"
    save_single_file(components, path)
    with safe_open(path, "pt") as file:
        return file.metadata()


def _save(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> str:
    save_file(tensors, path, metadata=metadata)
    return str(path)


def test_missing_and_unexpected_keys_are_named_in_the_files_layout(tmp_path, original, configs_metadata):
    del original["model.diffusion_model.input_blocks.1.0.in_layers.0.weight"]
    original["model.diffusion_model.input_blocks.1.0.extra.weight"] = torch.zeros(1)
    path = _save(original, tmp_path / "model.safetensors", configs_metadata)
    with pytest.raises(UserError, match=r"1 missing: model\.diffusion_model\.input_blocks\.1\.0\."
                                        r"in_layers\.0\.weight"):
        load_sd(path)
    del original["model.diffusion_model.input_blocks.1.0.extra.weight"]
    original["model.diffusion_model.input_blocks.1.0.in_layers.0.weight"] = torch.zeros(32)
    original["cond_stage_model.transformer.text_model.extra"] = torch.zeros(1)
    with pytest.raises(UserError, match=r"1 unexpected: cond_stage_model\.transformer\.text_model\.extra"):
        load_sd(_save(original, tmp_path / "other.safetensors", configs_metadata))


def test_missing_key_in_a_diffusers_folder_is_named(folder):
    tensors = load_file(folder / UNET_FILE)
    del tensors["mid_block.attentions.0.proj_in.weight"]
    save_file(tensors, folder / UNET_FILE)
    with pytest.raises(UserError, match=r"unet does not match its config; keys 1 missing: "
                                        r"mid_block\.attentions\.0\.proj_in\.weight"):
        load_sd(folder)


def test_shape_mismatch_is_named(folder, tmp_path, original, configs_metadata):
    tensors = load_file(folder / UNET_FILE)
    tensors["conv_in.weight"] = torch.zeros(32, 4, 1, 1)
    save_file(tensors, folder / UNET_FILE)
    with pytest.raises(UserError, match=r"conv_in\.weight is \(32, 4, 1, 1\), expected \(32, 4, 3, 3\)"):
        load_sd(folder)
    original["first_stage_model.decoder.conv_out.bias"] = torch.zeros(5)
    with pytest.raises(UserError, match=r"first_stage_model\.decoder\.conv_out\.bias is \(5,\), "
                                        r"expected \(3,\)"):
        load_sd(_save(original, tmp_path / "model.safetensors", configs_metadata))


def test_git_lfs_pointer(folder):
    (folder / UNET_FILE).write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4c5c7f3a\n"
                                    "size 3438167536\n")
    with pytest.raises(UserError, match="Git LFS pointer.*git lfs pull"):
        load_sd(folder)


def test_truncated_safetensors_download(tmp_path, components):
    save_single_file(components, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(UserError, match=r"truncated: it has [\d,]+ bytes but its header describes [\d,]+ "
                                        r"\(67% downloaded\): download it again"):
        load_sd(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(UserError, match="truncated inside its header"):
        load_sd(tmp_path / "model.safetensors")


def test_html_error_page_and_other_non_weights(tmp_path):
    cases = {
        "page.safetensors": (b"<!DOCTYPE html>\n<html><head><title>404</title></head></html>",
                             "an HTML page"),
        "login.ckpt": (b"\n  <html lang='en'><body>Sign in</body></html>", "an HTML page"),
        "error.safetensors": (b'{"error":"Repository Not Found"}', "JSON text.*Repository Not Found"),
        "empty.safetensors": (b"", "is empty"),
        "noise.safetensors": (b"\x07\x01garbage bytes here",
                              "neither a safetensors file nor a PyTorch checkpoint"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError, match=message):
            load_sd(tmp_path / name, trust_pickle=True)


def _unet_stub(context_dim: int = 768, in_channels: int = 4) -> dict[str, torch.Tensor]:
    """The few UNet tensors the checkpoint-kind checks look at, with their real names and tiny shapes."""
    prefix = "model.diffusion_model."
    return {f"{prefix}input_blocks.0.0.weight": torch.zeros(8, in_channels, 3, 3),
            f"{prefix}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, context_dim)}


def test_incomplete_sd2_checkpoint_names_the_missing_tensor(tmp_path):
    """SD 2.x files load (tests/test_sd2_weights.py); a stub of one says what it lacks."""
    openclip = {**_unet_stub(context_dim=1024),
                "cond_stage_model.model.positional_embedding": torch.zeros(77, 8),
                "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(24, 8)}
    with pytest.raises(UserError,
                       match=r"cannot infer the unet config, model\.diffusion_model\.input_blocks"):
        load_sd(_save(openclip, tmp_path / "v2.safetensors"))


def test_sdxl_checkpoint_is_named(tmp_path):
    sdxl = {**_unet_stub(context_dim=2048),
            "model.diffusion_model.label_emb.0.0.weight": torch.zeros(8, 2816),
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(8),
            "conditioner.embedders.1.model.ln_final.weight": torch.zeros(8)}
    with pytest.raises(UserError, match="SDXL checkpoint"):
        load_sd(_save(sdxl, tmp_path / "xl.safetensors"))


def test_inpainting_checkpoint_is_named(tmp_path, original):
    key = "model.diffusion_model.input_blocks.0.0.weight"
    original[key] = torch.zeros(original[key].shape[0], 9, 3, 3)
    with pytest.raises(UserError, match=r"inpainting model \(9 input channels"):
        load_sd(_save(original, tmp_path / "inpaint.safetensors"))


def test_files_that_are_not_full_checkpoints_are_named(tmp_path, folder):
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}
    with pytest.raises(UserError, match="looks like a LoRA"):
        load_sd(_save(lora, tmp_path / "lora.safetensors"))
    vae = {"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
           "decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)}
    with pytest.raises(UserError, match="standalone VAE"):
        load_sd(_save(vae, tmp_path / "vae.safetensors"))
    with pytest.raises(UserError, match="one component of a diffusers folder"):
        load_sd(folder / UNET_FILE)
    with pytest.raises(UserError, match="not a diffusers folder"):
        load_sd(folder / "unet")


def test_pickle_refused_without_trust_flag(tmp_path, original):
    torch.save({"state_dict": original}, tmp_path / "model.ckpt")
    with pytest.raises(UserError, match="pickle checkpoint.*trust_pickle=True.*--trust-pickle"):
        load_sd(tmp_path / "model.ckpt")
    (tmp_path / "disguised.safetensors").write_bytes((tmp_path / "model.ckpt").read_bytes())
    with pytest.raises(UserError, match="pickle checkpoint"):         # judged by content, not by name
        load_sd(tmp_path / "disguised.safetensors")


def test_pickle_with_python_objects_is_explained(tmp_path, original):
    training_state = {"state_dict": original, "hyper_parameters": argparse.Namespace(lr=1e-4)}
    torch.save(training_state, tmp_path / "run.ckpt")
    with pytest.raises(UserError, match="holds Python objects besides tensors.*Namespace"):
        load_sd(tmp_path / "run.ckpt", trust_pickle=True)


def test_damaged_pickle(tmp_path, original):
    torch.save({"state_dict": original}, tmp_path / "model.ckpt")
    data = (tmp_path / "model.ckpt").read_bytes()
    (tmp_path / "model.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="damaged or truncated PyTorch checkpoint"):
        load_sd(tmp_path / "model.ckpt", trust_pickle=True)


def test_folder_problems(folder):
    with pytest.raises(UserError, match=r"no diffusion_pytorch_model\.fp16\.safetensors.*found "
                                        r"diffusion_pytorch_model\.safetensors"):
        load_sd(folder, variant="fp16")
    with pytest.raises(UserError, match="unknown dtype 'fp8'; valid: fp32, fp16, bf16"):
        load_sd(folder, dtype="fp8")
    index = json.loads((folder / "model_index.json").read_text())
    sdxl = {**index, "_class_name": "StableDiffusionXLPipeline"}
    (folder / "model_index.json").write_text(json.dumps(sdxl))
    with pytest.raises(UserError, match=r"holds an SDXL model \(StableDiffusionXLPipeline\)"):
        load_sd(folder)
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "vae" / "config.json").unlink()
    with pytest.raises(UserError, match="missing .*vae/config.json"):
        load_sd(folder)


def test_missing_path_is_not_taken_for_a_repo_id(tmp_path):
    with pytest.raises(UserError, match="no such model file or folder"):
        load_sd(tmp_path / "nothing.safetensors")
    with pytest.raises(UserError, match="no such model file or folder"):
        load_sd("models/v1-5.ckpt")


def test_safetensors_whose_header_length_starts_with_byte_0x80_is_not_a_pickle(tmp_path):
    from nanodiffusion.weights.safe_load import SAFETENSORS, sniff
    for length in range(1, 300):                           # a header length 0x..80 starts like a pickle
        save_file({"x" * length: torch.zeros(1)}, str(tmp_path / "a.safetensors"), metadata={"k": "v" * 80})
        if (tmp_path / "a.safetensors").read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no header length ending in 0x80 was written")
    assert sniff(tmp_path / "a.safetensors") == SAFETENSORS
