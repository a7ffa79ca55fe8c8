"""Pre-training the text encoder contrastively with a small image encoder: a miniature CLIP (Radford et al.
2021, §2.3 and Fig. 3), whose text transformer then conditions the UNet frozen, as SD's CLIP text encoder
does, and whose image tower scores prompt adherence (`evaluation.clip_score`). The network is
`nets/mini_clip.py`.

The loss is the symmetric InfoNCE over the batch (van den Oord et al. 2018) with a learned temperature. Small
data sets repeat captions ("a handwritten digit three" appears about B/10 times in an MNIST batch), so every
pair with the same caption counts as a positive, with uniform targets over them, instead of as a negative.
With `hard_negatives`, each shapes caption also brings captions in its own words that describe another scene
(objects or relation swapped, `data.shapes_captions`): extra columns of the image-to-text softmax (NegCLIP,
Yuksekgonul et al. 2023), without which a text encoder can score well as a bag of words.
In a torchrun run each rank embeds its slice and the embeddings of all ranks are gathered, so that the loss
compares every image with every caption of the global batch, as one process would.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nanodiffusion.data.captioned import CaptionedDataset
from nanodiffusion.data.shapes_captions import hard_negatives
from nanodiffusion.errors import UserError
from nanodiffusion.nets.clip_text import CLIPTextConfig
from nanodiffusion.nets.mini_clip import MAX_LOGIT_SCALE, MiniCLIP, MiniCLIPConfig
from nanodiffusion.tokenizer import CLIPTokenizer
from nanodiffusion.training import distributed
from nanodiffusion.training.captions import check_tokenizer, init_clip_text_
from nanodiffusion.training.checkpointed import Checkpointed
from nanodiffusion.training.export import save_component, save_mini_clip
from nanodiffusion.training.run_state import LoopConfig, RunState, TrainState


@dataclass(frozen=True)
class TextEncoderTrainConfig(LoopConfig):
    """A contrastive pre-training run (saved in every checkpoint); see LoopConfig for the shared settings."""

    out_dir: str = "runs/text-encoder"
    lr: float = 5e-4
    weight_decay: float = 0.01
    hard_negatives: bool = False          # contrast shapes captions with their swapped-object/relation edits


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                     same_caption: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE of unit-norm embeddings: B images, B captions then N hard negatives (B + N, E), with
    soft targets spread uniformly over the pairs of `same_caption` (B, B + N, bool; the identity when captions
    are distinct). The negatives only join the image-to-text side. Returns the loss and the image-to-text
    top-1 accuracy (among captions and negatives)."""
    batch = len(image_embeds)
    logits = logit_scale * image_embeds @ text_embeds.T                   # (B images, B captions + N)
    image_to_text = _soft_cross_entropy(logits, same_caption)
    text_to_image = _soft_cross_entropy(logits[:, :batch].T, same_caption[:, :batch].T)
    hits = same_caption.gather(1, logits.argmax(dim=1, keepdim=True)).float().mean()
    return (image_to_text + text_to_image) / 2, hits


def _soft_cross_entropy(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the cross-entropy against targets uniform over each row's positives (bool)."""
    targets = positives.float() / positives.sum(dim=1, keepdim=True)           # rows sum to 1
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


class TextEncoderTrainer(Checkpointed):
    """Trains a MiniCLIP on a captioned data set with a tokenizer trained on its captions; `fit()` trains and
    exports `out_dir/text_encoder/`, `out_dir/tokenizer/` and `out_dir/clip.safetensors` (the CLIP-score
    evaluator)."""

    def __init__(self, config: TextEncoderTrainConfig, clip_config: MiniCLIPConfig,
                 text_config: CLIPTextConfig, dataset: CaptionedDataset, tokenizer: CLIPTokenizer):
        check_tokenizer(tokenizer, text_config)
        self.config, self.dataset, self.tokenizer = config, dataset, tokenizer
        # full batches only: the loss of a small last batch is easier, and ranks gather equal slices
        self.run = RunState(config, len(dataset), drop_last=True)
        if config.batch_size % self.run.world_size:
            raise UserError(f"the batch size {config.batch_size} must be divisible by the number of "
                            f"processes ({self.run.world_size})")
        self.model = MiniCLIP(clip_config, text_config)
        init_clip_text_(self.model.text_encoder)
        self.model.to(self.run.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.run.register(self.optimizer, {"clip": self.model},
                          {"kind": "mini_clip", "clip": clip_config.to_dict(), "text": text_config.to_dict(),
                           "tokenizer_merges": [list(pair) for pair in tokenizer.merges]})
        self.net = distributed.parallel(self.model)
        self.out_dir = Path(config.out_dir)

    @property
    def state(self) -> TrainState:
        return self.run.state

    def train_step(self, indices: torch.Tensor) -> dict[str, float]:
        """One step on the global batch at `indices`; returns its loss and retrieval accuracy."""
        run = self.run
        images, captions = self.dataset.batch(indices, run.generator)
        mine = run.shard(len(images))
        negatives = self._negatives(captions)
        padded = negatives + [""] * (-len(negatives) % run.world_size)    # each rank embeds an equal slice
        texts = captions[mine] + padded[run.shard(len(padded))]
        # padding to the longest caption is exact here: attention is causal and the pooled state is read at
        # the end-of-text token, before any padding
        input_ids = self.tokenizer(texts, padding="longest").to(run.device)
        with run.autocast():
            image_embeds, text_embeds, logit_scale = self.net(images[mine].to(run.device), input_ids)
        image_embeds = distributed.gather_with_grad(image_embeds)                  # (B, E) on every rank
        local = len(captions[mine])
        parts = [distributed.gather_with_grad(text_embeds[:local])]                # (B, E): the captions
        if negatives:
            parts.append(distributed.gather_with_grad(text_embeds[local:])[:len(negatives)])   # (N, E)
        candidates = captions + negatives
        same = torch.tensor([[a == b for b in candidates] for a in captions], device=run.device)  # (B, B+N)
        loss, accuracy = contrastive_loss(image_embeds, torch.cat(parts), logit_scale, same)
        # every rank computes this same loss; see distributed.gather_with_grad for why DDP's average is right
        run.optimizer_step(loss)
        with torch.no_grad():
            self.model.logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))
        return {"loss": loss.item(), "accuracy": accuracy.item()}

    def _negatives(self, captions: list[str]) -> list[str]:
        """The hard negatives of the batch's captions, in order (none unless `hard_negatives`)."""
        if not self.config.hard_negatives:
            return []
        generator = self.run.generator
        return [negative for caption in captions for negative in hard_negatives(caption, generator).values()]

    def fit(self) -> TrainState:
        """Train, then export the text encoder, tokenizer and CLIP-score evaluator to `out_dir` (rank 0)."""
        self.model.train()
        state = self.run.fit(self.train_step)
        if self.run.is_main:
            self.export(self.out_dir)
        return state

    def export(self, folder: str | Path) -> Path:
        """Write `folder/text_encoder/`, `folder/tokenizer/` and `folder/clip.safetensors`."""
        save_mini_clip(self.model, self.tokenizer, folder)
        return save_component(self.model.text_encoder, folder, "text_encoder")

    def _check_checkpoint(self, meta: dict) -> None:
        if meta.get("kind") != "mini_clip" or MiniCLIPConfig.from_dict(meta["clip"]) != self.model.config \
                or CLIPTextConfig.from_dict(meta["text"]) != self.model.text_config:
            raise UserError("the checkpoint holds another kind of model or other configs; resume with the "
                            "same settings")
        if [tuple(pair) for pair in meta["tokenizer_merges"]] != list(self.tokenizer.merges):
            raise UserError("the checkpoint was trained with another tokenizer (its captions differ)")
