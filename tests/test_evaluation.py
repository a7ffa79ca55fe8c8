import dataclasses
import json

import pytest
import torch

from nanodiffusion.cli import main
from nanodiffusion.data.datasets import load_dataset
from nanodiffusion.diffusion.schedules import ScheduleConfig
from nanodiffusion.errors import UserError
from nanodiffusion.evaluation.classifier import (
    BUILTIN_CLASSIFIERS, Classifier, ClassifierConfig, classifier_for_dataset, load_classifier,
    save_classifier,
)
from nanodiffusion.evaluation.classifier_training import ClassifierTrainConfig, random_shift, train_classifier
from nanodiffusion.evaluation.evaluate import evaluate_ddpm, evaluate_images, reference_set
from nanodiffusion.evaluation.metrics import (
    class_agreement, confusion_matrix, diversity_ratio, frechet_distance, frechet_distance_from_stats,
    per_class_agreement,
)
from nanodiffusion.nets.ddpm_unet import TINY_UNET, DDPMUNet
from nanodiffusion.pipelines.ddpm import DDPMPipeline
from nanodiffusion.training.ddpm_trainer import DDPMTrainer, TrainConfig

torch.set_num_threads(1)

TINY_CLASSIFIER = ClassifierConfig(channels=(8, 16), feature_dim=16)


def random_rotation(dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=g))
    return q


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    # For diagonal covariances the distance is |mu_a - mu_b|² + sum_i (s_a,i - s_b,i)², with s the std devs;
    # a common rotation leaves it unchanged and makes the covariances dense.
    f64 = {"dtype": torch.float64}
    mu_a, mu_b = torch.tensor([0.0, 1.0, -2.0, 0.5], **f64), torch.tensor([1.0, 1.0, 0.0, 0.5], **f64)
    std_a, std_b = torch.tensor([1.0, 2.0, 0.5, 3.0], **f64), torch.tensor([2.0, 2.0, 1.5, 0.1], **f64)
    exact = 1 + 4 + 1 + 1 + 8.41
    assert frechet_distance_from_stats(mu_a, std_a.square().diag(), mu_b, std_b.square().diag()) == (
        pytest.approx(exact, rel=1e-12))
    q = random_rotation(4)
    rotated = frechet_distance_from_stats(q @ mu_a, q @ std_a.square().diag() @ q.T,
                                          q @ mu_b, q @ std_b.square().diag() @ q.T)
    assert rotated == pytest.approx(exact, rel=1e-10)

    g = torch.Generator().manual_seed(0)
    samples_a = torch.randn(200_000, 4, generator=g, dtype=torch.float64) * std_a + mu_a
    samples_b = torch.randn(200_000, 4, generator=g, dtype=torch.float64) * std_b + mu_b
    assert frechet_distance(samples_a @ q.T, samples_b @ q.T) == pytest.approx(exact, rel=0.01)


def test_frechet_distance_agrees_with_scipy_sqrtm_on_dense_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(6, 6, generator=g, dtype=torch.float64) for _ in range(2))
    cov_a, cov_b = a @ a.T, b @ b.T + 0.1 * torch.eye(6, dtype=torch.float64)
    mu_a, mu_b = torch.randn(6, generator=g, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    covmean = linalg.sqrtm(cov_a.numpy() @ cov_b.numpy()).real
    expected = ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace()).item() - 2 * covmean.trace()
    assert frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) == pytest.approx(expected, rel=1e-9)


def test_identical_feature_sets_are_at_distance_zero():
    features = torch.randn(500, 128, generator=torch.Generator().manual_seed(0)) * 3 + 1
    assert frechet_distance(features, features.clone()) < 1e-8
    assert frechet_distance(features, features + 1.0) == pytest.approx(128.0, rel=1e-9)   # mean shift only


class BrightnessClassifier(torch.nn.Module):
    """A fake classifier: the class is the image's mean brightness binned into num_classes levels."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.centers = torch.linspace(-1, 1, num_classes)

    def forward(self, x):
        return -(x.mean(dim=(1, 2, 3))[:, None] - self.centers).square()       # (B, num_classes)


def test_class_agreement_confusion_and_per_class_on_a_fake_classifier():
    centers = torch.linspace(-1, 1, 4)
    drawn = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3, 3])          # what each image looks like
    asked = torch.tensor([0, 1, 1, 1, 2, 0, 3, 3, 3, 2])          # what it was generated for
    images = centers[drawn][:, None, None, None].expand(-1, 1, 8, 8)
    assert class_agreement(BrightnessClassifier(), images, asked) == pytest.approx(0.7)
    confusion = confusion_matrix(drawn, asked, 4)
    assert confusion[0].tolist() == [1, 0, 1, 0] and confusion[1].tolist() == [1, 2, 0, 0]
    assert confusion.sum() == 10 and confusion.trace() == 7
    assert per_class_agreement(confusion).tolist() == pytest.approx([0.5, 2 / 3, 0.5, 1.0])
    assert per_class_agreement(confusion_matrix(drawn[:2], asked[:2], 4))[2:].isnan().all()   # no images
    with pytest.raises(ValueError, match="one label per image"):
        class_agreement(BrightnessClassifier(), images, asked[:5])


def test_diversity_ratio_is_one_for_real_like_data_and_zero_for_collapsed_classes():
    g = torch.Generator().manual_seed(0)
    groups = torch.arange(2000) % 2
    real, same_distribution = (torch.randn(2000, 8, generator=g) + groups[:, None] * 5 for _ in range(2))
    overall, per_class = diversity_ratio(same_distribution, groups, real, groups, num_classes=2)
    assert overall == pytest.approx(1.0, abs=0.03) and per_class.shape == (2,)
    collapsed = groups[:, None].float().expand(-1, 8)               # every image of a class identical
    assert diversity_ratio(collapsed, groups, real, groups, num_classes=2)[0] == 0.0
    halved, _ = diversity_ratio(real * 0.5, groups, real, groups, num_classes=2)
    assert halved == pytest.approx(0.5)


def test_random_shift_translates_each_image_within_the_range():
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    g = torch.Generator().manual_seed(0)
    assert torch.equal(random_shift(x, 0, g), x)
    shifted = random_shift(x, 2, g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    for image, source in zip(shifted, padded):
        crops = [source[:, i:i + 8, j:j + 8] for i in range(5) for j in range(5)]
        assert any(torch.equal(image, crop) for crop in crops)


def test_a_tiny_classifier_learns_toy_classes_and_survives_the_fp16_round_trip(tmp_path, fake_fashion_dir):
    dataset = load_dataset("fashion-mnist", data_dir=str(fake_fashion_dir))
    train = ClassifierTrainConfig(epochs=8, batch_size=16, lr=1e-2, max_shift=0, label_smoothing=0.0,
                                  bf16=False)
    model = train_classifier(TINY_CLASSIFIER, train, dataset, progress=False)
    images, labels = dataset.batch(torch.arange(len(dataset)))
    accuracy = class_agreement(model, images, labels)
    assert accuracy >= 0.9
    save_classifier(tmp_path / "c.safetensors", model, dataset.class_names, {"test_accuracy": accuracy})
    reloaded, meta = load_classifier(tmp_path / "c.safetensors")
    assert meta["class_names"] == list(dataset.class_names) and meta["config"] == TINY_CLASSIFIER.to_dict()
    torch.testing.assert_close(reloaded(images), model(images), atol=0.05, rtol=0.01)


def test_evaluating_the_real_images_themselves_gives_a_perfect_score(fake_fashion_dir):
    torch.manual_seed(0)
    classifier = Classifier(TINY_CLASSIFIER).eval()
    dataset = load_dataset("fashion-mnist", data_dir=str(fake_fashion_dir))
    reference = reference_set(classifier, dataset)
    images, labels = dataset.batch(torch.arange(len(dataset)))
    result = evaluate_images(classifier, images, labels, reference)
    assert result["frechet_distance"] < 1e-6 and result["diversity_ratio"] == pytest.approx(1.0)
    assert result["class_agreement"] == pytest.approx(class_agreement(classifier, images, labels))
    assert len(result["per_class_agreement"]) == 10 and sum(map(sum, result["confusion_matrix"])) == 64
    json.dumps(result)                                              # JSON-safe (NaN became None)


@pytest.mark.parametrize("dataset_name, min_accuracy", [("fashion-mnist", 0.9), ("mnist", 0.98)])
def test_shipped_classifiers_reach_their_accuracy_on_real_test_images(dataset_name, min_accuracy,
                                                                        shared_data_dir):
    path = BUILTIN_CLASSIFIERS[dataset_name]
    assert path.stat().st_size < 2 * 1024 * 1024
    model, meta = classifier_for_dataset(dataset_name)
    assert meta["dataset"] == dataset_name and len(meta["class_names"]) == 10
    assert meta["test_accuracy"] >= min_accuracy + 0.01
    test_set = load_dataset(dataset_name, split="test", data_dir=shared_data_dir)
    images, labels = test_set.batch(torch.arange(1000))
    assert class_agreement(model, images, labels) >= min_accuracy


def test_shipped_classifiers_are_present_without_real_data():
    for dataset_name in BUILTIN_CLASSIFIERS:
        model, meta = classifier_for_dataset(dataset_name)
        assert meta["kind"] == "classifier" and meta["test_accuracy"] > 0.9
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.fixture
def tiny_ddpm(tmp_path, fake_fashion_dir):
    config = TrainConfig(out_dir=str(tmp_path / "run"), batch_size=16, warmup_steps=0, max_steps=2)
    unet = dataclasses.replace(TINY_UNET, image_size=28, num_classes=10)
    dataset = load_dataset("fashion-mnist", data_dir=str(fake_fashion_dir))
    DDPMTrainer(config, unet, ScheduleConfig("linear"), dataset).fit()
    return str(tmp_path / "run" / "last.safetensors")


def test_eval_command_runs_end_to_end_on_a_tiny_model(tiny_ddpm, fake_fashion_dir, tmp_path, capsys):
    data_dir = str(fake_fashion_dir.parent)
    out = tmp_path / "eval.json"
    main(["eval", tiny_ddpm, "--data-dir", data_dir, "-n", "20", "--sampler", "ddim", "--steps", "2",
          "--batch-size", "8", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "class agreement" in printed and "Ankle boot" in printed and "real train (20)" in printed
    result = json.loads(out.read_text())
    assert result["num_images"] == 20 and result["sampler"] == "ddim" and result["num_steps"] == 2
    assert 0 <= result["class_agreement"] <= 1 and result["frechet_distance"] >= 0
    assert result["real"]["num_images"] == 20

    main(["eval", tiny_ddpm, "--data-dir", data_dir, "--sweep", "-n", "10", "--sampler", "ddim", "euler",
          "--steps", "1", "2"])
    printed = capsys.readouterr().out
    assert "sampler \\ steps" in printed and "euler" in printed and "class agreement" in printed


def test_eval_errors_are_clear(tiny_ddpm, fake_fashion_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", tiny_ddpm, "--dataset", "cifar10"])
    assert exit_info.value.code == 2
    assert "no classifier for data set 'cifar10'" in capsys.readouterr().err
    with pytest.raises(UserError, match="shipped classifiers: fashion-mnist, mnist"):
        classifier_for_dataset("cifar10")
    with pytest.raises(SystemExit):
        main(["eval", tiny_ddpm, "--dataset", "mnist", "--data-dir", str(fake_fashion_dir.parent), "-n", "4"])
    assert "pass the --dataset it was trained on" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", tiny_ddpm, "--data-dir", str(fake_fashion_dir.parent), "--steps", "10", "20"])
    assert "need --sweep" in capsys.readouterr().err



def test_evaluate_ddpm_on_an_unconditional_model_groups_by_predicted_class(fake_fashion_dir):
    torch.manual_seed(0)
    unet = DDPMUNet(dataclasses.replace(TINY_UNET, image_size=28, num_classes=None))
    pipe = DDPMPipeline(unet, ScheduleConfig("linear"))
    result = evaluate_ddpm(pipe, "fashion-mnist", 12, num_steps=2, data_dir=str(fake_fashion_dir.parent),
                           progress=False)
    assert "class_agreement" not in result and "class_agreement" not in result["real"]
    assert result["num_images"] == 12 and result["frechet_distance"] > 0
    assert len(result["per_class_diversity_ratio"]) == 10
