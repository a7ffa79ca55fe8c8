"""Wordings of shapes scenes and their hard negatives: every wording is true of its rendered scene and every
hard negative is false of it (judged by the exact check), and the caption-retrieval probe scores an exact
oracle at 100 % and a bag of words at chance on swapped objects."""

import pytest
import torch

from nanodiffusion.data.shapes import ShapesDataset, describe, parse_shapes_caption
from nanodiffusion.data.shapes_captions import CANONICAL_WEIGHT, caption_choices, hard_negatives
from nanodiffusion.evaluation.clip_score import MiniCLIPConfig
from nanodiffusion.evaluation.compositional_retrieval import (
    PROBE_SEED, caption_separation, compositional_retrieval,
)
from nanodiffusion.evaluation.shapes_check import check_shapes
from nanodiffusion.images import float_to_uint8

SCENES = ShapesDataset(32, seed=21, num_items=60, two_object_prob=0.5)


@pytest.mark.parametrize("index", range(0, 60, 3))
def test_every_wording_is_true_of_the_scene_and_every_hard_negative_false(index):
    image, caption, scene = SCENES[index]
    choices = caption_choices(scene)
    assert caption == describe(scene) and choices[:CANONICAL_WEIGHT] == (caption,) * CANONICAL_WEIGHT
    assert len(set(choices)) == len(choices) - CANONICAL_WEIGHT + 1          # the variants all differ
    generator = torch.Generator().manual_seed(index)
    for wording in set(choices):
        assert check_shapes(image, wording)["all"], wording
        negatives = hard_negatives(wording, generator)
        kinds = {"swapped", "relation"} if scene["relation"] else {"color", "shape"}
        assert kinds <= set(negatives)
        for kind, negative in negatives.items():
            assert not check_shapes(image, negative)["all"], (wording, kind, negative)
        if scene["relation"]:                                  # a bag of words cannot tell these apart
            assert sorted(negatives["swapped"].split()) == sorted(wording.split())


def test_synonyms_parse_as_the_canonical_words():
    parsed = parse_shapes_caption("a big red circle in the upper left corner")["objects"][0]
    assert (parsed["size"], parsed["position"]) == ("large", "top left")
    assert parse_shapes_caption("a red cross beneath a blue square")["relation"] == "below"
    assert parse_shapes_caption("a red cross to the right of a blue square")["relation"] == "right of"
    assert parse_shapes_caption("a red cross over a blue square")["relation"] == "above"


def test_captions_of_other_data_sets_have_no_hard_negatives():
    generator = torch.Generator().manual_seed(0)
    for caption in ("a photo of a sneaker", "a black and white photo of a dress", "the digit 3", ""):
        assert hard_negatives(caption, generator) == {}


PROBE_SCENES = ShapesDataset(32, seed=PROBE_SEED, num_items=40, two_object_prob=0.5)   # what the probe draws
CANONICAL = {image.numpy().tobytes(): caption for image, caption, _ in (PROBE_SCENES[i] for i in range(40))}


class ExactScorer:
    """Stands in for CLIPScorer: similarity 1 when the exact check passes every stated attribute (or, as a
    bag of words, when the prompt has the words of the image's canonical caption in any order), else 0."""

    def __init__(self, bag_of_words: bool = False):
        self.model = type("Model", (), {"config": MiniCLIPConfig(image_channels=3)})()
        self.bag_of_words = bag_of_words

    def similarity(self, images, prompts):
        pixels = float_to_uint8(images)
        return torch.tensor([[self._match(image, prompt) for prompt in prompts] for image in pixels])

    def _match(self, image, prompt) -> float:
        if self.bag_of_words:
            return float(sorted(prompt.split()) == sorted(CANONICAL[image.numpy().tobytes()].split()))
        return float(check_shapes(image, prompt)["all"])


def test_the_retrieval_probe_scores_an_exact_judge_fully_and_a_bag_of_words_at_chance_on_order():
    exact = compositional_retrieval(ExactScorer(), 40)
    assert exact["num_scenes"] == 40
    assert set(exact["two objects"]) >= {"swapped", "relation", "colors"}
    assert all(rate == 1.0 for group in ("one object", "two objects") for rate in exact[group].values())
    bag = compositional_retrieval(ExactScorer(bag_of_words=True), 40)
    assert bag["two objects"]["swapped"] == 0.5 and bag["one object"]["color"] == 1.0


def test_caption_separation_is_one_for_an_encoder_that_reads_only_the_end_token():
    from nanodiffusion.nets.clip_text import TINY_TEXT, CLIPTextModel
    from nanodiffusion.training.captions import text_config_for
    from nanodiffusion.tokenizer import train_bpe
    captions = [caption for i in range(40) for caption in caption_choices(PROBE_SCENES.attributes(i))]
    tokenizer = train_bpe(captions, 600, model_max_length=24)
    torch.manual_seed(0)
    encoder = CLIPTextModel(text_config_for(tokenizer, TINY_TEXT)).eval()
    seeing = caption_separation(encoder, tokenizer, 20)
    with torch.no_grad():           # no attention output, no positions: the pooled state is the end token's
        encoder.text_model.embeddings.position_embedding.weight.zero_()
        for layer in encoder.text_model.encoder.layers:
            layer.self_attn.out_proj.weight.zero_()
            layer.self_attn.out_proj.bias.zero_()
    blind = caption_separation(encoder, tokenizer, 20)
    assert all(value == pytest.approx(1.0) for group in blind.values() for value in group.values())
    assert set(seeing["two objects"]) >= {"swapped", "relation", "other"}
    assert all(-1 <= value < 1 for group in seeing.values() for value in group.values())
