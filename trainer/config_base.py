"""What every config section shares, and the values several sections use."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

DEMO = "demo"  # model.path / dataset.path value meaning the built-in demo model / dataset
VAE_FACTOR = 8  # the SD VAE downsamples by 8: every pixel size must be a multiple of it


class Section(BaseModel):
    # Unknown keys are typos; silently ignoring them trains the wrong thing.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
