"""The one rename table between our (diffusers/transformers) key names and the original single-file layout.

The original Stable Diffusion checkpoints (CompVis' `ldm` code, and the `.ckpt`/`.safetensors` files most
tools share) keep the three networks under one state dict:

    model.diffusion_model.input_blocks.1.0.in_layers.0.weight        UNet (ldm `openaimodel.py`)
    first_stage_model.encoder.down.0.block.1.conv1.weight            VAE  (ldm `model.py`)
    cond_stage_model.transformer.text_model.encoder.layers.0...      CLIP (transformers' names already), SD 1
    cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight  OpenCLIP ViT-H/14 (open_clip), SD 2

`rename_table(...)` builds, for given configs, a dict {our key: original key} from module-level name pairs
(or whole-key pairs); its inverse is the other direction. Only the pairs are written out here: they follow
the configs (number of levels, resnets per level, attention levels, layers), so no SD v1.5 index is
hard-coded. Two entries are not plain renames: the VAE's attention (1x1 convs there, linears here) and
OpenCLIP's fused `in_proj_weight`, whose three row blocks are our `q_proj`, `k_proj` and `v_proj`.
"""

from nanodiffusion.nets.clip_text import CLIPTextConfig
from nanodiffusion.nets.sd_unet import SDUNetConfig
from nanodiffusion.nets.vae import VAEConfig

# Where each network lives in a single file, keyed by our component name (the text encoder: by its layout).
PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model."}
TEXT_PREFIXES = {"clip": "cond_stage_model.transformer.", "openclip": "cond_stage_model.model."}

# Inner layers of one resnet block: original name -> ours.
UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
              "nin_shortcut": "conv_shortcut"}
# The VAE's mid-block attention: 1x1 convs in the original, linear layers in ours (weights reshaped).
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
VAE_CONV_AS_LINEAR = ("to_q", "to_k", "to_v", "to_out.0")
# Inner layers of one OpenCLIP text block: original name -> ours; q/k/v are fused in `attn.in_proj_*`.
OPENCLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
                  "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}
FUSED_QKV = ("q_proj", "k_proj", "v_proj")      # the row blocks of in_proj_weight / in_proj_bias, in order

# Entries of original files that are not network weights, skipped on reading (and never written): EMA copies,
# the training schedule (recomputed from the scheduler config), the VAE's GAN-loss discriminator, the text
# encoder's `position_ids` buffer, the parts of OpenCLIP's text tower that SD 2 never reads (the projection
# to CLIP's joint embedding, the contrastive temperature, the causal mask), and ComfyUI's `v_pred` marker
# (an empty tensor; `V_PREDICTION_MARKER`). Exact names, then name prefixes.
V_PREDICTION_MARKER = "v_pred"
IGNORED_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "lvlb_weights", "logvar", "model_ema.decay", "model_ema.num_updates",
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale",
    "cond_stage_model.model.attn_mask", V_PREDICTION_MARKER,
})
IGNORED_PREFIXES = ("model_ema.", "loss.", "first_stage_model.loss.")
# In a diffusers folder: written by transformers < 4.31, accepted and dropped by our CLIPTextModel.
IGNORED_DIFFUSERS_KEYS = {"text_encoder": frozenset({"text_model.embeddings.position_ids"})}
# Old diffusers folders (before 0.14) name the VAE attention layers differently: old name -> ours.
DEPRECATED_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def is_ignored(original_key: str) -> bool:
    """True for the known non-weight entries of an original file (`IGNORED_KEYS`, `IGNORED_PREFIXES`)."""
    return original_key in IGNORED_KEYS or original_key.startswith(IGNORED_PREFIXES)


def _resnet(ours: str, original: str, inner: dict[str, str]) -> list[tuple[str, str]]:
    return [(f"{ours}.{b}", f"{original}.{a}") for a, b in inner.items()]


def unet_pairs(config: SDUNetConfig) -> list[tuple[str, str]]:
    """(our module, original module) pairs of the UNet; a transformer's inner names are the same in both."""
    pairs = [("conv_in", "input_blocks.0.0"), ("time_embedding.linear_1", "time_embed.0"),
             ("time_embedding.linear_2", "time_embed.2"), ("conv_norm_out", "out.0"), ("conv_out", "out.2")]
    levels, per_level = len(config.channel_mult), config.num_res_blocks + 1   # + 1: the downsampler's slot
    for level in range(levels):
        attention = level in config.attention_levels
        for j in range(config.num_res_blocks):
            n = 1 + level * per_level + j             # input_blocks.0 is conv_in
            pairs += _resnet(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{n}.0", UNET_RESNET)
            if attention:
                pairs.append((f"down_blocks.{level}.attentions.{j}", f"input_blocks.{n}.1"))
        if level < levels - 1:
            n = (level + 1) * per_level
            pairs.append((f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{n}.0.op"))
    pairs += _resnet("mid_block.resnets.0", "middle_block.0", UNET_RESNET)
    pairs.append(("mid_block.attentions.0", "middle_block.1"))
    pairs += _resnet("mid_block.resnets.1", "middle_block.2", UNET_RESNET)
    for u in range(levels):                           # up_blocks[u] works at level levels - 1 - u
        attention = levels - 1 - u in config.attention_levels
        for j in range(per_level):
            n = u * per_level + j
            pairs += _resnet(f"up_blocks.{u}.resnets.{j}", f"output_blocks.{n}.0", UNET_RESNET)
            if attention:
                pairs.append((f"up_blocks.{u}.attentions.{j}", f"output_blocks.{n}.1"))
        if u < levels - 1:                            # the upsampler follows the last resnet (and attention)
            slot = 2 if attention else 1
            pairs.append((f"up_blocks.{u}.upsamplers.0.conv", f"output_blocks.{n}.{slot}.conv"))
    return pairs


def _vae_mid(side: str) -> list[tuple[str, str]]:
    pairs = _resnet(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", VAE_RESNET)
    pairs += [(f"{side}.mid_block.attentions.0.{b}", f"{side}.mid.attn_1.{a}")
              for a, b in VAE_ATTENTION.items()]
    return pairs + _resnet(f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", VAE_RESNET)


def vae_pairs(config: VAEConfig) -> list[tuple[str, str]]:
    """(our module, original module) pairs of the autoencoder."""
    levels = len(config.block_channels)
    pairs = [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    for side in ("encoder", "decoder"):
        pairs += [(f"{side}.conv_in", f"{side}.conv_in"), (f"{side}.conv_norm_out", f"{side}.norm_out"),
                  (f"{side}.conv_out", f"{side}.conv_out")]
        pairs += _vae_mid(side)
    for level in range(levels):
        for j in range(config.layers_per_block):
            pairs += _resnet(f"encoder.down_blocks.{level}.resnets.{j}", f"encoder.down.{level}.block.{j}",
                             VAE_RESNET)
        if level < levels - 1:
            pairs.append((f"encoder.down_blocks.{level}.downsamplers.0.conv",
                          f"encoder.down.{level}.downsample.conv"))
    for i in range(levels):                       # ours start at the lowest resolution, ldm's `up` ends there
        k = levels - 1 - i
        for j in range(config.layers_per_block + 1):
            pairs += _resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{k}.block.{j}", VAE_RESNET)
        if i < levels - 1:
            pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{k}.upsample.conv"))
    return pairs


def text_layout(config: CLIPTextConfig) -> str:
    """"openclip" for OpenCLIP's towers (SD 2.x), "clip" for OpenAI's (SD v1.x): the two differ in their
    activation (exact GELU against quick GELU), and single files store them in these two layouts."""
    return "openclip" if config.activation == "gelu" else "clip"


def text_prefix(config: CLIPTextConfig) -> str:
    """Where the text encoder lives in a single file."""
    return TEXT_PREFIXES[text_layout(config)]


def text_pairs(config: CLIPTextConfig) -> list[tuple[str, str]]:
    """SD v1.x stores transformers' CLIPTextModel keys unchanged under `cond_stage_model.transformer.`;
    SD 2.x stores open_clip's text tower under `cond_stage_model.model.`, with whole-key pairs where open_clip
    keeps a bare parameter (`positional_embedding`) or a fused q/k/v one."""
    if text_layout(config) == "clip":
        return [("text_model", "text_model")]
    pairs = [("text_model.embeddings.token_embedding", "token_embedding"),
             ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
             ("text_model.final_layer_norm", "ln_final")]
    for n in range(config.num_layers):
        ours, original = f"text_model.encoder.layers.{n}", f"transformer.resblocks.{n}"
        pairs += [(f"{ours}.{b}", f"{original}.{a}") for a, b in OPENCLIP_LAYER.items()]
        pairs += [(f"{ours}.self_attn.{proj}.{leaf}", f"{original}.attn.in_proj_{leaf}")
                  for proj in FUSED_QKV for leaf in ("weight", "bias")]
    return pairs


PAIRS = {"unet": unet_pairs, "vae": vae_pairs, "text_encoder": text_pairs}


def rename_table(component: str, config, our_keys) -> dict[str, str]:
    """{our key: original key (with its single-file prefix)} for every key in `our_keys` of `component`.

    The three keys of a fused q/k/v share one original key (see `fused_index`).
    """
    prefix = text_prefix(config) if component == "text_encoder" else PREFIXES[component]
    return rename_by_pairs(PAIRS[component](config), prefix, our_keys, component)


def rename_by_pairs(pairs: list[tuple[str, str]], prefix: str, our_keys, what: str) -> dict[str, str]:
    """{our key: `prefix` + original key}, each key renamed through its longest prefix (itself included) in
    `pairs`; a key no pair covers is a bug in the pairs of `what`."""
    modules = dict(pairs)
    table = {}
    for key in our_keys:
        parts = key.split(".")
        for cut in range(len(parts), 0, -1):
            module = ".".join(parts[:cut])
            if module in modules:
                table[key] = prefix + ".".join([modules[module], *parts[cut:]])
                break
        else:
            raise AssertionError(f"no original name for {what} key {key!r}: rename pairs incomplete")
    return table


def is_conv_as_linear(component: str, our_key: str) -> bool:
    """True for weights stored as (C, C, 1, 1) convs in the original file and as (C, C) linears in ours."""
    if component != "vae" or not our_key.endswith(".weight"):
        return False
    module = our_key[: -len(".weight")]
    return ".mid_block.attentions.0." in module and module.endswith(VAE_CONV_AS_LINEAR)


def fused_index(our_key: str, original_key: str) -> int | None:
    """Which row block (0: q, 1: k, 2: v) of a fused OpenCLIP `in_proj_*` tensor `our_key` is; None when the
    original key is not a fused one."""
    if not original_key.rpartition(".")[2].startswith("in_proj_"):
        return None
    return FUSED_QKV.index(our_key.split(".")[-2])
