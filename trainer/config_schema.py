"""The one training config schema: the CLI, the presets and the GUI form all read it.

Every field carries help text (the GUI shows it) and enums are Literals (the GUI
makes them dropdowns). Defaults follow what kohya_ss users expect for SD1.5.
Cross-field rules live next to their section and name keys as `section.key`,
because their messages reach users verbatim through `trainer.config_io`.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, create_model, model_validator

from networks.algorithms import ALGORITHMS, algorithms_using, all_options
from trainer.config_base import DEMO, VAE_FACTOR, Section  # noqa: F401 - DEMO re-exported
from trainer.config_dataset import DatasetConfig
from trainer.prompt_options import PromptOptionError, parse_prompt

# diffusers.optimization.get_scheduler names.
Scheduler = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
]


class ModelConfig(Section):
    path: str = Field("", description='SD1.5 checkpoint (.safetensors/.ckpt) or diffusers '
                      'folder; "demo" = the built-in tiny demo model, "demo-shapes" = the toy '
                      'that draws coloured shapes. Empty in presets.')
    v_parameterization: bool = Field(
        False, description="The model predicts v, not noise (SD2-style v-prediction fine-tunes)."
    )
    clip_skip: int = Field(1, ge=1, le=12, description="Use the text encoder's N-th layer from "
                           "the end (1 = last; 2 for anime models trained that way).")
    allow_pickle: bool = Field(False, description="Allow .ckpt/.pt pickle files, which can run "
                               "arbitrary code. Only for files you trust.")
    base_precision: Literal["auto", "fp32", "fp16", "bf16", "fp8", "nf4"] = Field(
        "auto", description="How the frozen U-Net and text encoder are stored: auto = in "
        "train.mixed_precision's dtype; fp32/bf16/fp16 = that dtype (fp16 needs "
        "train.mixed_precision = fp16); fp8 = 8-bit weights with a scale per channel, half "
        "of bf16's memory, CPU or GPU; nf4 = 4-bit (QLoRA; bitsandbytes, CUDA only). "
        "Adapters train in fp32 and the VAE stays fp32 whatever this says.")


def _probability(default: float, what: str):
    return Field(default, ge=0, lt=1, description=what)


# The torch-free algorithm registry supplies the choices and, below, one field
# per algorithm option; the GUI form is generated from both.
AlgorithmName = Literal[tuple(ALGORITHMS)]  # type: ignore[valid-type]
SHARED_OPTIONS = ("tucker", "dora", "dora_on_output")  # NetworkSpec fields of their own


class _NetworkFields(Section):
    """The [network] section; its algorithm options are added from the registry."""

    type: AlgorithmName = Field("lora", description="; ".join(
        f"{a.name}: {a.help}" for a in ALGORITHMS.values()) + ".")
    rank: int = Field(16, ge=1, le=1024, description="Rank (kohya network_dim): capacity/size.")
    alpha: float = Field(8.0, gt=0, description="The update is scaled by alpha / rank.")
    conv_rank: int = Field(8, ge=1, le=1024, description="Rank on 3x3 convs (locon/loha/lokr).")
    conv_alpha: float = Field(4.0, gt=0, description="Alpha on 3x3 convs (locon/loha/lokr).")
    dropout: float = _probability(0.0, "Neuron dropout on the adapter's hidden activations.")
    rank_dropout: float = _probability(0.0, "Drop whole rank channels per sample.")
    module_dropout: float = _probability(0.0, "Skip a whole adapter module for a step.")
    train_unet: bool = Field(True, description="Train adapters on the U-Net.")
    train_text_encoder: bool = Field(True, description="Train adapters on the text encoder.")
    resume_from: str = Field("", description="Adapter .safetensors to continue training from; "
        "its algorithm, ranks and options are used, and a [network] setting that says "
        "otherwise is refused.")

    @model_validator(mode="after")
    def _trains_something(self):
        if not (self.train_unet or self.train_text_encoder):
            raise ValueError(
                "network.train_unet and network.train_text_encoder are both false: "
                "nothing would be trained; set one of them to true"
            )
        return self

    @model_validator(mode="after")
    def _options_fit_the_type(self):
        for name, option in all_options().items():
            value, users = getattr(self, name), algorithms_using(name)
            if option.problem(value):
                raise ValueError(f"network.{name} = {_toml(value)} {option.problem(value)}")
            if value != option.default and self.type not in users:
                raise ValueError(
                    f"network.{name} = {_toml(value)} does not apply to network.type = "
                    f'"{self.type}" (only to {", ".join(users)}); remove it or change '
                    "network.type"
                )
        if self.dora_on_output and not self.dora:
            raise ValueError(
                "network.dora_on_output = true needs network.dora = true; set both, or "
                "remove network.dora_on_output"
            )
        return self

    def to_spec(self):
        """The `networks.network.NetworkSpec` this section describes (imports torch)."""
        from networks.base import Dropout
        from networks.network import NetworkSpec

        own = {n: getattr(self, n) for n in ALGORITHMS[self.type].option_names
               if n not in SHARED_OPTIONS}
        return NetworkSpec(
            algorithm=self.type, rank=self.rank, alpha=self.alpha,
            conv_rank=self.conv_rank, conv_alpha=self.conv_alpha, tucker=self.tucker,
            dora=self.dora, dora_on_output=self.dora_on_output, options=own,
            dropout=Dropout(
                neuron=self.dropout, rank=self.rank_dropout, module=self.module_dropout
            ),
            train_unet=self.train_unet, train_text_encoder=self.train_text_encoder,
        )


def _toml(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


NetworkConfig = create_model(
    "NetworkConfig",
    __base__=_NetworkFields,
    __doc__=_NetworkFields.__doc__,
    **{
        name: (option.type, Field(option.default, description=f"{option.help} "
               f"({', '.join(algorithms_using(name))})"))
        for name, option in all_options().items()
    },
)


class TrainingConfig(Section):
    """The [train] section."""

    steps: int = Field(1600, ge=0, description="Optimizer steps; 0: train for train.epochs.")
    epochs: int = Field(0, ge=0, description="Passes over the dataset (with train.steps = 0).")
    batch_size: int = Field(1, ge=1, description="Images per step.")
    grad_accum: int = Field(1, ge=1, description="Batches accumulated per optimizer step.")
    unet_lr: float = Field(1e-4, ge=0, description="U-Net learning rate (1.0 for prodigy).")
    text_encoder_lr: float = Field(5e-5, ge=0, description="Text encoder learning rate.")
    optimizer: Literal["adamw", "adamw8bit", "prodigy", "lion", "sgd"] = Field("adamw",
        description="adamw8bit saves memory (needs bitsandbytes); prodigy adapts its own lr.")
    weight_decay: float = Field(0.01, ge=0, description="Decoupled weight decay.")
    scheduler: Scheduler = Field("constant_with_warmup", description="Learning-rate schedule.")
    warmup_steps: int = Field(0, ge=0, description="Steps of linear learning-rate warmup.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="Half-precision "
        "compute (adapter weights stay fp32); bf16 needs an RTX 30xx/A100 or newer.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the "
                                         "backward pass: less memory, slower steps.")
    attention: Literal["sdpa", "xformers"] = Field("sdpa", description="Attention kernel.")
    oom_retry: bool = Field(False, description="On out of memory, save the state and retry by "
        "itself with less memory: gradient checkpointing, then half the batch with twice the "
        "accumulation (same effective batch), then an fp8 base; one-process runs only. Off: "
        "save the state and stop with advice.")
    compile: bool = Field(False, description="torch.compile the U-Net with its adapters: "
                          "faster steps after a slow first step per bucket size (minutes on "
                          "a CPU; cached for later runs). Off: no compile wait.")
    seed: int = Field(42, ge=0, description="Random seed for noise, shuffling and init.")
    noise_offset: float = Field(0.0, ge=0, le=1, description="Offset noise (e.g. 0.05-0.1) "
                                "for darker/brighter images.")
    min_snr_gamma: float = Field(0.0, ge=0, description="Min-SNR loss weighting (Hang et al. "
                                 "2023); 5.0 is the paper's value; 0 = off.")
    prior_loss_weight: float = Field(1.0, ge=0, description="Loss weight of the "
        "regularization images (dataset.reg_path) against the training images' 1.0 (kohya "
        "prior_loss_weight).")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 = off.")
    save_state_every_n_steps: int = Field(0, ge=0, description="Save a resumable training "
        "state every N steps; 0 = when output.save_every_n_steps saves.")
    validate_every_n_steps: int = Field(0, ge=0, description="Validation loss every N steps "
        "and at the end (needs dataset.validation_split or dataset.validation_path); 0: at "
        "the end only, when there is a validation set.")

    @model_validator(mode="before")
    @classmethod
    def _epochs_replace_default_steps(cls, data):
        # As in kohya: giving epochs replaces the default step count.
        if isinstance(data, dict) and "steps" not in data:
            epochs = data.get("epochs")
            if isinstance(epochs, int) and epochs > 0:
                data = {**data, "steps": 0}
        return data

    @model_validator(mode="after")
    def _one_length(self) -> TrainingConfig:
        if (self.steps > 0) == (self.epochs > 0):
            raise ValueError(
                f"train.steps = {self.steps} and train.epochs = {self.epochs}: set exactly one "
                "of them above 0 (the other to 0)"
            )
        return self


class SampleConfig(Section):
    prompts: list[str] = Field([], description="Prompts rendered at each sampling point; "
                               "kohya options after the text override the settings below for "
                               "that prompt: --n negative, --w/--h size, --s steps, "
                               "--l guidance, --d seed (e.g. 'a cat --w 512 --d 42').")
    negative_prompt: str = Field("", description="Negative prompt for every sample.")
    every_n_steps: int = Field(0, ge=0, description="Render samples every N steps; 0 = off.")
    steps: int = Field(20, ge=1, le=1000, description="Denoising steps per sample.")
    guidance: float = Field(7.0, ge=0, description="Classifier-free guidance scale (1 = off).")
    sampler: Literal["euler_a", "ddim"] = Field("euler_a", description="Sampler.")
    seed: int = Field(1234, ge=0, description="Seed, the same at every sampling point.")
    width: int = Field(0, ge=0, le=4096, multiple_of=VAE_FACTOR, description="Pixels; 0 = "
                       "dataset.resolution.")
    height: int = Field(0, ge=0, le=4096, multiple_of=VAE_FACTOR, description="Pixels; 0 = "
                        "dataset.resolution.")
    lcm_lora: str = Field("", description="LCM-LoRA .safetensors to sample with in few steps.")
    preview_decoder: str = Field("", description="Folder of TAESD (madebyollin/taesd, diffusers "
                                 "AutoencoderTiny) to decode previews several times faster, a "
                                 "little softer; empty = the model's VAE.")
    compare: bool = Field(False, description="Also render the prompts without the adapter "
                          "(once per run) and keep samples/compare.png: a row per sampling "
                          "point, each prompt with and without the adapter side by side.")

    @model_validator(mode="after")
    def _prompt_options(self) -> SampleConfig:
        for index, prompt in enumerate(self.prompts):
            try:
                parse_prompt(prompt)
            except PromptOptionError as exc:
                raise ValueError(f'sample.prompts[{index}] "{prompt}": {exc.reason}') from None
        return self

    @model_validator(mode="after")
    def _prompts_when_sampling(self) -> SampleConfig:
        if self.every_n_steps and not self.prompts:
            raise ValueError(
                f"sample.every_n_steps = {self.every_n_steps} but sample.prompts is empty; "
                "add a prompt or set sample.every_n_steps = 0"
            )
        return self


_SAFE_NAME = re.compile(r"[\w+-][\w.+-]*")


class OutputConfig(Section):
    dir: str = Field("outputs/{name}", description="Folder; {name} becomes output.name.")
    name: str = Field("my-lora", max_length=120, description="Adapter file name (no extension).")
    save_every_n_steps: int = Field(0, ge=0, description="Also save every N steps; 0 = at the "
                                    "end only.")
    save_precision: Literal["fp16", "bf16", "fp32"] = Field("fp16", description="Saved weights.")
    title: str = Field("", description="Metadata: title (ss_ / modelspec fields).")
    author: str = Field("", description="Metadata: author.")
    description: str = Field("", description="Metadata: description.")
    trigger_words: str = Field("", description="Metadata: words that activate the adapter.")
    keep_last_n: int = Field(0, ge=0, description="Keep the last N periodic saves; 0 = all.")

    @model_validator(mode="after")
    def _safe_name(self) -> OutputConfig:
        if not _SAFE_NAME.fullmatch(self.name) or self.name.endswith("."):
            raise ValueError(
                f'output.name = "{self.name}" is not a safe file name: use letters, digits, '
                "'-', '_', '+' and '.' (no spaces or slashes, not ending in '.')"
            )
        return self


class LCMConfig(Section):
    """Latent Consistency distillation (Luo et al. 2023), used when task = "lcm_distill"."""

    w_min: float = Field(5.0, ge=0, description="Smallest guidance scale sampled.")
    w_max: float = Field(15.0, ge=0, description="Largest guidance scale sampled.")
    num_ddim_timesteps: int = Field(50, ge=1, le=1000, description="DDIM solver steps.")
    loss: Literal["huber", "l2"] = Field("huber", description="Consistency distance.")
    huber_c: float = Field(0.001, gt=0, description="Pseudo-Huber loss constant c.")
    target_ema: float = Field(0.0, ge=0, lt=1, description="EMA decay of the target network "
        "(LCM's Algorithm 1; e.g. 0.95-0.99); 0 = the student is its own target (LCM-LoRA).")

    @model_validator(mode="after")
    def _w_order(self) -> LCMConfig:
        if self.w_min > self.w_max:
            raise ValueError(f"lcm.w_min ({self.w_min}) is above lcm.w_max ({self.w_max})")
        return self


class TrainConfig(Section):
    task: Literal["train", "lcm_distill"] = Field("train", description="train: an adapter on "
                                                  "images; lcm_distill: an LCM-LoRA.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    dataset: DatasetConfig = Field(default_factory=DatasetConfig, description="The images.")
    network: NetworkConfig = Field(default_factory=NetworkConfig, description="The adapter.")
    train: TrainingConfig = Field(default_factory=TrainingConfig, description="The training.")
    sample: SampleConfig = Field(default_factory=SampleConfig, description="Preview images.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="What is saved.")
    lcm: LCMConfig = Field(default_factory=LCMConfig, description="LCM distillation.")

    @model_validator(mode="after")
    def _validation_needs_a_set(self) -> TrainConfig:
        has_set = bool(self.dataset.validation_split or self.dataset.validation_path)
        if self.train.validate_every_n_steps and not has_set:
            raise ValueError(
                f"train.validate_every_n_steps = {self.train.validate_every_n_steps} has no "
                "validation images: set dataset.validation_split (e.g. 0.1) or "
                "dataset.validation_path, or set train.validate_every_n_steps = 0")
        if has_set and self.task == "lcm_distill":
            raise ValueError(
                'the validation loss is the denoising loss of task = "train"; for task = '
                '"lcm_distill" set dataset.validation_split = 0 and dataset.validation_path = ""')
        return self


SECTIONS: dict[str, type[Section]] = {
    name: field.annotation
    for name, field in TrainConfig.model_fields.items()
    if isinstance(field.annotation, type) and issubclass(field.annotation, Section)
}
# Fields holding file or folder paths (resolved against the TOML file's folder).
PATH_KEYS = ("model.path", "dataset.path", "output.dir", "sample.lcm_lora", "network.resume_from",
             "sample.preview_decoder", "dataset.mask_path", "dataset.validation_path",
             "dataset.reg_path")  # fmt: skip
