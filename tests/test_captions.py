"""Class captions for MNIST and Fashion-MNIST: wording, articles, and the prompt -> class parser."""

import re

import numpy as np
import pytest

from nanodiffusion.data.captions import (
    CAPTIONED_CLASSES, class_prompt, class_prompts, indefinite, prompt_to_class,
)
from nanodiffusion.errors import UserError


@pytest.mark.parametrize("noun, expected", [
    ("ankle boot", "an ankle boot"), ("sneaker", "a sneaker"), ("eight", "an eight"), ("one", "a one"),
    ("8", "an 8"), ("1", "a 1"), ("18", "an 18"), ("t-shirt", "a t-shirt"), ("trousers", "trousers"),
    ("umbrella", "an umbrella"), ("unicorn", "a unicorn"), ("hour", "an hour"),
])
def test_indefinite_article_follows_the_sound(noun, expected):
    assert indefinite(noun) == expected


def test_canonical_prompts():
    assert class_prompt("fashion-mnist", 7) == "a photo of a sneaker"
    assert class_prompt("fashion-mnist", 9) == "a photo of an ankle boot"
    assert class_prompt("fashion-mnist", 0) == "a photo of a t-shirt"
    assert class_prompt("mnist", 7) == "the handwritten digit 7"
    assert class_prompt("mnist", np.int64(3)) == "the handwritten digit 3"     # numpy labels are fine


@pytest.mark.parametrize("dataset", CAPTIONED_CLASSES)
def test_every_class_has_distinct_varied_prompts_with_right_articles(dataset):
    seen = {}
    for label in range(10):
        prompts = class_prompts(dataset, label)
        assert len(prompts) >= 8 and len(set(prompts)) == len(prompts)
        assert prompts == class_prompts(dataset, label)                         # deterministic
        assert [class_prompt(dataset, label, i) for i in range(len(prompts))] == list(prompts)
        for prompt in prompts:
            assert prompt == prompt.strip() and "  " not in prompt and prompt == prompt.lower()
            assert set(re.findall(r"\ba ([aeiou8]\w*)", prompt)) <= {"one"}, prompt   # "a one", not "a eight"
            assert not re.findall(r"\ban ([^aeiou8\s]\w*)", prompt), prompt
            assert seen.setdefault(prompt, label) == label, f"{prompt!r} names two classes"


def test_wordings_the_brief_asks_for_are_there():
    fashion = {p for label in range(10) for p in class_prompts("fashion-mnist", label)}
    digits = set(class_prompts("mnist", 7))
    assert {"a sneaker", "an ankle boot", "a picture of a pullover", "a t-shirt", "a top",
            "a product photo of a bag"} <= fashion
    assert {"the handwritten digit seven", "a 7", "the number 7", "a handwritten 7", "digit seven"} <= digits
    assert "an 8" in class_prompts("mnist", 8) and "an eight" in class_prompts("mnist", 8)


@pytest.mark.parametrize("dataset", CAPTIONED_CLASSES)
def test_prompt_to_class_round_trips_every_prompt(dataset):
    other = next(name for name in CAPTIONED_CLASSES if name != dataset)
    for label in range(10):
        for prompt in class_prompts(dataset, label):
            assert prompt_to_class(dataset, prompt) == label, prompt
            assert prompt_to_class(other, prompt) is None, prompt          # no class of the other set


@pytest.mark.parametrize("dataset, prompt, expected", [
    ("fashion-mnist", "A Photo of two SNEAKERS.", 7),
    ("fashion-mnist", "a dresses rack", 3),
    ("fashion-mnist", "a shirt", 6),                  # not the t-shirt
    ("fashion-mnist", "a T-shirt/top", 0),            # the official class name
    ("fashion-mnist", "a trouser", 1),
    ("fashion-mnist", "a boot", 9),
    ("fashion-mnist", "a shirt and a bag", None),     # two classes: ambiguous
    ("fashion-mnist", "a cat", None),
    ("mnist", "The number Eight!", 8),
    ("mnist", "digit 10", None),
    ("mnist", "a 3 or a 5", None),
    ("mnist", "a 3, the digit three", 3),
])
def test_prompt_to_class_on_free_text(dataset, prompt, expected):
    assert prompt_to_class(dataset, prompt) == expected


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="valid names are mnist, fashion-mnist"):
        class_prompts("cifar10", 0)
    with pytest.raises(UserError, match="valid names"):
        prompt_to_class("shapes", "a red circle")
    with pytest.raises(UserError, match="0..9"):
        class_prompts("mnist", 10)
    with pytest.raises(UserError, match="integers"):
        class_prompts("mnist", 1.5)
    with pytest.raises(UserError, match="template_index"):
        class_prompt("fashion-mnist", 3, len(class_prompts("fashion-mnist", 3)))
