"""The [dataset] section of the training config (see trainer/config_schema.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from trainer.config_base import VAE_FACTOR, Section


class DatasetConfig(Section):
    path: str = Field("", description='Image folder (kohya "N_name" subfolders allowed); '
                      '"demo" = the built-in demo dataset, "demo-mychar" = yellow stars '
                      'captioned "mychar". Empty in presets.')
    caption_extension: str = Field(".txt", description="Caption file extension next to images.")
    resolution: int = Field(512, ge=64, le=2048, multiple_of=64, description="Training size in "
                            "pixels (the side of a square of the same area).")
    buckets: bool = Field(True, description="Aspect-ratio buckets, not crops to a square.")
    min_bucket: int = Field(256, ge=64, le=4096, description="Smallest bucket side in pixels.")
    max_bucket: int = Field(1024, ge=64, le=4096, description="Largest bucket side in pixels.")
    bucket_step: int = Field(64, ge=8, le=512, multiple_of=VAE_FACTOR,
                             description="Bucket sides step by this many pixels.")
    no_upscale: bool = Field(False, description="Never enlarge: small images get a bucket "
                             "within their own size.")
    keep_tokens: int = Field(0, ge=0, description="Leading caption tags kept in place when "
                             "shuffling or dropping tags.")
    shuffle_captions: bool = Field(False, description="Shuffle comma-separated caption tags.")
    caption_dropout: float = Field(0.0, ge=0, le=1, description="Chance of an empty caption.")
    tag_dropout: float = Field(0.0, ge=0, le=1, description="Chance of dropping each tag.")
    flip: bool = Field(False, description="Random horizontal flips (not for asymmetric subjects).")
    cache_latents: Literal["memory", "disk", "off"] = Field("memory", description="Encode "
        "images with the VAE once (disk: kept across runs); off: encode at every step.")
    trigger_word: str = Field("", description="Put in front of every caption (e.g. 'sks').")
    repeats: int = Field(1, ge=1, description='Times each image counts per epoch, outside '
                         'kohya "N_name" folders (there N counts; kohya num_repeats).')
    reg_path: str = Field("", description='Regularization (class) images, kohya reg_data_dir: '
        '"N_class" subfolders (N = repeats) with captions, checked like dataset.path. Each '
        "epoch adds as many reg samples as training samples (cycled or cut, as kohya), mixed "
        "into the batches; their loss is weighted by train.prior_loss_weight. Empty: none.")
    strict: bool = Field(False, description="Refuse the dataset if any file would be skipped "
                         "(corrupt, unsupported, too small, unreadable caption); off: train on "
                         "the rest and list the skipped files.")
    masked_loss: bool = Field(False, description="Weight each pixel's loss by a mask (kohya "
        "masked_loss): white = train, black = ignore, grey = partly. The mask is the file of "
        "the same name in dataset.mask_path, else the image's alpha channel (RGBA PNG/WebP); "
        "an image with neither trains on every pixel (the dataset check warns).")
    mask_path: str = Field("", description="Folder of grayscale masks named like the images "
        "(any image extension, the image's size, same subfolders or flat); needs "
        "dataset.masked_loss = true. Empty: masks from the alpha channel.")
    validation_split: float = Field(0.0, ge=0, lt=1, description="Fraction of the checked "
        "images held out for a validation loss (chosen by train.seed, not trained on); "
        "0 = off. Not with dataset.validation_path.")
    validation_path: str = Field("", description="Folder of validation images with captions, "
        "checked like dataset.path and never trained on. Empty: none (or "
        "dataset.validation_split).")

    @model_validator(mode="after")
    def _one_validation_set(self) -> DatasetConfig:
        if self.validation_split and self.validation_path:
            raise ValueError(
                f"dataset.validation_split = {self.validation_split:g} and "
                f'dataset.validation_path = "{self.validation_path}" both choose validation '
                "images; set only one of them")
        return self

    @model_validator(mode="after")
    def _mask_path_needs_masked_loss(self) -> DatasetConfig:
        if self.mask_path and not self.masked_loss:
            raise ValueError(
                f'dataset.mask_path = "{self.mask_path}" has no effect without '
                "dataset.masked_loss = true; set it, or remove dataset.mask_path"
            )
        return self

    @model_validator(mode="after")
    def _buckets_fit(self) -> DatasetConfig:
        # The same rules as datasets_tools.buckets.BucketConfig, caught here
        # so that the message names the settings.
        if not self.buckets:
            return self
        for key in ("min_bucket", "max_bucket", "resolution"):
            if getattr(self, key) % self.bucket_step:
                raise ValueError(
                    f"dataset.{key} = {getattr(self, key)} is not a multiple of "
                    f"dataset.bucket_step = {self.bucket_step}"
                )
        if not self.min_bucket <= self.resolution <= self.max_bucket:
            raise ValueError(
                f"dataset.min_bucket ({self.min_bucket}) <= dataset.resolution "
                f"({self.resolution}) <= dataset.max_bucket ({self.max_bucket}) does not hold; "
                "change one of them, or set dataset.buckets = false"
            )
        return self
