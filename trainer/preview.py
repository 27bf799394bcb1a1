"""Preview settings from the `[sample]` config section."""

from __future__ import annotations

from trainer.sampling import SampleSettings


def preview_settings(config) -> SampleSettings:
    s = config.sample
    return SampleSettings(
        prompts=tuple(s.prompts),
        negative_prompt=s.negative_prompt,
        steps=s.steps,
        guidance=s.guidance,
        sampler=s.sampler,
        seed=s.seed,
        width=s.width or config.dataset.resolution,
        height=s.height or config.dataset.resolution,
        clip_skip=config.model.clip_skip,
    )
