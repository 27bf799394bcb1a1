"""What `import-kohya` knows about kohya's option names, beyond the did-you-mean
table `trainer.kohya_names.KOHYA_ALIASES` (which it reads for the plain
one-to-one names): names ours spell the same, kohya's choices and ours, and
why each option without an equivalent has none. Torch-free data only.
"""

from __future__ import annotations

# kohya names that are ours too, or that the alias table leaves out.
SAME_NAMES = {
    "clip_skip": "model.clip_skip", "v_parameterization": "model.v_parameterization",
    "seed": "train.seed", "noise_offset": "train.noise_offset",
    "min_snr_gamma": "train.min_snr_gamma", "max_grad_norm": "train.max_grad_norm",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "mixed_precision": "train.mixed_precision", "keep_tokens": "dataset.keep_tokens",
    "caption_extension": "dataset.caption_extension",
    "save_every_n_steps": "output.save_every_n_steps",
    "caption_prefix": "dataset.trigger_word", "lora_network_weights": "network.resume_from",
    "rank_dropout": "network.rank_dropout", "module_dropout": "network.module_dropout",
}  # fmt: skip

# kohya_ss GUI LoRA_type -> network.type; None: an algorithm this trainer lacks.
LORA_TYPES = {
    "Standard": "lora", "LoCon": "locon", "Kohya LoCon": "locon", "LyCORIS/LoCon": "locon",
    "LyCORIS/LoHa": "loha", "LyCORIS/LoKr": "lokr",
}
# LyCORIS `algo=` -> network.type ("lora" becomes locon when conv_dim is given).
LYCORIS_ALGOS = {"lora": "lora", "locon": "locon", "loha": "loha", "lokr": "lokr"}
LYCORIS_MODULES = ("lycoris.kohya",)
KOHYA_LORA_MODULES = ("networks.lora",)

# kohya optimizer_type (case-insensitive) -> train.optimizer, with the weight
# decay kohya's optimizer uses when optimizer_args gives none (its library's
# default), which is what the preset writes so the run matches.
OPTIMIZERS = {
    "adamw": ("adamw", 0.01), "adamw8bit": ("adamw8bit", 0.01),
    "prodigy": ("prodigy", 0.0), "lion": ("lion", 0.0), "sgdnesterov": None,
}
OPTIMIZER_REASONS = {
    "sgdnesterov": "this trainer's sgd has no Nesterov momentum",
}

# kohya lr_scheduler -> train.scheduler (the diffusers names both use).
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
              "polynomial")

# kohya sample_sampler -> sample.sampler.
SAMPLERS = {"euler_a": "euler_a", "k_euler_a": "euler_a", "ddim": "ddim"}

# Values that mean "off" or "kohya's default, no effect" for options that
# have no equivalent here: such an option is not listed, nothing is lost.
HARMLESS = {
    "max_token_length": {75, "75"}, "noise_offset_type": {"Original"},
    "loss_type": {"l2"}, "huber_c": {0.1}, "huber_schedule": {"snr"},
    "min_timestep": {0}, "max_timestep": {1000}, "save_model_as": {"safetensors"},
    "lr_scheduler_num_cycles": {1, "1"}, "lr_scheduler_power": {1, "1"},
    "multires_noise_discount": {0.3}, "vae_batch_size": set(), "LyCORIS_preset": {"full"},
    "preset": {"full"}, "save_model_as_format": {"safetensors"}, "factor": {-1},
    "mem_eff_attn": {False}, "xformers": {"none"}, "train_norm": {False},
    "unit": {1}, "lr_scheduler_type": {""}, "noise_offset_random_strength": {False},
    "num_cpu_threads_per_process": {1, 2},
}  # fmt: skip

# kohya_ss GUI fields that configure the GUI or its launcher, not training.
GUI_ONLY = {
    "model_list", "save_as_bool", "sdxl_checkbox", "use_wandb", "num_processes",
    "num_machines", "multi_gpu", "gpu_ids", "main_process_port", "dynamo_backend",
    "dynamo_mode", "dynamo_use_fullgraph", "dynamo_use_dynamic", "extra_accelerate_launch_args",
    "num_cpu_threads_per_process", "log_tracker_name", "log_tracker_config",
    "huggingface_repo_id", "huggingface_token", "huggingface_repo_type",
    "huggingface_repo_visibility", "huggingface_path_in_repo", "save_state_to_huggingface",
    "resume_from_huggingface", "async_upload", "wandb_api_key", "wandb_run_name",
    "output_dir_gui", "config_file_name", "training_preset", "LyCORIS_preset_gui",
    "sample_prompts_file", "save_to", "show_advanced", "use_shell", "lowvram", "highvram",
}  # fmt: skip

# Options this trainer has no equivalent for, and why (shown to the user).
NO_EQUIVALENT = {
    "sdxl": "this trainer trains SD1.5-family models only",
    "flux1_checkbox": "this trainer trains SD1.5-family models only",
    "sd3_checkbox": "this trainer trains SD1.5-family models only",
    "metadata_license": "no license metadata here (output.description can say it)",
    "metadata_tags": "no tags metadata here (output.trigger_words lists trigger words)",
    "caption_dropout_every_n_epochs": "no per-epoch caption dropout here "
                                      "(dataset.caption_dropout drops captions at random)",
    "no_token_padding": "prompts are always padded to CLIP's 77 tokens here",
    "train_on_input": "no (IA)^3 here", "network_multiplier": "adapters train at "
    "multiplier 1 here", "clip_skip_te": "model.clip_skip applies to the one text encoder",
    "v2": "this trainer loads SD1.x models only (SD2's text encoder is not supported)",
    "vae": "this trainer uses the base model's own VAE",
    "no_half_vae": "the VAE always runs in fp32 here",
    "full_fp16": "adapter weights always train in fp32 here (train.mixed_precision only "
                 "changes the compute)",
    "full_bf16": "adapter weights always train in fp32 here (train.mixed_precision only "
                 "changes the compute)",
    "fp8_base_unet": "model.base_precision applies to the U-Net and the text encoder together",
    "lowram": "no equivalent: loading is already streamed", "mem_eff_attn": "use train.attention",
    "color_aug": "no colour augmentation here", "random_crop": "no random crops here (buckets "
    "or a centre crop)", "face_crop_aug_range": "no face crops here",
    "caption_suffix": "no caption suffix here (dataset.trigger_word is a prefix)",
    "keep_tokens_separator": "keep_tokens counts comma-separated tags here",
    "secondary_separator": "tags are separated by commas here", "enable_wildcard": "no "
    "wildcard captions here", "weighted_captions": "no caption weighting here",
    "max_token_length": "prompts are cut at CLIP's 75 tokens here",
    "noise_offset_type": "only kohya's Original noise offset exists here",
    "multires_noise_iterations": "no multi-resolution noise here",
    "multires_noise_discount": "no multi-resolution noise here",
    "adaptive_noise_scale": "no adaptive noise scale here",
    "noise_offset_random_strength": "the noise offset is fixed here",
    "ip_noise_gamma": "no input perturbation noise here",
    "ip_noise_gamma_random_strength": "no input perturbation noise here",
    "debiased_estimation_loss": "no debiased estimation loss here (train.min_snr_gamma "
                                "weights the loss)",
    "scale_v_pred_loss_like_noise_pred": "no v-prediction loss rescaling here",
    "v_pred_like_loss": "no v-prediction-like loss here", "zero_terminal_snr": "the noise "
    "schedule is the model's own here", "loss_type": "the loss is the mean squared error "
    "here", "huber_c": "no Huber loss here", "huber_schedule": "no Huber loss here",
    "min_timestep": "timesteps are drawn from the whole schedule here",
    "max_timestep": "timesteps are drawn from the whole schedule here",
    "scale_weight_norms": "no max-norm regularization here",
    "stop_text_encoder_training": "the text encoder trains "
    "for the whole run here (network.train_text_encoder on or off)",
    "lr_scheduler_num_cycles": "train.scheduler cosine_with_restarts restarts once here",
    "lr_scheduler_power": "the polynomial schedule's power is fixed at 1 here",
    "lr_scheduler_args": "schedules take no extra arguments here",
    "lr_scheduler_type": "only the built-in train.scheduler names exist here",
    "block_dims": "one rank for every layer here", "block_alphas": "one alpha for every layer",
    "conv_block_dims": "one conv rank for every layer here",
    "conv_block_alphas": "one conv alpha for every layer here",
    "down_lr_weight": "one learning rate per model part here",
    "mid_lr_weight": "one learning rate per model part here",
    "up_lr_weight": "one learning rate per model part here",
    "block_lr_zero_threshold": "one learning rate per model part here",
    "loraplus_lr_ratio": "no LoRA+ here", "loraplus_unet_lr_ratio": "no LoRA+ here",
    "loraplus_text_encoder_lr_ratio": "no LoRA+ here", "dim_from_weights": "set network.rank "
    "to the file's rank (network.resume_from reads it from the file)",
    "save_every_n_epochs": "saves are counted in steps here: set output.save_every_n_steps "
    "(one epoch = images x repeats / train.batch_size steps)",
    "save_last_n_epochs": "use output.keep_last_n (a number of files)",
    "save_last_n_steps": "use output.keep_last_n (a number of files)",
    "save_last_n_epochs_state": "states follow output.keep_last_n here",
    "save_last_n_steps_state": "states follow output.keep_last_n here",
    "save_n_epoch_ratio": "saves are counted in steps here (output.save_every_n_steps)",
    "save_state": "a resumable state is saved with every adapter save here "
                  "(train.save_state_every_n_steps can add more)",
    "save_state_on_train_end": "a state is saved with the final adapter here",
    "save_model_as": "adapters are always saved as .safetensors here",
    "sample_every_n_epochs": "samples are counted in steps here: set sample.every_n_steps",
    "sample_at_first": "samples start at the first sample.every_n_steps point here",
    "resume": "training states resume with `python -m trainer train --resume` (from the "
              "run folder's newest state)",
    "logging_dir": "logs and TensorBoard files go in the run folder (output.dir)",
    "log_with": "TensorBoard files go in the run folder", "log_prefix": "no log prefix here",
    "log_config": "the run folder keeps the config", "wandb_api_key": "no Weights & Biases here",
    "max_data_loader_n_workers": "data loading is handled by this trainer itself",
    "persistent_data_loader_workers": "data loading is handled by this trainer itself",
    "vae_batch_size": "latents are cached by this trainer itself",
    "cache_text_encoder_outputs": "the text encoder trains or is cached by this trainer itself",
    "in_json": "fine-tuning metadata files are not read here: use captions next to images",
    "metadata_file": "fine-tuning metadata files are not read here: use captions next to "
                     "images",
    "token_warmup_min": "no token warmup here", "token_warmup_step": "no token warmup here",
    "use_scalar": "no LyCORIS scalar here", "rank_dropout_scale": "rank dropout is not "
    "rescaled here", "constrain": "no LyCORIS constraint here", "rescaled": "no LyCORIS "
    "rescaling here", "train_norm": "normalization layers are not trained here",
    "bypass_mode": "this trainer always runs adapters beside the frozen weights",
    "unit": "no DyLoRA here", "preset": "this trainer's layer choice follows network.type",
    "LyCORIS_preset": "this trainer's layer choice follows network.type",
    "cache_info": "the dataset scan is not cached here", "recursive": "subfolders are always "
    "read here", "face_crop": "no face crops here",
    "output_config": "GUI/CLI option: the preset is the config here",
    "config_file": "the preset is the config here",
}  # fmt: skip

# Options of other model families, used by kohya only with that family's switch
# on (then they cannot be kept: this trainer trains SD1.5-family models).
FAMILY_SWITCHES = {"sdxl": "SDXL", "flux1_checkbox": "FLUX.1", "sd3_checkbox": "SD3"}
FAMILY_OPTIONS = {
    "sdxl": ("sdxl_cache_text_encoder_outputs", "sdxl_no_half_vae", "cache_text_encoder_outputs"),
    "flux1_checkbox": (
        "ae", "clip_l", "t5xxl", "t5xxl_max_token_length", "discrete_flow_shift",
        "guidance_scale", "timestep_sampling", "model_prediction_type", "split_mode",
        "train_blocks", "flux1_cache_text_encoder_outputs",
        "flux1_cache_text_encoder_outputs_to_disk", "apply_t5_attn_mask", "split_qkv",
        "single_blocks_to_swap", "double_blocks_to_swap", "blocks_to_swap", "mem_eff_save",
        "cpu_offload_checkpointing", "img_attn_dim", "txt_attn_dim", "train_t5xxl",
        "flux_fused_backward_pass", "blockwise_fused_optimizers"),
    "sd3_checkbox": ("clip_g", "sd3_cache_text_encoder_outputs", "sd3_text_encoder_batch_size",
                     "weighting_scheme", "logit_mean", "logit_std", "mode_scale"),
}  # fmt: skip

# Words in a name whose value must never be echoed (tokens, API keys).
SECRET_WORDS = ("token", "api_key", "key", "password", "secret")
