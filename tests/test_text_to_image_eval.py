"""Prompt-adherence evaluation of text-to-image models: an oracle "model" that returns the right real images
for each prompt must score as real data does, a wrong one must fail, and the eval command runs on a trained
folder."""

import pytest
import torch

from nanodiffusion.cli import main
from nanodiffusion.data.captions import prompt_to_class
from nanodiffusion.data.datasets import load_dataset, resize_uint8
from nanodiffusion.data.shapes import ShapesDataset, parse_shapes_caption
from nanodiffusion.errors import UserError
from nanodiffusion.evaluation.report import format_text_to_image
from nanodiffusion.evaluation.text_to_image_eval import (
    RELATIONS_SEED, SHAPES_SEED, classifier_view, evaluate_class_prompts, evaluate_shapes_prompts,
    shapes_prompt_list,
)
from nanodiffusion.images import float_to_uint8


class OraclePipe:
    """Stands in for TextToImage: draws images by looking the prompt up (`lookup(prompt, k)` -> uint8
    (3, 32, 32)), the k-th image of a call; records the settings it was called with."""

    def __init__(self, lookup):
        self.lookup, self.show_progress, self.calls = lookup, True, []

    def __call__(self, prompts, *, output_type, **settings):
        assert output_type == "np" and not self.show_progress
        self.calls.append(settings)
        images = torch.stack([self.lookup(prompt, k) for k, prompt in enumerate(prompts)])
        return type("Output", (), {"images": images.permute(0, 2, 3, 1).float().numpy() / 255})()


SETTINGS = dict(sampler="ddim", num_steps=3, guidance_scale=4.0, batch_size=7)


def test_shapes_oracle_passes_every_check_and_a_blank_model_fails():
    scenes = ShapesDataset(32, seed=SHAPES_SEED, num_items=40)
    rendered = {scenes[i][1]: scenes[i][0] for i in range(len(scenes))}
    assert list(rendered) == shapes_prompt_list(40)[:len(rendered)] or len(rendered) < 40
    oracle = OraclePipe(lambda prompt, k: rendered[prompt])
    result = evaluate_shapes_prompts(oracle, 40, **SETTINGS)
    assert result["num_images"] == 40 and result["all"] == 1.0
    assert len(oracle.calls) == 6 and oracle.calls[0]["num_steps"] == 3        # batches of 7
    blank = OraclePipe(lambda prompt, k: torch.full((3, 32, 32), 24, dtype=torch.uint8))
    assert evaluate_shapes_prompts(blank, 40, **SETTINGS)["all"] == 0.0


def test_relations_prompts_all_have_two_objects_and_an_oracle_passes_them():
    prompts = shapes_prompt_list(30, RELATIONS_SEED, two_object_prob=1.0)
    assert all(parse_shapes_caption(prompt)["relation"] for prompt in prompts)
    assert not set(prompts) & set(shapes_prompt_list(30))                       # other scenes than "shapes"
    scenes = ShapesDataset(32, seed=RELATIONS_SEED, num_items=30, two_object_prob=1.0)
    rendered = {scenes[i][1]: scenes[i][0] for i in range(len(scenes))}
    oracle = OraclePipe(lambda prompt, k: rendered[prompt])
    result = evaluate_shapes_prompts(oracle, 30, prompt_set="relations", **SETTINGS)
    assert result["relation"] == result["all"] == 1.0 and result["size"] is None
    with pytest.raises(UserError, match="unknown shapes prompt set 'circles'"):
        evaluate_shapes_prompts(OraclePipe(None), 3, prompt_set="circles", **SETTINGS)


def test_classifier_view_is_the_grayscale_image_at_the_classifier_size():
    blocks = torch.randint(0, 256, (5, 1, 7, 7), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    gray = blocks.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)          # smooth but not flat
    rgb = (resize_uint8(gray, 32).float() / 127.5 - 1).expand(-1, 3, -1, -1)
    view = classifier_view(rgb, 28)
    assert view.shape == (5, 1, 28, 28) and view.min() >= -1 and view.max() <= 1
    back = float_to_uint8(view).float()
    assert (back - gray.float()).abs().mean() < 12          # a resize there and back blurs edges, no more


@pytest.mark.parametrize("dataset_name", ["mnist", "fashion-mnist"])
def test_class_prompt_oracle_scores_as_real_images_and_shuffled_or_collapsed_ones_do_not(shared_data_dir,
                                                                                        dataset_name):
    test_set = load_dataset(dataset_name, split="test", data_dir=shared_data_dir)
    by_class = [torch.nonzero(test_set.labels == k).flatten() for k in range(10)]

    def real_image(label: int, k: int) -> torch.Tensor:
        image, _ = test_set.batch(by_class[label][k:k + 1])
        return resize_uint8(float_to_uint8(image), 32)[0].expand(3, -1, -1)

    oracle = OraclePipe(lambda prompt, k: real_image(prompt_to_class(dataset_name, prompt), k))
    result = evaluate_class_prompts(oracle, dataset_name, 10, data_dir=shared_data_dir, **SETTINGS)
    assert result["num_images"] == 100 and len(result["prompts"]) == 10
    assert result["class_agreement"] >= 0.85 and result["real"]["class_agreement"] >= 0.85
    wrong = OraclePipe(lambda prompt, k: real_image((prompt_to_class(dataset_name, prompt) + 1) % 10, k))
    assert evaluate_class_prompts(wrong, dataset_name, 10, data_dir=shared_data_dir,
                                  **SETTINGS)["class_agreement"] < 0.15
    collapsed = OraclePipe(lambda prompt, k: real_image(prompt_to_class(dataset_name, prompt), 0))
    same = evaluate_class_prompts(collapsed, dataset_name, 10, data_dir=shared_data_dir, **SETTINGS)
    assert same["diversity_ratio"] < 0.05 < 0.5 < result["diversity_ratio"]       # one image per class
    report = format_text_to_image({"settings": SETTINGS | {"seed": 0}, "results": {dataset_name: same}})
    assert "diversity ratio" in report and "worst class" in report
    assert f"{same['diversity_ratio']:.2f}" in report


def test_eval_command_judges_a_text_to_image_folder(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from fixtures import save_tiny_diffusers
    folder = save_tiny_diffusers(tmp_path / "model")
    out = tmp_path / "eval.json"
    main(["eval", str(folder), "--prompts", "shapes", "relations", "--num-shapes", "4", "--num-relations",
          "3", "--steps", "2", "--sampler", "ddim", "--guidance", "3", "--json", str(out)])
    text = capsys.readouterr().out
    assert "shapes (4 prompts)" in text and "relations (3 prompts)" in text
    assert "ddim, 2 steps, guidance 3" in text
    assert out.is_file()
    main(["eval", str(folder), "--sweep", "--prompts", "shapes", "--num-shapes", "2", "--steps", "1", "2",
          "--sampler", "ddim", "euler"])
    assert capsys.readouterr().out.count("shapes") >= 1


def test_text_to_image_eval_errors_are_clear(tmp_path, capsys, monkeypatch):
    pytest.importorskip("diffusers")
    from fixtures import save_tiny_diffusers
    folder = save_tiny_diffusers(tmp_path / "model")
    for argv, message in [(["--num-relations", "0"], "--num-shapes and --num-relations must be >= 1"),
                          (["--sampler", "nope"], "unknown sampler 'nope'")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", str(folder), "--prompts", "shapes", "--num-shapes", "2", *argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    from nanodiffusion.weights.models import BUILTIN_TEXT_TO_IMAGE
    monkeypatch.setitem(BUILTIN_TEXT_TO_IMAGE, "builtin", tmp_path / "not-installed")
    with pytest.raises(SystemExit):
        main(["eval", "builtin"])
    assert "the built-in text-to-image model ('builtin') is not shipped yet (or was removed)" in capsys.readouterr().err
