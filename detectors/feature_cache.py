"""A content-keyed on-disk cache for what a frozen network computes from an image.

LGrad's gradient maps and UnivFD's embeddings depend only on (a) the image pixels,
(b) the frozen network's weights and (c) the preprocessing between the two. The key of
an entry is a hash of the exact pixel tensor; (b) and (c) form the *namespace*, one
sub-folder per identity, so changing the source model, its weights, the resolution or
the normalisation can never return a stale entry. Repeated epochs and ablations that
share the identity reuse each other's work.

Layout: ``<root>/<namespace hash>/<key[:2]>/<key>.npy`` plus ``<namespace hash>/identity.json``
(what the namespace means, for people). Writes are atomic (temporary file, then
``os.replace``), so concurrent processes (DDP ranks, parallel runs) at worst compute an
entry twice. A small in-memory layer spares the disk on later epochs.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from data.io import atomic_path, atomic_write_text

log = logging.getLogger(__name__)


def content_key(image: Tensor) -> str:
    """Hash of one image tensor's exact values, shape and dtype (32 hex digits)."""
    arr = image.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(arr.shape)}|{arr.dtype}".encode())
    h.update(arr.numpy().tobytes() if arr.dtype != torch.bfloat16 else arr.float().numpy().tobytes())
    return h.hexdigest()


def content_keys(images: Tensor) -> list[str]:
    cpu = images.detach().to("cpu")  # one device transfer for the whole batch
    return [content_key(img) for img in cpu]


def module_fingerprint(module: nn.Module) -> str:
    """Hash of every parameter and buffer (names, shapes, values): identifies the weights,
    so two different files for the same architecture never share cache entries."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(module).__qualname__.encode())
    for name, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        if t.dtype == torch.bfloat16:
            t = t.float()
        h.update(t.numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """``lookup_or_compute(images, fn)`` returns ``fn(images)`` row by row, computing only
    the rows not cached yet (in one call to ``fn``) and storing them."""

    def __init__(
        self,
        root: str | Path,
        identity: dict,
        store_dtype: str | None = None,
        memory_mb: float = 256.0,
    ) -> None:
        self.identity = dict(identity)
        text = json.dumps(self.identity, sort_keys=True, default=str)
        self.namespace = hashlib.blake2b(text.encode(), digest_size=12).hexdigest()
        self.dir = Path(root).expanduser() / self.namespace
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "identity.json").is_file():
            atomic_write_text(self.dir / "identity.json", json.dumps(self.identity, indent=2, sort_keys=True, default=str) + "\n")
        self.store_dtype = np.dtype(store_dtype) if store_dtype else None
        self.memory_bytes = int(memory_mb * 2**20)
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()
        self._memory_used = 0
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.npy"

    def _remember(self, key: str, arr: np.ndarray) -> None:
        if self.memory_bytes <= 0 or arr.nbytes > self.memory_bytes:
            return
        self._memory[key] = arr
        self._memory_used += arr.nbytes
        while self._memory_used > self.memory_bytes:
            _, old = self._memory.popitem(last=False)
            self._memory_used -= old.nbytes

    def get(self, key: str) -> np.ndarray | None:
        arr = self._memory.get(key)
        if arr is not None:
            return arr
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:  # a truncated file from a killed process: recompute it
            log.warning("feature cache: unreadable entry %s (%s); recomputing", path, e)
            return None
        self._remember(key, arr)
        return arr

    def put(self, key: str, arr: np.ndarray) -> np.ndarray:
        """Store one entry; returns it as stored (in ``store_dtype``)."""
        if self.store_dtype is not None:
            arr = arr.astype(self.store_dtype, copy=False)
        with atomic_path(self._path(key), durable=False) as tmp, open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        self._remember(key, arr)
        return arr

    def lookup_or_compute(self, images: Tensor, compute: Callable[[Tensor], Tensor], keys: list[str] | None = None) -> Tensor:
        """Rows of ``compute(images)``; cached rows come back in their stored dtype cast to
        the computed dtype (float32 when every row was cached)."""
        keys = keys if keys is not None else content_keys(images)
        found = [self.get(k) for k in keys]
        missing = [i for i, arr in enumerate(found) if arr is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        rows: list[Tensor | None] = [None] * len(keys)
        dtype = torch.float32
        if missing:
            computed = compute(images[missing])
            dtype = computed.dtype
            for j, i in enumerate(missing):
                # Use what later epochs will read back (store_dtype), so a run is the
                # same whether an entry was just computed or came from the cache.
                stored = self.put(keys[i], computed[j].detach().to("cpu").numpy())
                rows[i] = torch.from_numpy(np.array(stored, copy=True))
        for i, arr in enumerate(found):
            if arr is not None:
                rows[i] = torch.from_numpy(np.array(arr, copy=True))
        return torch.stack([r.to(dtype) for r in rows]).to(images.device)
