"""Diversity-guided sample balancing (DGSB, after MitDet, arXiv 2307.05889).

A detector's training set is dominated by common looks: most figures are in metaphase, most
look-alikes are plain dark nuclei. DGSB clusters each class in a feature space and draws batches
evenly across the clusters, so rare phases and hard look-alikes are seen as often as common ones.
The features here are cheap and need no network: the patch centre (the part the model looks at)
shrunk to 8 x 8 colour pixels, reduced by PCA; k-means per class (scikit-learn, seeded).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

from mitotype.data.images import BatchSource

GRID = 8  # the centre is averaged into GRID x GRID colour cells


def centre_descriptors(store: BatchSource, rows: np.ndarray, *, centre: int = 0, chunk: int = 512) -> np.ndarray:
    """(len(rows), GRID*GRID*3) float32: each patch's central ``centre`` px (0: all) averaged into cells."""
    out = []
    for s in range(0, len(rows), chunk):
        x = store.batch(rows[s:s + chunk]).permute(0, 3, 1, 2).float() / 255.0
        if centre and centre < x.shape[-1]:
            o = (x.shape[-1] - centre) // 2
            x = x[..., o:o + centre, o:o + centre]
        out.append(torch.nn.functional.adaptive_avg_pool2d(x, GRID).flatten(1).numpy())
    return np.concatenate(out) if out else np.empty((0, GRID * GRID * 3), np.float32)


def diversity_clusters(features: np.ndarray, labels: np.ndarray, *, k: int, seed: int) -> np.ndarray:
    """A cluster id per row, unique across classes: k-means with up to ``k`` clusters in each class."""
    clusters = np.zeros(len(labels), dtype=np.int64)
    next_id = 0
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        n = min(k, len(rows))
        if n <= 1:
            clusters[rows] = next_id
            next_id += 1
            continue
        x = features[rows] - features[rows].mean(axis=0)
        x = PCA(n_components=min(16, len(rows), x.shape[1]), random_state=seed).fit_transform(x)
        found = KMeans(n_clusters=n, n_init=3, random_state=seed).fit_predict(x)
        clusters[rows] = found + next_id
        next_id += n
    return clusters


def diverse_weights(labels: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Draw weights giving every class the same share, split evenly among its clusters."""
    w = np.empty(len(labels), dtype=np.float64)
    classes = np.unique(labels)
    for c in classes:
        in_c = labels == c
        ids, counts = np.unique(clusters[in_c], return_counts=True)
        per = dict(zip(ids.tolist(), counts.tolist()))
        w[in_c] = [1.0 / (len(classes) * len(ids) * per[g]) for g in clusters[in_c]]
    return w
