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
extraction on every rank, gathering, L2 normalisation, classification); ``knn_for_checkpoint`` runs it
on a checkpoint file and a data folder (with the ``--dump_features`` / ``--load_features`` files), for
``evaluation/eval_knn.py``, the pre-training loop (``build_knn_loaders``) and the demo report.
"""
import logging
import os

import torch

from ibot.eval.features import (build_backbone, check_image_folder, eval_transform, extract_features, image_folder,
                                make_loader)
from ibot.eval.weights import load_pretrained_weights
from ibot.utils.checkpoint import safe_load
from ibot.utils.distributed import is_main_process
from ibot.utils.misc import fix_random_seeds

logger = logging.getLogger("ibot.eval.knn")

__all__ = ["knn_classifier", "run_knn", "num_classes_of", "FEATURE_FILES", "build_knn_loaders", "key_dump_dir",
           "load_feature_dump", "save_feature_dump", "frozen_backbone", "checkpoint_features", "knn_for_checkpoint",
           "compare_trained_vs_random"]


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


# ---------------------------------------------------------------------------------------------
# the k-NN protocol on a checkpoint and a data folder (eval_knn.py, eval_logistic_regression.py,
# the periodic k-NN of pre-training and the demo report all use these)
# ---------------------------------------------------------------------------------------------

# the four files of ``--dump_features`` / ``--load_features`` (official names)
FEATURE_FILES = ("trainfeat.pth", "testfeat.pth", "trainlabels.pth", "testlabels.pth")


def build_knn_loaders(data_path, resize_size=256, crop_size=224, batch_size=128, num_workers=10):
    """Non-shuffling ``(image, label, index)`` loaders over ``data_path/train`` and ``data_path/val``.

    Both folders are checked first (error naming the folder). Sharded with a ``DistributedSampler``
    when a process group is up. Returns ``(train_loader, val_loader)``; images are
    (3, crop_size, crop_size) tensors after the official evaluation transform.
    """
    for split in ("train", "val"):
        check_image_folder(os.path.join(data_path, split))
    tf = eval_transform(resize_size, crop_size)
    train = image_folder(os.path.join(data_path, "train"), tf)
    val = image_folder(os.path.join(data_path, "val"), tf)
    if train.classes != val.classes:
        raise ValueError(f"train/ and val/ of {data_path} have different class folders: "
                         f"{train.classes} vs {val.classes}")
    return (make_loader(train, batch_size, num_workers), make_loader(val, batch_size, num_workers))


def key_dump_dir(folder, key, keys):
    """Dump folder of checkpoint key ``key``: ``folder`` itself for one key, ``folder/<key>`` for several."""
    return folder if (folder is None or len(keys) == 1) else os.path.join(folder, key)


def load_feature_dump(folder):
    """Read the four :data:`FEATURE_FILES` of ``folder`` (error naming the missing ones).

    Returns ``(train_features (N, d), train_labels (N,) int64, test_features (M, d), test_labels (M,))``.
    """
    missing = [f for f in FEATURE_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(f"--load_features {folder}: missing {missing}")
    tensors = [safe_load(os.path.join(folder, f)) for f in FEATURE_FILES]
    print(f"Features loaded from {folder}")
    return tensors[0], tensors[2].long(), tensors[1], tensors[3].long()


def save_feature_dump(folder, train_features, train_labels, test_features, test_labels):
    """Write the four :data:`FEATURE_FILES` (CPU tensors) into ``folder`` (created if needed)."""
    os.makedirs(folder, exist_ok=True)
    for name, t in zip(FEATURE_FILES, (train_features, test_features, train_labels, test_labels)):
        torch.save(t.cpu(), os.path.join(folder, name))
    print(f"Features dumped to {folder}")


def frozen_backbone(arch="vit_small", patch_size=16, window_size=7, avgpool_patchtokens=0, img_size=224,
                    pretrained_weights="", checkpoint_key="teacher", seed=0, device=None):
    """Registry backbone for frozen-feature protocols: seeded random init (``seed``), then the weights
    of ``pretrained_weights[checkpoint_key]`` ('' keeps the random init), on ``device``, in eval mode."""
    fix_random_seeds(seed)
    model = build_backbone(arch, patch_size, window_size, avgpool_patchtokens, img_size=img_size)
    print(f"Model {arch} {patch_size}x{patch_size} built.")
    load_pretrained_weights(model, pretrained_weights, checkpoint_key, arch, patch_size)
    return model.to(device or torch.device("cpu")).eval()


def checkpoint_features(pretrained_weights, data_path, arch="vit_small", patch_size=16, checkpoint_key="teacher",
                        resize_size=256, crop_size=224, batch_size=128, num_workers=0, n_last_blocks=1,
                        avgpool_patchtokens=0, window_size=7, seed=0, use_cuda=True, device=None,
                        load_features=None, dump_features=None):
    """L2-normalised frozen features of ``data_path/train`` and ``data_path/val`` for one checkpoint
    (``''`` = random init), shared by the k-NN and the logistic-regression protocols.

    ``load_features``: folder of a previous dump (the data and the model are then not touched);
    ``dump_features``: folder where rank 0 writes the four :data:`FEATURE_FILES`. ``use_cuda`` keeps
    the feature bank on the GPU (when there is one), else on the CPU.
    Returns ``((train_features (N, d), train_labels (N,), test_features (M, d), test_labels (M,)),
    num_classes)``; identical on every rank.
    """
    if load_features:
        features = load_feature_dump(load_features)
        print("Using loaded features.")
        return features, int(max(features[1].max(), features[3].max())) + 1
    use_cuda = bool(use_cuda) and torch.cuda.is_available()
    if device is None:
        device = torch.device("cuda" if use_cuda else "cpu")
    train_loader, val_loader = build_knn_loaders(data_path, resize_size, crop_size, batch_size, num_workers)
    print(f"Data loaded with {len(train_loader.dataset)} train and {len(val_loader.dataset)} val imgs.")
    model = frozen_backbone(arch, patch_size, window_size, avgpool_patchtokens, crop_size, pretrained_weights,
                            checkpoint_key, seed, device)
    print("Extracting features...")
    bank = None if use_cuda else torch.device("cpu")
    train_f, train_l = extract_features(model, train_loader, n_last_blocks, avgpool_patchtokens, device, bank)
    test_f, test_l = extract_features(model, val_loader, n_last_blocks, avgpool_patchtokens, device, bank)
    features = (train_f, train_l, test_f, test_l)
    if dump_features and is_main_process():
        save_feature_dump(dump_features, *features)
    return features, num_classes_of(train_loader.dataset, train_l, test_l)


def knn_for_checkpoint(pretrained_weights, data_path, arch="vit_small", patch_size=16, checkpoint_key="teacher",
                       nb_knn=(20,), temperature=0.07, resize_size=256, crop_size=224, batch_size=128,
                       num_workers=0, n_last_blocks=1, avgpool_patchtokens=0, window_size=7, seed=0,
                       use_cuda=True, device=None, load_features=None, dump_features=None):
    """k-NN accuracies of one checkpoint (``''`` = random init) on ``data_path/{train,val}``, in the
    current process (the existing process group, if any, shards the extraction); features as in
    :func:`checkpoint_features`. Prints the official result lines.

    Returns ``{k: {"top1": float, "top5": float}}`` (percent) for every k of ``nb_knn``.
    """
    use_cuda = bool(use_cuda) and torch.cuda.is_available()
    features, num_classes = checkpoint_features(
        pretrained_weights, data_path, arch, patch_size, checkpoint_key, resize_size, crop_size, batch_size,
        num_workers, n_last_blocks, avgpool_patchtokens, window_size, seed, use_cuda, device, load_features,
        dump_features)
    print("Features are ready!\nStart the k-NN classification.")
    results = run_knn(None, None, None, nb_knn, temperature, use_cuda=use_cuda, num_classes=num_classes,
                      features=features, verbose=True)
    return results


def compare_trained_vs_random(pretrained_weights, data_path, k=20, **kwargs):
    """Top-1 k-NN accuracy (percent) of a checkpoint and of the same architecture at random init.

    ``kwargs`` go to :func:`knn_for_checkpoint` (arch, patch_size, checkpoint_key, resize_size,
    crop_size...). Returns ``{"trained": float, "random": float, "gain": trained - random, "k": k}``.
    """
    trained = knn_for_checkpoint(pretrained_weights, data_path, nb_knn=(k,), **kwargs)[k]["top1"]
    random_init = knn_for_checkpoint("", data_path, nb_knn=(k,), **kwargs)[k]["top1"]
    return {"trained": trained, "random": random_init, "gain": trained - random_init, "k": k}
