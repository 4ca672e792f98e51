"""The router's sentence encoder: sentence-transformers on CPU, optionally with int8 Linear layers."""

from __future__ import annotations

import numpy as np


class Encoder:
    """Sentence encoder (sentence-transformers), loaded once, L2-normalised float32 embeddings."""

    def __init__(self, ref: str, cache_dir: str | None = None, max_seq_length: int = 128,
                 int8: bool = False):
        """``max_seq_length``: tokens read per text (128: what all-MiniLM-L6-v2 was trained on;
        its config allows 256, which only costs time on long posts). ``int8``: torch dynamic
        quantization of every Linear layer (int8 weights, activations quantized per call): about
        half the CPU time per text (bench/router.py); embeddings move (cosine ~0.92 to fp32), so
        a head is trained and served on the same setting (router.json records it)."""
        from sentence_transformers import SentenceTransformer

        from cm_ray.models import resolve_model

        self.ref, self.int8 = ref, bool(int8)
        self.model = SentenceTransformer(resolve_model(ref, cache_dir), device="cpu")
        self.model.max_seq_length = min(max_seq_length, self.model.max_seq_length or max_seq_length)
        if self.int8:
            import warnings

            import torch

            with warnings.catch_warnings():  # torch.ao's notice that the API moves to torchao
                warnings.simplefilter("ignore")
                self.model = torch.ao.quantization.quantize_dynamic(self.model, {torch.nn.Linear},
                                                                    dtype=torch.qint8)

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(list(texts), batch_size=64, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False).astype(np.float32)
