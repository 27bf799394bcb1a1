"""kohya sd-scripts config names and where they live in our schema.

Used only for "did you mean" suggestions in config errors (`trainer.config_io`).
"""

# The names its users will type -> ours (with the value where the meaning maps
# onto a choice).
KOHYA_ALIASES = {
    "pretrained_model_name_or_path": "model.path", "train_data_dir": "dataset.path",
    "enable_bucket": "dataset.buckets", "bucket_no_upscale": "dataset.no_upscale",
    "min_bucket_reso": "dataset.min_bucket", "max_bucket_reso": "dataset.max_bucket",
    "bucket_reso_steps": "dataset.bucket_step", "shuffle_caption": "dataset.shuffle_captions",
    "caption_dropout_rate": "dataset.caption_dropout", "flip_aug": "dataset.flip",
    "caption_tag_dropout_rate": "dataset.tag_dropout",
    "cache_latents_to_disk": 'dataset.cache_latents = "disk"',
    "network_module": "network.type", "algo": "network.type", "network_dim": "network.rank",
    "network_alpha": "network.alpha", "conv_dim": "network.conv_rank",
    "use_tucker": "network.tucker", "network_dropout": "network.dropout",
    "network_weights": "network.resume_from",
    "network_train_unet_only": "network.train_text_encoder = false",
    "network_train_text_encoder_only": "network.train_unet = false",
    "network_args": "the separate keys network.type, network.conv_rank, network.conv_alpha",
    "max_train_steps": "train.steps", "max_train_epochs": "train.epochs",
    "train_batch_size": "train.batch_size", "gradient_accumulation_steps": "train.grad_accum",
    "learning_rate": "train.unet_lr", "lr": "train.unet_lr",
    "optimizer_type": "train.optimizer", "lr_scheduler": "train.scheduler",
    "lr_warmup_steps": "train.warmup_steps", "save_state": "train.save_state_every_n_steps",
    "xformers": 'train.attention = "xformers"', "sdpa": 'train.attention = "sdpa"',
    "sample_prompts": "sample.prompts", "sample_every_n_steps": "sample.every_n_steps",
    "sample_sampler": "sample.sampler",
    "output_dir": "output.dir", "output_name": "output.name",
    "save_every_n_epochs": "output.save_every_n_steps", "metadata_title": "output.title",
    "metadata_author": "output.author", "metadata_description": "output.description",
    "training_comment": "output.description",
    "reg_data_dir": "dataset.reg_path", "prior_loss_weight": "train.prior_loss_weight",
    "masked_loss": "dataset.masked_loss", "alpha_mask": "dataset.masked_loss",
    "conditioning_data_dir": "dataset.mask_path",
    "validation_split": "dataset.validation_split",
    "validate_every_n_steps": "train.validate_every_n_steps",
    "fp8_base": 'model.base_precision = "fp8"',
}
KOHYA_SECTIONS = {
    "model_arguments": "model",
    "dataset_arguments": "dataset",
    "additional_network_arguments": "network",
    "training_arguments": "train",
    "optimizer_arguments": "train",
    "sample_prompt_arguments": "sample",
    "saving_arguments": "output",
}
