"""Revisited Oxford / Paris image retrieval (evaluation.md §2.9; Radenović et al., CVPR 2018).

Data layout (``--data_path``, official default ``data/revisited_paris_oxford``)::

    <data_path>/<dataset>/gnd_<dataset>.pkl     dataset = roxford5k | rparis6k
    <data_path>/<dataset>/jpg/<name>.jpg        every name of ``imlist`` and ``qimlist``

``gnd_<dataset>.pkl`` holds ``imlist`` (database names), ``qimlist`` (query names) and ``gnd`` (one
dict per query with ``easy``, ``hard``, ``junk`` database indices; ``bbx`` is ignored: queries are
full images, DINO protocol). It is read by :func:`load_ground_truth` with a restricted unpickler that
admits only plain containers, numbers, strings and NumPy arrays; a file asking for anything else is
refused with its name and never executed.

Protocol: Medium = positives easy ∪ hard, junk = junk; Hard = positives hard, junk = junk ∪ easy;
mAP and mP@{1,5,10} by :func:`ibot.eval.retrieval_metrics.compute_map`.
"""
import io
import os
import pickle

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from ibot.eval.features import IMAGENET_MEAN, IMAGENET_STD, IMG_EXTENSIONS
from ibot.eval.retrieval_metrics import compute_map

__all__ = ["DATASETS", "GroundTruthError", "load_ground_truth", "RetrievalImages", "retrieval_transform",
           "revisited_ground_truth", "evaluate_revisited", "rank_database", "list_distractors"]

DATASETS = ("roxford5k", "rparis6k")

# (module, name) pairs a ground-truth pickle may reference: NumPy's array/scalar reconstruction only
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}
# harmless constructors, under their Python 3 and Python 2 module names
_ALLOWED_GLOBALS |= {(m, n) for m in ("builtins", "__builtin__") for n in ("set", "frozenset", "bytes", "bytearray")}


class GroundTruthError(ValueError):
    """A ground-truth file is missing, unsafe or malformed (the message names the file)."""


def _latin1_bytes(text, encoding="latin1"):
    # protocol-2 pickles written by Python 3 store bytes (e.g. NumPy buffers) as _codecs.encode(str, 'latin1')
    if encoding != "latin1" or not isinstance(text, str):
        raise GroundTruthError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source):
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise GroundTruthError(
            f"{self.source}: refused to unpickle the global {module}.{name} (a ground-truth file may only "
            f"hold plain containers, numbers, strings and NumPy arrays); the file was not executed")

    def persistent_load(self, pid):
        raise GroundTruthError(f"{self.source}: refused a persistent reference in the pickle")


def load_ground_truth(path):
    """Read ``gnd_<dataset>.pkl`` safely and check its structure.

    Returns the dict with ``imlist`` / ``qimlist`` (lists of str) and ``gnd`` (list of dicts whose
    ``easy``/``hard``/``junk`` are int64 arrays). Raises :class:`GroundTruthError` naming ``path``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GroundTruthError(f"ground-truth file not found: {path} (expected the revisited Oxford/Paris "
                               f"layout <data_path>/<dataset>/gnd_<dataset>.pkl and <data_path>/<dataset>/jpg/)")
    with open(path, "rb") as f:
        data = f.read()
    try:
        cfg = _RestrictedUnpickler(io.BytesIO(data), path).load()
    except GroundTruthError as e:
        raise GroundTruthError(str(e) if path in str(e) else f"{path}: {e}") from None
    except Exception as e:
        raise GroundTruthError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("imlist", "qimlist", "gnd")):
        raise GroundTruthError(f"{path}: expected a dict with 'imlist', 'qimlist' and 'gnd'")
    imlist, qimlist, gnd = (list(cfg[k]) for k in ("imlist", "qimlist", "gnd"))
    if len(gnd) != len(qimlist):
        raise GroundTruthError(f"{path}: {len(gnd)} 'gnd' entries for {len(qimlist)} queries")
    n = len(imlist)
    checked = []
    for i, g in enumerate(gnd):
        if not isinstance(g, dict):
            raise GroundTruthError(f"{path}: gnd[{i}] is a {type(g).__name__}, expected a dict")
        entry = dict(g)
        for key in ("easy", "hard", "junk"):
            arr = np.asarray(g.get(key, []), dtype=np.int64).reshape(-1)
            if arr.size and (arr.min() < 0 or arr.max() >= n):
                raise GroundTruthError(f"{path}: gnd[{i}]['{key}'] indexes outside the {n} database images")
            entry[key] = arr
        checked.append(entry)
    out = dict(cfg)
    out.update(imlist=[str(s) for s in imlist], qimlist=[str(s) for s in qimlist], gnd=checked)
    return out


def retrieval_transform():
    """ToTensor + ImageNet normalisation (no resize, no crop: sizes are set by :class:`RetrievalImages`)."""
    from torchvision import transforms
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class RetrievalImages(Dataset):
    """Images shrunk in place so that the longer side is ≤ ``imsize`` (aspect kept, Lanczos), then ``transform``.

    Items are ``(image (3, H, W), -1, index)``; different sizes, so load with batch size 1.
    """

    def __init__(self, paths, imsize=None, transform=None):
        self.samples = list(paths)
        self.imsize = imsize
        self.transform = transform if transform is not None else retrieval_transform()

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        ImageFile.LOAD_TRUNCATED_IMAGES = True   # as officially: a few Oxford files are truncated
        with Image.open(self.samples[index]) as img:
            img = img.convert("RGB")
        if self.imsize is not None:
            img.thumbnail((self.imsize, self.imsize), Image.LANCZOS)
        return self.transform(img), -1, index

    @classmethod
    def from_ground_truth(cls, data_path, dataset, split, imsize=None, cfg=None):
        """Database (``split='db'``) or query (``'query'``) images of ``<data_path>/<dataset>``; every file
        is checked to exist first (error naming the first missing ones)."""
        if dataset not in DATASETS:
            raise GroundTruthError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
        if cfg is None:
            cfg = load_ground_truth(os.path.join(data_path, dataset, f"gnd_{dataset}.pkl"))
        names = cfg["qimlist"] if split == "query" else cfg["imlist"]
        folder = os.path.join(data_path, dataset, "jpg")
        paths = [os.path.join(folder, n + ".jpg") for n in names]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} {split} images named in gnd_{dataset}.pkl are missing, e.g. "
                                    f"{missing[:3]} (expected {folder}/<name>.jpg)")
        return cls(paths, imsize)


def list_distractors(folder):
    """Sorted image files under ``folder`` (recursively; e.g. the R1M distractors). Error if none."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"distractor folder not found: {folder}")
    paths = sorted(os.path.join(root, f) for root, _, files in os.walk(folder, followlinks=True)
                   for f in files if f.lower().endswith(IMG_EXTENSIONS))
    if not paths:
        raise FileNotFoundError(f"distractor folder {folder} holds no image files")
    return paths


def revisited_ground_truth(gnd, setup):
    """Per-query ``{'ok', 'junk'}`` of the ``'medium'`` or ``'hard'`` setup (see the module docstring)."""
    out = []
    for g in gnd:
        easy, hard, junk = (np.asarray(g.get(k, []), dtype=np.int64).reshape(-1) for k in ("easy", "hard", "junk"))
        if setup == "medium":
            out.append({"ok": np.concatenate([easy, hard]), "junk": junk})
        elif setup == "hard":
            out.append({"ok": hard, "junk": np.concatenate([junk, easy])})
        else:
            raise ValueError(f"setup must be 'medium' or 'hard', got {setup!r}")
    return out


@torch.no_grad()
def rank_database(db_features, query_features):
    """Cosine ranking: (n_db, n_queries) int64 array, column i = database indices for query i, best first.

    Features are L2-normalised here (rows of (n_db, d) and (n_q, d) tensors).
    """
    db = torch.nn.functional.normalize(db_features.float(), dim=1, p=2)
    q = torch.nn.functional.normalize(query_features.float(), dim=1, p=2)
    sim = db @ q.T
    return torch.argsort(-sim, dim=0).cpu().numpy()


def evaluate_revisited(ranks, gnd, ks=(1, 5, 10)):
    """Medium and Hard scores of a ranking (revisited protocol).

    Args:
        ranks: (n_db, n_queries) array from :func:`rank_database` (distractor indices ≥ len(imlist)
            are never positive nor junk).
        gnd: the ``gnd`` list of :func:`load_ground_truth`.
    Returns:
        dict with ``mAP_M``, ``mAP_H`` (percent), ``mP@k_M``, ``mP@k_H`` (dict k -> percent), ``ks``.
    """
    out = {"ks": list(ks)}
    for setup, tag in (("medium", "M"), ("hard", "H")):
        mean_ap, _, mpr, _ = compute_map(ranks, revisited_ground_truth(gnd, setup), list(ks))
        out[f"mAP_{tag}"] = float(mean_ap) * 100.0
        out[f"mP@k_{tag}"] = {int(k): float(v) * 100.0 for k, v in zip(ks, mpr)}
    return out
