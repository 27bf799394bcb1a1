"""Preview settings from the `[sample]` config section."""

from __future__ import annotations

from dataclasses import replace

from trainer.sampling import SampleSettings

# LCM-LoRA sampling as published: 4 steps, guidance 1 (no CFG) (arXiv:2311.05556).
LCM_STEPS, LCM_GUIDANCE = 4, 1.0


def preview_settings(config) -> SampleSettings:
    s = config.sample
    settings = SampleSettings(
        prompts=tuple(s.prompts),
        negative_prompt=s.negative_prompt,
        steps=s.steps,
        guidance=s.guidance,
        sampler=s.sampler,
        seed=s.seed,
        width=s.width or config.dataset.resolution,
        height=s.height or config.dataset.resolution,
        clip_skip=config.model.clip_skip,
        decoder=s.preview_decoder,
    )
    if config.task == "lcm_distill" or s.lcm_lora:
        return replace(settings, sampler="lcm", steps=LCM_STEPS, guidance=LCM_GUIDANCE)
    return settings
