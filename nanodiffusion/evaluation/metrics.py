"""Metrics on generated images, computed with a classifier trained on the real data (in eval mode).

- Class agreement: the fraction of images the classifier puts in the class they were generated for.
- Fréchet distance between Gaussians fitted to the classifier's penultimate features: FID (Heusel et al. 2017)
  with a data-set-specific network in place of Inception-v3: its values are not comparable to published FIDs.
- Diversity: mean pairwise feature distance within each class over the same for real images (< 1: collapse).
"""

import torch

DEFAULT_BATCH_SIZE = 500


@torch.no_grad()
def predict(classifier, images: torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """Predicted class (N,) int64 of images (N, C, H, W) in [-1, 1]; `classifier(x)` returns logits."""
    return torch.cat([classifier(chunk).argmax(dim=1) for chunk in images.split(batch_size)])


@torch.no_grad()
def embed(classifier, images: torch.Tensor,
          batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features (N, F) float32 and predicted classes (N,) of images, in one pass."""
    features, predicted = [], []
    for chunk in images.split(batch_size):
        f = classifier.features(chunk)
        features.append(f.float())
        predicted.append(classifier.head(f).argmax(dim=1))
    return torch.cat(features), torch.cat(predicted)


def class_agreement(classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images (N, C, H, W) that the classifier puts in their intended class labels (N,).

    On real test images this is the classifier's accuracy; on generated ones, how well the model follows
    its conditioning. See `confusion_matrix` and `per_class_agreement` for the breakdown.
    """
    _check_labels(images, labels)
    return (predict(classifier, images) == labels.cpu()).double().mean().item()


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts: row = intended class, column = predicted class."""
    _check_labels(predicted, labels)
    both = torch.cat([labels.cpu(), predicted.cpu()])
    if len(both) and (both.min() < 0 or both.max() >= num_classes):
        raise ValueError(f"labels and predictions must lie in 0..{num_classes - 1}")
    flat = labels.long().cpu() * num_classes + predicted.long().cpu()
    return torch.bincount(flat, minlength=num_classes**2).view(num_classes, num_classes)


def per_class_agreement(confusion: torch.Tensor) -> torch.Tensor:
    """(K,) float64 fraction of each intended class classified as itself; NaN for a class with no images."""
    totals = confusion.sum(dim=1).double()
    return torch.where(totals > 0, confusion.diagonal().double() / totals.clamp(min=1), torch.nan)


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (F,) and unbiased covariance (F, F) of features (N, F), in float64 (fp32 sums lose digits)."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features of shape (N >= 2, F), got {tuple(features.shape)}")
    features = features.double()
    return features.mean(dim=0), torch.cov(features.T)


def frechet_distance_from_stats(mu_a: torch.Tensor, cov_a: torch.Tensor, mu_b: torch.Tensor,
                                cov_b: torch.Tensor) -> float:
    """Squared Fréchet (2-Wasserstein) distance of N(mu_a, cov_a) and N(mu_b, cov_b) (Dowson & Landau 1982):

    |mu_a - mu_b|² + tr(A) + tr(B) - 2 tr((A^½ B A^½)^½), with A^½ B A^½ (similar to AB, so the same trace of
    the square root) kept symmetric so that `eigh` applies: no general matrix square root, no scipy.
    """
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape:
        raise ValueError(f"feature sizes differ: {tuple(mu_a.shape)} vs {tuple(mu_b.shape)}")
    mu_a, cov_a, mu_b, cov_b = (t.double() for t in (mu_a, cov_a, mu_b, cov_b))
    sqrt_a = _sqrtm_psd(cov_a)
    middle = sqrt_a @ cov_b @ sqrt_a
    middle = (middle + middle.T) / 2                       # symmetric up to rounding; eigh reads one triangle
    trace_sqrt = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()
    distance = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    return max(distance.item(), 0.0)                       # equal inputs can round to -1e-13


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """FID-style distance between two feature sets (N_a, F) and (N_b, F), each fitted with a Gaussian."""
    return frechet_distance_from_stats(*gaussian_stats(features_a), *gaussian_stats(features_b))


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix; tiny negative eigenvalues -> 0."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean Euclidean distance between distinct rows of features (N >= 2, F), in float64."""
    n = features.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 feature vectors, got {n}")
    features = features.double()
    return (torch.cdist(features, features).sum() / (n * (n - 1))).item()   # the zero diagonal adds nothing


def per_class_diversity(features: torch.Tensor, groups: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K,) float64 mean pairwise feature distance within each class; NaN for classes of < 2 images."""
    diversity = torch.full((num_classes,), torch.nan, dtype=torch.float64)
    for k in range(num_classes):
        members = features[groups.cpu() == k]
        if len(members) >= 2:
            diversity[k] = mean_pairwise_distance(members)
    return diversity


def diversity_ratio(features: torch.Tensor, groups: torch.Tensor, real_features: torch.Tensor,
                    real_groups: torch.Tensor, num_classes: int) -> tuple[float, torch.Tensor]:
    """Per-class diversity of generated features over that of real ones (K,), and its mean over classes.

    About 1 when each class varies as much as the real data; well below 1 shows mode collapse. Classes with
    fewer than 2 images (either side) are NaN and left out of the mean.
    """
    ratios = (per_class_diversity(features, groups, num_classes)
              / per_class_diversity(real_features, real_groups, num_classes))
    return ratios.nanmean().item(), ratios


def _check_labels(values: torch.Tensor, labels: torch.Tensor) -> None:
    if labels.ndim != 1 or len(labels) != len(values):
        raise ValueError(f"need one label per image: {len(values)} images, labels of shape "
                         f"{tuple(labels.shape)}")
