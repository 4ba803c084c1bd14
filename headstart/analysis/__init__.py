"""What can be said about data and models: the dataset check (check.py, files.py), metrics
(metrics.py), calibration and the unknown-image test (confidence.py, limits.py), likely mislabelled
images (labels.py), and the closed-form head fit they share with training (linear.py)."""
