"""Weighted k-NN classifier on frozen features (evaluation.md §2.1), importable by the trainer.

``knn_classifier`` is the official voting rule: cosine similarity on L2-normalised rows, the k most
similar training rows vote for their class with weight ``exp(s / T)``, classes are ranked by the summed
weights, top-1 / top-5 accuracies are returned in percent.

Fixed defects of the official code (evaluation.md §5, items 1–2):
* the number of classes comes from the data (``num_classes`` argument / dataset) instead of 1000;
* the test set is processed in chunks sized by a memory budget (the official ⌊M/100⌋ rows is 0, a
  division by zero, when M < 100); the chunking does not change the result;
* k is capped at the number of training rows (logged);
* top-5 counts the first ``min(5, num_classes)`` ranked classes; classes with equal scores are ranked
  by class index (stable sort), which only matters for zero-score classes when k < 5.

``run_knn(model, train_loader, val_loader, nb_knn, T, ...)`` is the whole protocol (feature
extraction on every rank, gathering, L2 normalisation, classification) as used by
``evaluation/eval_knn.py`` and by the pre-training loop.
"""
import logging

import torch

from ibot.eval.features import extract_features

logger = logging.getLogger("ibot.eval.knn")

__all__ = ["knn_classifier", "run_knn", "num_classes_of"]


@torch.no_grad()
def knn_classifier(train_features, train_labels, test_features, test_labels, k, T, use_cuda=True,
                   num_classes=1000, chunk_size=None):
    """Weighted k-NN accuracy.

    Args:
        train_features: (N, d) float, rows L2-normalised.
        train_labels: (N,) int64 in [0, num_classes).
        test_features: (M, d) float, rows L2-normalised.
        test_labels: (M,) int64.
        k: number of neighbours (capped at N).
        T: voting temperature (0.07 officially).
        use_cuda: compute on the GPU when one is available (tensors are moved there); False computes
            on the CPU.
        num_classes: C, width of the class-score vectors (take it from the dataset).
        chunk_size: test rows per similarity block (default: as many as fit in ~2^27 elements of
            similarity and vote matrices; the result does not depend on it).
    Returns:
        (top1, top5): floats, accuracies in percent over the M test rows.
    """
    device = torch.device("cuda") if (use_cuda and torch.cuda.is_available()) else torch.device("cpu")
    train_features = train_features.to(device)
    test_features = test_features.to(device)
    train_labels = train_labels.to(device).long()
    test_labels = test_labels.to(device).long()
    n_train, n_test = train_features.shape[0], test_features.shape[0]
    if n_train == 0 or n_test == 0:
        raise ValueError(f"k-NN needs training and test rows (got {n_train} and {n_test})")
    if int(train_labels.max()) >= num_classes or int(test_labels.max()) >= num_classes:
        raise ValueError(f"labels exceed num_classes={num_classes}")
    k_eff = min(int(k), n_train)
    if k_eff != k:
        logger.info("k=%d capped at the %d training samples", k, n_train)
    if chunk_size is None:  # ~2^27 elements of similarity + one-hot scores per chunk (512 MiB in fp32)
        chunk_size = max(1, min(n_test, (1 << 27) // (n_train + k_eff * num_classes)))
    n_rank = min(5, num_classes)
    top1 = top5 = 0
    train_t = train_features.t()
    for start in range(0, n_test, chunk_size):
        feats = test_features[start:start + chunk_size]
        targets = test_labels[start:start + chunk_size]
        b = targets.shape[0]
        similarity = feats @ train_t                                   # (b, N)
        distances, indices = similarity.topk(k_eff, dim=1, largest=True, sorted=True)  # (b, k)
        neighbours = train_labels[indices]                             # (b, k)
        one_hot = torch.zeros(b * k_eff, num_classes, device=device)
        one_hot.scatter_(1, neighbours.view(-1, 1), 1)
        weights = distances.clone().div_(T).exp_()                     # (b, k)
        probs = (one_hot.view(b, k_eff, num_classes) * weights.view(b, k_eff, 1)).sum(1)  # (b, C)
        _, predictions = probs.sort(dim=1, descending=True, stable=True)
        correct = predictions.eq(targets.view(-1, 1))
        top1 += int(correct[:, :1].sum().item())
        top5 += int(correct[:, :n_rank].sum().item())
    return top1 * 100.0 / n_test, top5 * 100.0 / n_test


def num_classes_of(dataset, *labels):
    """Number of classes: ``len(dataset.classes)`` when available, else 1 + the largest label seen."""
    classes = getattr(dataset, "classes", None)
    if classes:
        return len(classes)
    return int(max(int(lab.max()) for lab in labels)) + 1


@torch.no_grad()
def run_knn(model, train_loader, val_loader, nb_knn=(10, 20, 100, 200), T=0.07, n_last_blocks=1,
            avgpool_patchtokens=0, use_cuda=True, num_classes=None, device=None, features=None,
            verbose=True, return_features=False):
    """The whole k-NN evaluation of a frozen backbone.

    Args:
        model: backbone with ``get_intermediate_layers`` (DDP wrappers are unwrapped; its train/eval
            mode is restored afterwards).
        train_loader, val_loader: loaders yielding ``(images, labels, indices)`` without shuffling
            (``ibot.features.make_loader`` / ``image_folder``); with a ``DistributedSampler`` each rank
            extracts a shard and the features are all-gathered.
        nb_knn: iterable of k values, all evaluated on the same features.
        T: voting temperature.
        n_last_blocks, avgpool_patchtokens: §1.4 feature options (k-NN officially uses n=1).
        use_cuda: keep the feature bank and the voting on the GPU.
        num_classes: C (default: from ``train_loader.dataset``).
        device: where the model runs (default: its parameters' device).
        features: optional precomputed ``(train_features, train_labels, test_features,
            test_labels)`` (L2-normalised), e.g. loaded from ``--load_features``.
        verbose: print ``<k>-NN classifier result: Top1: <x>, Top5: <y>`` for each k.
        return_features: also return the four feature/label tensors (to dump them).
    Returns:
        dict ``{k: {"top1": float, "top5": float}}`` (percent); with ``return_features`` the pair
        ``(results, (train_features (N, d), train_labels (N,), test_features (M, d), test_labels (M,)))``.
    """
    if features is None:
        bank_device = None
        if not use_cuda:
            bank_device = torch.device("cpu")
        train_features, train_labels = extract_features(model, train_loader, n_last_blocks,
                                                        avgpool_patchtokens, device=device, bank_device=bank_device)
        test_features, test_labels = extract_features(model, val_loader, n_last_blocks, avgpool_patchtokens,
                                                      device=device, bank_device=bank_device)
    else:
        train_features, train_labels, test_features, test_labels = features
    if num_classes is None:
        num_classes = num_classes_of(getattr(train_loader, "dataset", None), train_labels, test_labels)
    results = {}
    for k in nb_knn:
        top1, top5 = knn_classifier(train_features, train_labels, test_features, test_labels, k, T,
                                    use_cuda=use_cuda, num_classes=num_classes)
        results[int(k)] = {"top1": top1, "top5": top5}
        if verbose:
            print(f"{k}-NN classifier result: Top1: {top1}, Top5: {top5}")
    if return_features:
        return results, (train_features, train_labels, test_features, test_labels)
    return results
