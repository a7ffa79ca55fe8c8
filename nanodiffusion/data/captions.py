"""Captions for MNIST and Fashion-MNIST made from their labels, and the reverse: the class a prompt names.

Each class has a fixed, ordered tuple of prompts (every template with every name of the class); the first is
the canonical prompt used for evaluation ("a photo of a sneaker", "the handwritten digit 7"). Training draws
one of them per image and epoch, so a model learns the class from many phrasings.
"""

import functools
import operator
import re

from nanodiffusion.data.mnist import FASHION_MNIST_CLASSES
from nanodiffusion.errors import UserError

# Names of each Fashion-MNIST class, canonical first; labels follow FASHION_MNIST_CLASSES.
FASHION_NOUNS = (
    ("t-shirt", "top", "tee"),
    ("pair of trousers", "trousers", "pants"),
    ("pullover", "sweater", "jumper"),
    ("dress",),
    ("coat", "jacket"),
    ("sandal", "pair of sandals"),
    ("shirt", "button-up shirt"),
    ("sneaker", "pair of sneakers", "running shoe"),
    ("bag", "handbag", "purse"),
    ("ankle boot", "boot"),
)
PLURAL_NOUNS = frozenset({"trousers", "pants"})        # take no indefinite article
FASHION_TEMPLATES = (
    "a photo of {a_noun}",
    "{a_noun}",
    "a picture of {a_noun}",
    "a product photo of {a_noun}",
    "an image of {a_noun}",
    "a black and white photo of {a_noun}",
    "a low resolution photo of {a_noun}",
    "a grayscale picture of {a_noun}",
)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MNIST_TEMPLATES = (
    "the handwritten digit {numeral}",
    "the handwritten digit {word}",
    "{a_numeral}",
    "{a_word}",
    "the number {numeral}",
    "the number {word}",
    "a handwritten {numeral}",
    "a handwritten {word}",
    "digit {word}",
    "the digit {numeral}",
    "a drawing of the number {word}",
    "a scan of a handwritten {numeral}",
)
CAPTIONED_CLASSES = ("mnist", "fashion-mnist")
WORD_PATTERN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")     # "t-shirt" and "button-up" stay one word


def indefinite(noun: str) -> str:
    """Return `noun` with "a" or "an" by its sound ("an ankle boot", "a one", "an 8"); plurals get none."""
    if noun in PLURAL_NOUNS:
        return noun
    word = noun.split()[0].lower()
    if word.isdigit():
        vowel_sound = word.startswith("8") or word in ("11", "18")   # "eight", "eleven", "eighteen"
    else:
        vowel_sound = word[0] in "aeiou" and not word.startswith(("one", "uni", "use", "eu"))
        vowel_sound = vowel_sound or word.startswith(("hour", "honest"))
    return f"{'an' if vowel_sound else 'a'} {noun}"


def class_prompts(dataset: str, label: int) -> tuple[str, ...]:
    """Every prompt of class `label` of "mnist" or "fashion-mnist", the canonical one first."""
    label = _check_label(dataset, label)
    if dataset == "mnist":
        forms = {"numeral": str(label), "word": DIGIT_WORDS[label],
                 "a_numeral": indefinite(str(label)), "a_word": indefinite(DIGIT_WORDS[label])}
        prompts = [template.format(**forms) for template in MNIST_TEMPLATES]
    else:
        prompts = [template.format(a_noun=indefinite(noun))
                   for template in FASHION_TEMPLATES for noun in FASHION_NOUNS[label]]
    return tuple(dict.fromkeys(prompts))                    # drop repeats, keep the order


def class_prompt(dataset: str, label: int, template_index: int | None = None) -> str:
    """The canonical prompt of a class (`template_index` None), else its prompt number `template_index`."""
    prompts = class_prompts(dataset, label)
    if template_index is None:
        return prompts[0]
    if not 0 <= template_index < len(prompts):
        raise UserError(f"template_index must be in 0..{len(prompts) - 1} for {dataset} class {label}, "
                        f"got {template_index}")
    return prompts[template_index]


def prompt_to_class(dataset_name: str, prompt: str) -> int | None:
    """The class of `dataset_name` that `prompt` names, or None when it names none or several."""
    _check_dataset(dataset_name)
    phrases = _class_phrases(dataset_name)
    longest = max(len(phrase) for phrase in phrases)
    words = WORD_PATTERN.findall(prompt.lower())
    found, i = set(), 0
    while i < len(words):
        for n in range(min(longest, len(words) - i), 0, -1):      # longest match: "ankle boot" over "boot"
            label = phrases.get(tuple(words[i:i + n]))
            if label is not None:
                found.add(label)
                i += n
                break
        else:
            i += 1
    return found.pop() if len(found) == 1 else None


@functools.cache
def _class_phrases(dataset: str) -> dict[tuple[str, ...], int]:
    """Word sequences that name a class -> its label: every name used in prompts, plus simple plurals."""
    if dataset == "mnist":
        return {(name,): digit for digit in range(10) for name in (str(digit), DIGIT_WORDS[digit])}
    phrases = {}
    for label, nouns in enumerate(FASHION_NOUNS):
        official = FASHION_MNIST_CLASSES[label].lower().split("/")     # "T-shirt/top": two names
        for noun in (*nouns, *official):
            phrases[tuple(noun.split())] = label
            if not noun.startswith("pair of") and noun not in PLURAL_NOUNS:
                phrases[tuple(_plural(noun).split())] = label
    return phrases


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s")


def _check_dataset(dataset: str) -> None:
    if dataset not in CAPTIONED_CLASSES:
        raise UserError(f"unknown data set {dataset!r} for class prompts: valid names are "
                        f"{', '.join(CAPTIONED_CLASSES)}")


def _check_label(dataset: str, label: int) -> int:
    """Return `label` as a Python int (numpy and 0-d torch integers are accepted) after range checks."""
    _check_dataset(dataset)
    try:
        label = operator.index(label)
    except TypeError:
        raise UserError(f"{dataset} labels are integers 0..9, got {label!r}") from None
    if not 0 <= label < 10:
        raise UserError(f"{dataset} labels are 0..9, got {label}")
    return label
