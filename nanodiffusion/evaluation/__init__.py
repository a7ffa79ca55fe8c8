"""Evaluating generated images with a small classifier trained on the real data.

- `classifier.py`: the CNN (logits and a penultimate feature vector) and the shipped weights per data set.
- `classifier_training.py`: its training loop (AdamW, one-cycle learning rate, random shifts).
- `metrics.py`: class agreement, Fréchet distance on the classifier's features (FID-style), diversity.
- `evaluate.py`: sample a DDPM model class-balanced and measure it against a data set's test split.
- `report.py`: plain-text tables of the results.
"""
