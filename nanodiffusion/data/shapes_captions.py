"""The many ways to say one shapes scene, and the captions that almost say it.

`caption_choices` gives the wordings a training image is captioned with: the canonical caption of `describe`
(weighted), the converse relation ("a green triangle right of a blue square"), synonyms ("to the left of",
"over", "big"), sizes stated for both objects, the position said first, and captions that leave the size or
the position out. `hard_negatives` edits a caption into captions that use the same words but describe another
scene: the two objects exchanged, the relation reversed, colours or shapes exchanged between the objects, a
mirrored position, the other size. A contrastive text encoder must rank the true caption above them, which a
bag of words cannot (NegCLIP, Yuksekgonul et al. 2023, §4).
"""

import torch

from nanodiffusion.data.shapes import (
    COLORS, POSITION_PHRASES, RELATION_SYNONYMS, SHAPES, SIZE_SYNONYMS, describe, relation_phrase,
)

CANONICAL_WEIGHT = 4                # the canonical caption is this many of an item's choices
CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
POSITION_SYNONYMS = {               # a second phrase for each grid cell
    "top left": "in the upper left corner", "top": "at the top edge",
    "top right": "in the upper right corner",
    "left": "at the left edge", "center": "in the middle", "right": "at the right edge",
    "bottom left": "in the lower left corner", "bottom": "at the bottom edge",
    "bottom right": "in the lower right corner",
}
MIRROR_WORDS = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "upper": "lower",
                "lower": "upper", "center": "top", "middle": "bottom"}
SIZE_WORDS = {"small": "large", "large": "small", "little": "big", "big": "little"}


def caption_choices(attributes: dict) -> tuple[str, ...]:
    """The wordings of a scene (`sample_attributes`), the canonical caption first and CANONICAL_WEIGHT times;
    every one states only what is true of the scene."""
    objects, relation = attributes["objects"], attributes["relation"]
    if relation is None:
        obj = objects[0]
        variants = [
            _object_phrase(obj, SIZE_SYNONYMS[obj["size"]]) + " " + POSITION_SYNONYMS[obj["position"]],
            f"{POSITION_PHRASES[obj['position']]}, {_object_phrase(obj, obj['size'])}",
            _object_phrase(obj) + " " + POSITION_PHRASES[obj["position"]],          # size left out
            _object_phrase(obj, obj["size"]),                                       # position left out
        ]
    else:
        first, second = objects
        converse = CONVERSE[relation]
        variants = [
            f"{_object_phrase(second)} {converse} {_object_phrase(first)}",
            f"{_object_phrase(first)} {RELATION_SYNONYMS[relation][-1]} {_object_phrase(second)}",
            f"{_object_phrase(second)} {RELATION_SYNONYMS[converse][1]} {_object_phrase(first)}",
            f"{_object_phrase(first, first['size'])} {relation} {_object_phrase(second, second['size'])}",
        ]
    return (describe(attributes),) * CANONICAL_WEIGHT + tuple(variants)


def _object_phrase(obj: dict, size: str | None = None) -> str:
    return " ".join(filter(None, ("a", size, obj["color"], obj["shape"])))


def hard_negatives(caption: str, generator: torch.Generator) -> dict[str, str]:
    """Captions in the words of `caption` (a shapes caption in any wording of `caption_choices`) that state
    another scene, by what was changed: two objects "swapped", "relation" reversed, "colors" or "shapes"
    exchanged between them; one object's "color" or "shape" (drawn from `generator`), "size", "position"
    (where stated). {} for a caption that is not a shapes caption."""
    words = caption.split()
    bare = {word.strip(",") for word in words}
    if not bare & set(COLORS) or not bare & set(SHAPES):
        return {}
    found = relation_phrase(caption)
    if found is None:
        return _single_object_negatives(words, generator)
    relation, phrase = found
    first, second = caption.split(f" {phrase} ", 1)
    opposite = RELATION_SYNONYMS[CONVERSE[relation]][min(RELATION_SYNONYMS[relation].index(phrase), 1)]
    negatives = {"swapped": f"{second} {phrase} {first}", "relation": f"{first} {opposite} {second}"}
    for name, vocabulary in (("colors", COLORS), ("shapes", SHAPES)):
        a, b = (next(word for word in part.split() if word in vocabulary) for part in (first, second))
        if a != b:
            negatives[name] = " ".join(_exchange(words, a, b))
    return negatives


def _single_object_negatives(words: list[str], generator: torch.Generator) -> dict[str, str]:
    """The caption with another colour, another shape, and (where stated) the other size and the mirrored
    position."""
    negatives = {}
    for name, vocabulary in (("color", COLORS), ("shape", SHAPES)):
        index = next(i for i, word in enumerate(words) if word.strip(",") in vocabulary)
        word = words[index].strip(",")
        others = [other for other in vocabulary if other != word]
        pick = others[int(torch.randint(len(others), (), generator=generator))]
        negatives[name] = " ".join(words[:index] + [words[index].replace(word, pick)] + words[index + 1:])
    for name, table in (("size", SIZE_WORDS), ("position", MIRROR_WORDS)):
        if any(word.strip(",") in table for word in words):
            negatives[name] = " ".join(_replace_words(words, table))
    return negatives


def _exchange(words: list[str], a: str, b: str) -> list[str]:
    return [b if word == a else a if word == b else word for word in words]


def _replace_words(words: list[str], table: dict[str, str]) -> list[str]:
    """Each word found in `table` replaced by its entry (a trailing comma kept)."""
    out = []
    for word in words:
        bare = word.rstrip(",")
        out.append(table[bare] + word[len(bare):] if bare in table else word)
    return out
