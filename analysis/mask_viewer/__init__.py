"""Viewer of the masks drawn by the pre-training data set."""
