"""The prompt-adherence scores a miniature CLIP (nets/mini_clip.py) gives generated images.

`CLIPScorer` measures how well images follow their prompts: CLIPScore (100·max(cos, 0), Hessel et al. 2021,
without their 2.5 rescaling) and retrieval accuracy (how often an image is closest to its own prompt among
candidates). `nanodiffusion train text-encoder` writes the model it loads (training/export.save_mini_clip).
"""

from pathlib import Path

import torch

from nanodiffusion.errors import UserError
from nanodiffusion.nets.clip_text import CLIPTextConfig
from nanodiffusion.nets.mini_clip import MiniCLIP, MiniCLIPConfig
from nanodiffusion.tokenizer import CLIPTokenizer
from nanodiffusion.weights.checkpoint import load_checkpoint, unprefixed

CHECKPOINT_NAME = "clip.safetensors"    # in the output folder of `nanodiffusion train text-encoder`


class CLIPScorer:
    """Prompt adherence of images (B, C, H, W) in [-1, 1] under a trained MiniCLIP."""

    def __init__(self, model: MiniCLIP, tokenizer: CLIPTokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "CLIPScorer":
        """Load what `save_mini_clip` wrote (the output folder of `nanodiffusion train text-encoder`)."""
        folder = Path(folder)
        tensors, meta = load_checkpoint(folder / CHECKPOINT_NAME)
        if meta.get("kind") != "mini_clip":
            raise UserError(f"{folder / CHECKPOINT_NAME} is not a miniature CLIP (kind={meta.get('kind')!r})")
        model = MiniCLIP(MiniCLIPConfig.from_dict(meta["clip"]), CLIPTextConfig.from_dict(meta["text"]))
        model.load_state_dict(unprefixed("clip", tensors))
        return cls(model, CLIPTokenizer.from_pretrained(folder / "tokenizer"))

    @torch.no_grad()
    def similarity(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Cosine similarities (N, P) of each image with each prompt."""
        images = self.model.embed_images(images.float())
        texts = self.model.embed_text(self.tokenizer(prompts, padding="longest"))
        return images @ texts.T

    def clip_score(self, images: torch.Tensor, prompts: list[str]) -> float:
        """Mean CLIPScore 100·max(cos(image_i, prompt_i), 0) over pairs (one prompt per image)."""
        _check_pairs(images, prompts)
        cosine = self.similarity(images, prompts).diagonal()
        return (100 * cosine.clamp(min=0)).mean().item()

    def retrieval_accuracy(self, images: torch.Tensor, prompts: list[str],
                           candidates: list[str] | None = None) -> float:
        """Fraction of images whose closest prompt among `candidates` (default: the distinct prompts) is
        their own prompt."""
        _check_pairs(images, prompts)
        candidates = list(candidates) if candidates is not None else sorted(set(prompts))
        missing = sorted(set(prompts) - set(candidates))
        if missing:
            raise UserError(f"prompts missing from the candidates: {missing[:5]}")
        best = self.similarity(images, candidates).argmax(dim=1)
        return sum(candidates[i] == prompt for i, prompt in zip(best.tolist(), prompts)) / len(prompts)


def _check_pairs(images: torch.Tensor, prompts: list[str]) -> None:
    if len(images) != len(prompts):
        raise UserError(f"got {len(images)} images but {len(prompts)} prompts: pass one prompt per image")
