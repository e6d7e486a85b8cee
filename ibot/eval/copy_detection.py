"""Copy detection on Copydays (evaluation.md §2.10; DINO protocol).

Data layout (``--data_path``, official default ``data/copydays``), ``*.jpg`` in every folder::

    original/  strong/  jpegqual/{3,5,8,10,15,20,30,50,75}/  crops/{10,15,20,30,40,50,60,70,80}/

Queries are the 20 blocks in the official order (:data:`BLOCK_NAMES`), the database is ``original/``
(plus optional distractors). Query j of every block except ``strong`` is a copy of original j (sorted
file order); a ``strong`` query's positives are the originals whose first 4 filename characters match.

Descriptor: the last block's normed tokens, [CLS] ⊕ GeM(p=4) of the patch tokens (2·D). Optional
whitening: centre by the mean of the whitening features, PCA (all dimensions, power 0.5) learnt from
their UNcentred second-moment matrix (as officially). Ranking: cosine similarity, top 20; per-block
mAP with the Holidays trapezoid AP over the ranks within the top 20.
"""
import os

import torch
from torch import nn
from torch.utils.data import Dataset

from ibot.eval.features import IMAGENET_MEAN, IMAGENET_STD, IMG_EXTENSIONS
from ibot.eval.retrieval_metrics import PCA, compute_ap

__all__ = ["BLOCK_NAMES", "OFFICIAL_BLOCK_SIZES", "TOP_K", "CopydaysBlocks", "ImageList", "copydays_transform",
           "gem", "copy_descriptor", "whiten", "positives_per_query", "block_map", "rank_top_k", "list_images",
           "list_image_paths"]

BLOCK_NAMES = (["original", "strong"] + [f"jpegqual/{q}" for q in (3, 5, 8, 10, 15, 20, 30, 50, 75)]
               + [f"crops/{c}" for c in (10, 15, 20, 30, 40, 50, 60, 70, 80)])
OFFICIAL_BLOCK_SIZES = {name: (229 if name == "strong" else 157) for name in BLOCK_NAMES}
TOP_K = 20


def list_images(folder, extensions=(".jpg",)):
    """Sorted file names (not paths) of the images directly in ``folder`` (default: ``.jpg`` as officially)."""
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(tuple(extensions)))


def list_image_paths(folder, what="image"):
    """Sorted paths of the image files directly in ``folder`` (whitening / distractor sets). Error if none."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what} folder not found: {folder}")
    paths = [os.path.join(folder, f) for f in list_images(folder, IMG_EXTENSIONS)]
    if not paths:
        raise FileNotFoundError(f"{what} folder {folder} holds no image files")
    return paths


class CopydaysBlocks:
    """The 20 Copydays blocks of ``basedir``: ``files[name]`` = sorted paths; checked at construction.

    Block sizes come from the files found; sizes other than the official 157 (229 for ``strong``)
    are reported in a printed note (a partial copy of the data set, or a tiny test folder).
    """

    def __init__(self, basedir):
        self.basedir = os.fspath(basedir)
        missing = [n for n in BLOCK_NAMES if not os.path.isdir(os.path.join(self.basedir, n))]
        if missing:
            raise FileNotFoundError(
                f"Copydays folder {self.basedir} lacks {missing} (expected original/, strong/, "
                f"jpegqual/{{3,5,8,10,15,20,30,50,75}}/ and crops/{{10,...,80}}/ with *.jpg files)")
        self.names = {n: list_images(os.path.join(self.basedir, n)) for n in BLOCK_NAMES}
        self.files = {n: [os.path.join(self.basedir, n, f) for f in fs] for n, fs in self.names.items()}
        n_orig = len(self.names["original"])
        if n_orig == 0:
            raise FileNotFoundError(f"{self.basedir}/original holds no .jpg file")
        for n in BLOCK_NAMES:
            if n not in ("original", "strong") and len(self.names[n]) != n_orig:
                raise ValueError(f"{self.basedir}/{n} has {len(self.names[n])} images for {n_orig} originals; "
                                 f"its query j must be a copy of original j")
        self.positives = {n: positives_per_query(n, self.names["original"], self.names[n]) for n in BLOCK_NAMES}
        odd = {n: len(self.names[n]) for n in BLOCK_NAMES if len(self.names[n]) != OFFICIAL_BLOCK_SIZES[n]}
        if odd:
            print(f"NOTE: Copydays blocks of {self.basedir} differ from the official sizes (157, strong 229): {odd}")

    @property
    def block_sizes(self):
        """Number of queries per block, in :data:`BLOCK_NAMES` order."""
        return [len(self.files[n]) for n in BLOCK_NAMES]

    def query_files(self):
        """All query paths, blocks concatenated in the official order."""
        return [p for n in BLOCK_NAMES for p in self.files[n]]


def positives_per_query(block, original_names, query_names):
    """Database indices of the positives of each query of ``block`` (list of lists).

    ``strong``: originals sharing the first 4 filename characters (error if a query has none);
    other blocks: original j for query j.
    """
    if block != "strong":
        return [[j] for j in range(len(query_names))]
    out = []
    for q in query_names:
        pos = [j for j, o in enumerate(original_names) if o[:4] == q[:4]]
        if not pos:
            raise ValueError(f"strong/{q}: no original shares its 4-character prefix {q[:4]!r}")
        out.append(pos)
    return out


def copydays_transform(imsize=224):
    """Square bicubic resize to (imsize, imsize), ToTensor, ImageNet normalisation."""
    from torchvision import transforms
    return transforms.Compose([
        transforms.Resize((imsize, imsize), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class ImageList(Dataset):
    """``(transform(RGB image), -1, index)`` for a list of paths (the batch layout of ``extract_features``)."""

    def __init__(self, paths, transform):
        self.samples = list(paths)
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image
        with Image.open(self.samples[i]) as img:
            img = img.convert("RGB")
        return self.transform(img), -1, i


def gem(tokens, p=4.0, eps=1e-6):
    """Generalised mean pooling over tokens: (B, N, D) -> (B, D), ``(mean_n clamp(x, eps)^p)^(1/p)``."""
    return tokens.clamp(min=eps).pow(p).mean(dim=1).pow(1.0 / p)


def copy_descriptor(model, images, p=4.0):
    """Copy-detection descriptor of a batch: [CLS] ⊕ GeM_p(patch tokens) of the last normed block.

    Args:
        model: ViT with ``get_intermediate_layers``; images: (B, 3, H, W).
    Returns:
        (B, 2·D) float tensor (not normalised).
    """
    tokens = model.get_intermediate_layers(images, n=1)[0]
    return torch.cat([tokens[:, 0], gem(tokens[:, 1:], p)], dim=1).float()


def whiten(database, queries, whitening_features):
    """Centre by the whitening mean, then PCA-whiten (all dimensions, power 0.5) learnt from the
    uncentred second moment ``WᵀW / n`` of the whitening features (official order of operations).

    Args: (n_db, d), (n_q, d), (n_w, d) tensors. Returns the whitened ``(database, queries)``.
    """
    w = whitening_features.float()
    mean = w.mean(dim=0)
    database, queries = database.float() - mean, queries.float() - mean
    pca = PCA(dim=database.shape[-1], whit=0.5)
    pca.train_pca((w.T @ w / w.shape[0]).cpu().double().numpy())
    return pca.apply(database), pca.apply(queries)


def block_map(indices, blocks, positives, top_k=TOP_K):
    """Per-block mAP of a ranking.

    Args:
        indices: (n_queries, ≥top_k) database indices per query, best first (queries in block order).
        blocks: list of ``(name, size)`` in query order.
        positives: ``{name: list of positive-index lists}`` (:func:`positives_per_query`).
    Returns:
        dict name -> mAP (fraction in [0, 1]); AP = Holidays trapezoid over the ranks of the
        positives within the first ``top_k`` results, divided by the query's number of positives.
    """
    indices = torch.as_tensor(indices)[:, :top_k].tolist()
    out, j0 = {}, 0
    for name, size in blocks:
        total = 0.0
        for qno in range(size):
            pos = set(positives[name][qno])
            ranks = [r for r, b in enumerate(indices[j0 + qno]) if b in pos]
            total += compute_ap(ranks, len(pos))
        out[name] = total / size if size else float("nan")
        j0 += size
    if j0 != len(indices):
        raise ValueError(f"block sizes add up to {j0} queries, the ranking has {len(indices)}")
    return out


def rank_top_k(database, queries, k=TOP_K):
    """L2-normalise, cosine similarity, top ``k``: returns ``(similarities, indices)`` (n_q, k)."""
    database = nn.functional.normalize(database.float(), dim=1, p=2)
    queries = nn.functional.normalize(queries.float(), dim=1, p=2)
    return (queries @ database.T).topk(min(k, database.shape[0]), dim=1, largest=True, sorted=True)

