"""Evaluation: reconstruction quality, downstream segmentation and classification."""
