"""Unsupervised classification (official ``evaluation/unsupervised``)."""
