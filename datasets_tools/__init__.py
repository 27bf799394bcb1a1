"""Dataset scanning, validation, buckets, caption processing and latent caches.

Typical use by the trainer:

    options = DataOptions(buckets=BucketConfig(resolution=512), batch_size=2, seed=seed)
    report = check_dataset(root, options.buckets)
    report.raise_if_untrainable()  # UserError carrying the whole report
    cache = LatentCache(vae, module_identity(vae), cache_dir)  # or None: load pixels
    data = TrainingData(report.items, options, cache)
    data.cache_latents()
    for tb in data.batches(start=saved_position):  # Position(epoch, batch) from a checkpoint
        ...train on tb.latents / tb.captions...
        saved_position = tb.batch.next_position

Names are imported lazily so that `python -m datasets_tools check` does not
pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "buckets": ["BucketConfig", "BucketReport", "assign_bucket", "bucket_report",
                "make_buckets", "nearest_bucket", "upscale_factor"],
    "captions": ["CaptionOptions", "CaptionProcessor", "split_tags", "tag_frequency"],
    "check": ["check_dataset"],
    "crop": ["CropSpec", "compute_crop"],
    "formats": ["SUPPORTED_EXTENSIONS", "ImageDecodeError"],
    "hashing": ["module_identity"],
    "latent_cache": ["CacheStats", "LatentCache", "LatentEntry", "LatentRequest"],
    "loading": ["decode_image"],
    "report": ["Problem", "Report", "Severity"],
    "sampler": ["Batch", "BucketBatchSampler", "Position", "sample_rng"],
    "scan": ["ImageItem", "ScanLimits", "ScanResult", "ScanStopped", "scan_dataset"],
    "text_cache": ["TextEmbeddingCache"],
    "training_data": ["DataOptions", "TrainingBatch", "TrainingData"],
    "transform": ["PreparedImage", "crop_pixels", "prepare_image", "to_tensor"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
