"""Does a miniature CLIP read word order and attribute binding? Caption retrieval against hard negatives.

Each rendered shapes scene's canonical caption competes with its `hard_negatives`, one per kind: for two
objects, the objects swapped, the relation reversed, colours or shapes exchanged between them; for one,
another colour, shape, size or position. A kind is read when the true caption is the more similar (a tie
counts half). A bag of words scores 50 % on swapped objects, whose caption holds the very same words, and a
sequence-blind encoder cannot beat that (Yuksekgonul et al. 2023, the ARO benchmark, in miniature).

`caption_separation` needs no image tower: the mean cosine similarity of a text encoder's pooled states for a
caption and each of its hard negatives (1: the encoder cannot tell them apart; unrelated captions: near 0).
"""

from collections import defaultdict

import torch
import torch.nn.functional as F

from nanodiffusion.data.shapes import ShapesDataset, describe
from nanodiffusion.data.shapes_captions import hard_negatives
from nanodiffusion.errors import UserError
from nanodiffusion.evaluation.clip_score import CLIPScorer
from nanodiffusion.images import uint8_to_float

PROBE_SEED = 1234                   # the scenes of the shapes prompts of `eval`, not the training scenes


@torch.no_grad()
def caption_separation(text_encoder, tokenizer, num_scenes: int = 400, *, seed: int = PROBE_SEED) -> dict:
    """{"two objects": {kind: mean cosine}, "one object": {kind: mean cosine}}: pooled text states of each
    scene's canonical caption against its hard negatives, and against another scene's caption ("other")."""
    scenes = ShapesDataset(32, seed=seed, num_items=num_scenes, two_object_prob=0.5)
    generator = torch.Generator().manual_seed(seed)
    cosines = defaultdict(list)
    for i in range(num_scenes):
        scene = scenes.attributes(i)
        caption, other = describe(scene), describe(scenes.attributes((i + 1) % num_scenes))
        kinds = hard_negatives(caption, generator) | {"other": other}
        pooled = F.normalize(text_encoder(tokenizer([caption, *kinds.values()])).pooled.float(), dim=-1)
        group = "one object" if scene["relation"] is None else "two objects"
        for kind, similarity in zip(kinds, (pooled[1:] @ pooled[0]).tolist()):
            cosines[group, kind].append(similarity)
    return _group_means(cosines)


def compositional_retrieval(scorer: CLIPScorer, num_scenes: int = 600, *, seed: int = PROBE_SEED) -> dict:
    """{"two objects": {kind: rate}, "one object": {kind: rate}, "num_scenes": n}, on `num_scenes` scenes
    (half with two objects) drawn from `seed` at the scorer's image size."""
    if num_scenes < 2:
        raise UserError(f"num_scenes must be >= 2, got {num_scenes}")
    config = scorer.model.config
    scenes = ShapesDataset(config.image_size, seed=seed, num_items=num_scenes, two_object_prob=0.5)
    items = [scenes[i] for i in range(num_scenes)]
    images = uint8_to_float(torch.stack([image for image, _, _ in items]))
    if config.image_channels == 1:
        images = images.mean(dim=1, keepdim=True)
    generator = torch.Generator().manual_seed(seed)
    negatives = [hard_negatives(caption, generator) for _, caption, _ in items]
    texts = sorted({caption for _, caption, _ in items} | {n for kinds in negatives for n in kinds.values()})
    column = {text: j for j, text in enumerate(texts)}
    similarity = scorer.similarity(images, texts)                              # (scenes, texts)
    wins = defaultdict(list)
    for i, ((_, caption, scene), kinds) in enumerate(zip(items, negatives)):
        group = "one object" if scene["relation"] is None else "two objects"
        true = similarity[i, column[caption]]
        for kind, negative in kinds.items():
            false = similarity[i, column[negative]]
            wins[group, kind].append(1.0 if true > false else 0.5 if true == false else 0.0)
    return {"num_scenes": num_scenes, **_group_means(wins)}


def _group_means(values: dict) -> dict:
    """{(group, kind): [numbers]} -> {group: {kind: mean}}."""
    result = {"one object": {}, "two objects": {}}
    for (group, kind), numbers in sorted(values.items()):
        result[group][kind] = sum(numbers) / len(numbers)
    return result
