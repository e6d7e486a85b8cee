"""Evaluation: frozen features, weight loading, k-NN, linear probes, fine-tuning, clustering, export."""
