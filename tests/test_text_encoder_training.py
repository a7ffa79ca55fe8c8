"""Text encoder pre-training (stage 2 of text-to-image): the contrastive loss, a tiny miniature-CLIP run,
exact resume, the exported tokenizer and text encoder as transformers reads them, the CLIP-score evaluator,
the CLI."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fixtures import make_fake_mnist
from nanodiffusion.cli import main
from nanodiffusion.data.captioned import load_captioned
from nanodiffusion.evaluation.clip_score import CLIPScorer
from nanodiffusion.nets.clip_text import TINY_TEXT
from nanodiffusion.nets.mini_clip import MiniCLIPConfig
from nanodiffusion.tokenizer import CLIPTokenizer
from nanodiffusion.training.captions import all_captions, caption_tokenizer, text_config_for
from nanodiffusion.training.clip_trainer import TextEncoderTrainConfig, TextEncoderTrainer, contrastive_loss
from nanodiffusion.training.export import load_component

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CLIP = MiniCLIPConfig(image_size=16, image_widths=(16, 32), embed_dim=32)


@pytest.fixture
def dataset(tmp_path):
    """64 toy digits (class k: a bar at row 2k+2) at 16x16, captioned by every wording of their class."""
    make_fake_mnist(tmp_path / "mnist")
    return load_captioned("mnist", image_size=16, data_dir=str(tmp_path / "mnist"))


def make_trainer(tmp_path, dataset, **changes):
    settings = dict(out_dir=str(tmp_path / "run"), batch_size=16, lr=2e-3, warmup_steps=0, epochs=3)
    tokenizer = caption_tokenizer(dataset, 600)
    clip = dataclasses.replace(CLIP, image_channels=dataset.channels)
    return TextEncoderTrainer(TextEncoderTrainConfig(**(settings | changes)), clip,
                              text_config_for(tokenizer, TINY_TEXT), dataset, tokenizer)


def test_contrastive_loss_is_clip_infonce_with_repeated_captions_as_positives():
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(4, 8, generator=generator), dim=1)
    texts = F.normalize(torch.randn(4, 8, generator=generator), dim=1)
    scale = torch.tensor(10.0)
    logits = scale * images @ texts.T
    labels = torch.arange(4)
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2   # Radford et al. Fig. 3
    loss, _ = contrastive_loss(images, texts, scale, torch.eye(4, dtype=torch.bool))
    torch.testing.assert_close(loss, clip)
    # items 0 and 1 share a caption: each of their rows targets both columns with weight 1/2
    same = torch.eye(4, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True
    loss, accuracy = contrastive_loss(images, texts, scale, same)
    targets = same.float() / same.sum(1, keepdim=True)
    image_to_text = -(targets * logits.log_softmax(1)).sum(1).mean()
    text_to_image = -(targets * logits.T.log_softmax(1)).sum(1).mean()
    expected = (image_to_text + text_to_image) / 2
    torch.testing.assert_close(loss, expected)
    assert accuracy == same[labels, logits.argmax(1)].float().mean()


def test_hard_negatives_are_extra_caption_columns_of_the_image_to_text_side_only():
    generator = torch.Generator().manual_seed(1)
    images = F.normalize(torch.randn(3, 8, generator=generator), dim=1)
    texts = F.normalize(torch.randn(5, 8, generator=generator), dim=1)          # 3 captions, 2 negatives
    scale = torch.tensor(7.0)
    same = torch.zeros(3, 5, dtype=torch.bool)
    same[:, :3] = torch.eye(3, dtype=torch.bool)
    loss, _ = contrastive_loss(images, texts, scale, same)
    logits = scale * images @ texts.T
    labels = torch.arange(3)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :3].T, labels)) / 2
    torch.testing.assert_close(loss, expected)
    without, _ = contrastive_loss(images, texts[:3], scale, same[:, :3])
    assert loss > without                                   # more competitors, higher image-to-text loss


def test_tiny_shapes_run_with_hard_negatives_resumes_exactly(tmp_path):
    shapes = load_captioned("shapes", image_size=16, num_shapes=48, two_object_prob=0.5)
    changes = dict(hard_negatives=True, epochs=4)
    full = make_trainer(tmp_path / "a", shapes, **changes).fit().losses         # 3 steps per epoch
    make_trainer(tmp_path / "b", shapes, **changes, max_steps=5).fit()
    resumed = make_trainer(tmp_path / "b", shapes, **changes)
    resumed.resume(tmp_path / "b" / "run" / "last.safetensors")
    assert resumed.fit().losses == full[5:]
    plain = make_trainer(tmp_path / "c", shapes, epochs=4).fit().losses
    assert full[0] > plain[0]                               # the negatives join the softmax from step one


def test_tiny_run_learns_to_match_captions_and_exports_a_clip_scorer(tmp_path, dataset):
    state = make_trainer(tmp_path, dataset, epochs=25).fit()
    first, last = sum(state.losses[:4]) / 4, sum(state.losses[-4:]) / 4
    assert last < 0.5 * first
    scorer = CLIPScorer.from_pretrained(tmp_path / "run")
    images = dataset.batch(torch.arange(len(dataset)), torch.Generator())[0]
    captions = [dataset.caption(i) for i in range(len(dataset))]     # canonical: "the handwritten digit 3"
    assert scorer.retrieval_accuracy(images, captions) > 0.5             # chance: 1 in 10
    shuffled = captions[1:] + captions[:1]            # each image with its neighbour's: another digit's
    assert scorer.clip_score(images, captions) > scorer.clip_score(images, shuffled) + 10


def test_resume_reproduces_the_uninterrupted_losses(tmp_path, dataset):
    full = make_trainer(tmp_path / "a", dataset, max_steps=10).fit().losses       # 4 steps per epoch
    make_trainer(tmp_path / "b", dataset, max_steps=6).fit()
    resumed = make_trainer(tmp_path / "b", dataset, max_steps=10)
    resumed.resume(tmp_path / "b" / "run" / "last.safetensors")
    assert resumed.state.step == 6
    assert resumed.fit().losses == full[6:]


def test_exported_tokenizer_and_text_encoder_load_in_transformers(tmp_path, dataset):
    transformers = pytest.importorskip("transformers")
    trainer = make_trainer(tmp_path, dataset, max_steps=2)
    trainer.fit()
    captions = all_captions(dataset)[:5] + ["", "a digit nobody wrote: 42!"]
    ours = CLIPTokenizer.from_pretrained(tmp_path / "run" / "tokenizer")
    theirs = transformers.CLIPTokenizer.from_pretrained(tmp_path / "run" / "tokenizer")
    ids = ours(captions)
    assert ids.tolist() == theirs(captions, padding="max_length", max_length=77).input_ids
    text_encoder = load_component(tmp_path / "run", "text_encoder").eval()
    reference = transformers.CLIPTextModel.from_pretrained(tmp_path / "run" / "text_encoder").eval()
    with torch.no_grad():
        torch.testing.assert_close(text_encoder(ids).hidden_states, reference(ids).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
        trained = trainer.model.text_encoder(ids).hidden_states
        torch.testing.assert_close(text_encoder(ids).hidden_states, trained)


def test_cli_trains_a_text_encoder(tmp_path, capsys):
    make_fake_mnist(tmp_path / "mnist")
    out = tmp_path / "text-run"
    main(["train", "text-encoder", "--dataset", "mnist", "--data-dir", str(tmp_path / "mnist"),
          "--image-size", "16", "--image-widths", "16", "32",
          "--embed-dim", "32", "--vocab-size", "600", "--text-width", "32", "--text-layers", "2",
          "--text-heads", "2", "--batch-size", "16", "--max-steps", "3", "--out-dir", str(out)])
    assert "done: 3 steps" in capsys.readouterr().out
    for path in ("text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/vocab.json",
                 "tokenizer/merges.txt", "clip.safetensors"):
        assert (out / path).is_file(), path
    assert load_component(out, "text_encoder").config.hidden_size == 32
