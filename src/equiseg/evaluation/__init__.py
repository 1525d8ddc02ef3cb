"""Scores: equivariance error (more to come: segmentation and detection metrics)."""
