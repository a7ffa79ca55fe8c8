"""Which kind of Stable Diffusion model a folder or a file holds, and the generation settings that suit it.

Supported families: SD v1.x ("sd1"), SD 2.x with ε prediction (the 512-base models, "sd2") or v prediction
(the 768-v models, "sd2-v"), and few-step models on those networks: SD-Turbo style one-step models
("one-step": trailing timesteps, no guidance) and latent consistency models ("lcm"). What else is met in the
wild (SDXL, inpainting and depth UNets, the upscaler, unCLIP) is named in a clear error.
"""

from collections.abc import Mapping
from pathlib import Path

import torch

from nanodiffusion.diffusion.samplers import ALIASES
from nanodiffusion.errors import UserError
from nanodiffusion.nets.clip_text import CLIPTextConfig
from nanodiffusion.weights.components import SD15_SCHEDULER
from nanodiffusion.weights.original_keys import PREFIXES, TEXT_PREFIXES

# stabilityai/stable-diffusion-2-1's scheduler/scheduler_config.json: SD v1.x's schedule, v prediction, DDIM.
# (The 512-base models' files differ from SD15_SCHEDULER in nothing our samplers read.)
SD2_V_SCHEDULER = {**SD15_SCHEDULER, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}

# GenerationRequest fields per family where its defaults (50 steps, guidance 7.5, the scheduler class's
# sampler: model_defaults) do not fit.
# SD-Turbo is distilled for 1-4 steps without guidance (Sauer et al. 2023, "Adversarial Diffusion
# Distillation"); LCM for 2-8 steps with the guidance baked in (Luo et al. 2023).
FAMILY_DEFAULTS = {
    "sd1": {}, "sd2": {}, "sd2-v": {},
    "one-step": {"num_steps": 1, "guidance_scale": 0.0, "sampler": "euler"},
    "lcm": {"num_steps": 4, "guidance_scale": 1.0, "sampler": "lcm"},
}

# DPMSolverMultistepScheduler's (algorithm_type, solver_type) at solver_order 2 -> our sampler; its other
# variants (DPM-Solver without ++, orders 1 and 3, dpmsolver++ with heun) we do not have.
DPM_SOLVER_VARIANTS = {("dpmsolver++", "midpoint"): "dpmpp_2m",
                       ("sde-dpmsolver++", "midpoint"): "dpmpp_2m_sde",
                       ("sde-dpmsolver++", "heun"): "dpmpp_2m_sde_heun"}


def model_defaults(text: CLIPTextConfig, scheduler_config: Mapping) -> dict:
    """The generation settings of a model without a generation_defaults.json: its family's (FAMILY_DEFAULTS)
    over its scheduler class's sampler, which diffusers' pipeline runs by default (`scheduler_defaults`)."""
    return {**scheduler_defaults(scheduler_config), **FAMILY_DEFAULTS[detect_family(text, scheduler_config)]}


def scheduler_defaults(scheduler_config: Mapping) -> dict:
    """The sampler that retraces a scheduler config's class, and its Karras sigmas if it sets them: DDIM for
    SD 2.1's folder, PNDM (plms) for SD v1.5's; {} for a class (or DPM-Solver variant) we do not have."""
    config = scheduler_config
    name = ALIASES.get(config.get("_class_name", ""))
    if name == "dpmpp_2m":                   # one class, several samplers (diffusers' defaults: dpmpp_2m)
        variant = (config.get("algorithm_type", "dpmsolver++"), config.get("solver_type", "midpoint"))
        name = DPM_SOLVER_VARIANTS.get(variant) if config.get("solver_order", 2) == 2 else None
    if name is None:
        return {}
    return {"sampler": name, **({"sigma_schedule": "karras"} if config.get("use_karras_sigmas") else {})}


# diffusers pipeline classes (model_index.json's _class_name) of models that are not supported yet.
UNSUPPORTED_PIPELINES = {
    "StableDiffusionXLPipeline": "an SDXL model", "StableDiffusionXLImg2ImgPipeline": "an SDXL model",
    "StableDiffusionXLInpaintPipeline": "an SDXL inpainting model",
    "StableDiffusionInpaintPipeline": "an inpainting model (a 9-channel UNet)",
    "StableDiffusionDepth2ImgPipeline": "a depth-conditioned model (SD 2 depth, a 5-channel UNet)",
    "StableDiffusionUpscalePipeline": "the x4 upscaler",
    "StableDiffusionInstructPix2PixPipeline": "an InstructPix2Pix model (an 8-channel UNet)",
    "StableUnCLIPPipeline": "an SD 2.1 unCLIP model", "StableUnCLIPImg2ImgPipeline": "an SD 2.1 unCLIP model",
    "LatentConsistencyModelPipeline": "an LCM with a guidance embedding (time_cond_proj_dim)",
}
# UNet input channels other than the latents' 4, by the kind of model that uses them.
UNET_INPUTS = {9: "an inpainting model (9 input channels: latents, mask, masked-image latents)",
               8: "an InstructPix2Pix model (8 input channels: latents and image latents)",
               7: "the x4 upscaler (7 input channels)",
               5: "a depth-conditioned model (5 input channels: latents and depth)"}


def detect_family(text: CLIPTextConfig, scheduler_config: Mapping) -> str:
    """The family (a key of FAMILY_DEFAULTS) of a model with this text encoder and scheduler config.

    SD 2.x is told by its OpenCLIP text encoder (exact GELU), v prediction by the scheduler config, and a
    one-step model by "trailing" timesteps on an ε model without zero-SNR rescaling (SD-Turbo's file).
    """
    if scheduler_config.get("_class_name") == "LCMScheduler":
        return "lcm"
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if (scheduler_config.get("timestep_spacing") == "trailing" and prediction == "epsilon"
            and not scheduler_config.get("rescale_betas_zero_snr", False)):
        return "one-step"
    if text.activation == "gelu":
        return "sd2-v" if prediction == "v_prediction" else "sd2"
    return "sd1"


def check_pipeline_class(model_index: Mapping, folder: Path) -> None:
    """Raise a UserError naming the model when a diffusers folder is not a StableDiffusionPipeline."""
    name = model_index.get("_class_name", "StableDiffusionPipeline")
    if name == "StableDiffusionPipeline":
        return
    kind = UNSUPPORTED_PIPELINES.get(name, f"a {name}")
    raise UserError(f"{folder} holds {kind} ({name}); supported: SD v1.x and 2.x text-to-image "
                    "(StableDiffusionPipeline folders)")


def check_unet_inputs(in_channels: int, latent_channels: int, where: str) -> None:
    """Raise a UserError naming the model kind when the UNet takes more than the latents."""
    if in_channels != latent_channels:
        kind = UNET_INPUTS.get(in_channels, f"a UNet with {in_channels} input channels")
        raise UserError(f"{where} is {kind}; the text-to-image UNet takes the {latent_channels} latent "
                        "channels alone")


def identify_file(path: Path, shapes: Mapping[str, torch.Size]) -> str:
    """"clip" (SD v1.x) or "openclip" (SD 2.x): the text encoder layout of an original-layout checkpoint.

    Other kinds of checkpoint raise a UserError that names them.
    """
    keys, unet = set(shapes), PREFIXES["unet"]
    openclip = any(key.startswith(TEXT_PREFIXES["openclip"]) for key in keys)
    if any(key.startswith("conditioner.embedders.") for key in keys):
        raise UserError(f"{path} is an SDXL checkpoint (conditioner.embedders.*); supported: SD v1.x and 2.x")
    if f"{unet}label_emb.0.0.weight" in keys:
        kind = "an SD 2.1 unCLIP checkpoint" if openclip else "an SDXL-style checkpoint"
        raise UserError(f"{path} is {kind} (a UNet with label_emb); supported: SD v1.x and 2.x")
    conv_in = shapes.get(f"{unet}input_blocks.0.0.weight")
    if conv_in is None:
        raise UserError(f"{path} holds no SD UNet ({unet}*): {_guess_other_kind(keys)}")
    check_unet_inputs(conv_in[1], 4, str(path))
    return "openclip" if openclip else "clip"


def _guess_other_kind(keys: set[str]) -> str:
    if any(key.startswith(("lora_unet_", "lora_te_")) or ".lora_" in key for key in keys):
        return "it looks like a LoRA, which adds to a full model rather than being one"
    if "encoder.conv_in.weight" in keys and "decoder.conv_in.weight" in keys:
        return "it looks like a standalone VAE file"
    if "conv_in.weight" in keys and any(key.startswith("down_blocks.") for key in keys):
        return "it looks like one component of a diffusers folder: pass the folder with model_index.json"
    return f"first keys: {', '.join(sorted(keys)[:5])}"


@torch.no_grad()
def probe_prediction(unet: torch.nn.Module, num_train_timesteps: int = 1000) -> str:
    """"epsilon" or "v_prediction": what `unet(x, t, context)` predicts, from one call at the top noise level.

    There x_t = sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·ε is nearly pure noise (ᾱ = 0.0047 at t = 999 in SD), so an ε-model
    returns about x_t itself, while v = sqrt(ᾱ)·ε - sqrt(1-ᾱ)·x0 is nearly -x0, unrelated to the noise drawn
    (AUTOMATIC1111 tells SD 2 files apart by such a call, as their keys cannot).
    """
    config = unet.config
    parameter = next(unet.parameters())
    x = torch.randn(1, config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.zeros(1, 77, config.context_dim)
    t = torch.tensor([num_train_timesteps - 1.0])
    out = unet(x.to(parameter), t.to(parameter.device), context.to(parameter)).float().cpu()
    # about 0.07 for an ε-model (the sqrt(ᾱ)·x0 part), about 1 for a v-model
    return "epsilon" if (out - x).norm() < 0.5 * x.norm() else "v_prediction"
