"""`python -m trainer estimate`: the expected peak memory of a run, before it starts.

The parts that hold memory for the whole run (weights by precision, the
adapter, its gradients and optimizer state, caches) are counted from the
models built on the meta device; the step's activations are measured by
construction there (trainer/estimate_activations.py). On a CPU the process
also keeps memory it freed (glibc's heap) and has fixed costs (thread pools,
oneDNN, the data pipeline): two constants below, measured on this project's
demo runs (bench/memory_estimate.py), which the estimate adds. On CUDA the
allowances are the CUDA context and the caching allocator's slack.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

MIB = 2**20
# CPU: what the measured peak RSS above the idle process (torch and the
# libraries imported) holds besides the tensors, from bench/memory_estimate.py
# on the demo model (2-core CPU, glibc malloc), fitted on two runs: the demo
# at 64 px batch 1 (124 MB measured, its tensors ~50 MB) and at 256 px batch 4
# (492 MB):
# - a fixed part: OpenMP/oneDNN pools and scratch, tokenizer, Pillow, the
#   data pipeline;
# - glibc keeps the step's freed temporaries in its heap for reuse, about one
#   more step's worth (with MALLOC_MMAP_THRESHOLD_ fixed, which returns freed
#   blocks to the system, the 256 px run peaks at 328 MB instead of 511 MB).
#   Gradient checkpointing fragments more (its recomputation): such runs
#   measure up to ~25% above the estimate.
CPU_FIXED_BYTES = 72 * MIB
CPU_HEAP_RETENTION = 1.0
# CUDA (not measured here: no GPU): the run's own context and cuBLAS
# workspace, and the caching allocator's rounding and fragmentation.
CUDA_CONTEXT_BYTES = 500 * MIB
CUDA_ALLOCATOR_SLACK = 0.10
# Optimizer state bytes per adapter parameter (fp32 states); adamw8bit keeps
# 8-bit states for tensors of at least 4096 elements (bitsandbytes'
# min_8bit_size) and fp32 ones below.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16, "lion": 4, "sgd": 0}
BNB_MIN_8BIT_SIZE = 4096


@dataclass(frozen=True)
class Part:
    name: str
    bytes: int
    counted: bool = True  # False: shown, but not at the same time as the peak
    note: str = ""


@dataclass
class Estimate:
    device: str  # "cpu" or "cuda"
    parts: list[Part]
    process_bytes: int  # CPU: the idle process (libraries loaded); 0 on CUDA
    available_bytes: int | None
    total_memory_bytes: int | None
    source: str
    advice: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def run_bytes(self) -> int:
        """The run's peak above the idle process."""
        return sum(p.bytes for p in self.parts if p.counted)

    @property
    def total_bytes(self) -> int:
        return self.run_bytes + self.process_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.available_bytes is None else self.total_bytes <= self.available_bytes

    def to_json(self) -> dict:
        return {"device": self.device, "parts": [asdict(p) for p in self.parts],
                "run_bytes": self.run_bytes, "process_bytes": self.process_bytes,
                "total_bytes": self.total_bytes, "available_bytes": self.available_bytes,
                "total_memory_bytes": self.total_memory_bytes, "fits": self.fits,
                "source": self.source, "advice": self.advice, "notes": self.notes}


def estimate(config, device: str | None = None, with_advice: bool = True) -> Estimate:
    """The run's memory on `device` ("cpu"/"cuda"; default: where the run would train)."""
    from trainer.estimate_models import model_configs

    configs = model_configs(config)  # a missing model is said before torch loads
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = _estimate(config, configs, device)
    result.available_bytes, result.total_memory_bytes = available_memory(device)
    if result.available_bytes is not None:
        # This process (as big as the trainer's idle one) ends before training starts.
        result.available_bytes += result.process_bytes
    if with_advice and result.fits is False:
        from trainer.estimate_advice import advice

        # The same process size for every variant: only the run changes.
        result.advice = advice(config, result, lambda c: _estimate(
            c, configs, device).run_bytes + result.process_bytes)
    return result


def _estimate(config, configs, device: str) -> Estimate:
    from trainer.estimate_activations import (
        StepShape,
        attach_meta_network,
        build_meta_models,
        measure_step,
    )
    from trainer.estimate_models import DTYPE_BYTES, largest_layer_bytes, weight_bytes

    train, precision = config.train, config.model.base_precision
    compute = compute_dtype(precision, train.mixed_precision)
    unet, text_encoder, vae = build_meta_models(configs.unet, configs.text_encoder, configs.vae)
    storage = precision if precision != "auto" else compute
    parts = [Part(f"U-Net weights ({storage})", weight_bytes(unet, precision, compute)),
             Part(f"text encoder weights ({storage})",
                  weight_bytes(text_encoder, precision, compute)),
             Part("VAE weights (fp32)", weight_bytes(vae, "fp32", compute))]
    spec = config.network.to_spec()
    network = attach_meta_network(spec, unet, text_encoder, torch_dtype(compute))
    sizes = [p.numel() for p in network.parameters()]
    trained_te = bool(network.text_encoder_adapters)
    parts += [Part(f"adapter weights (fp32, {sum(sizes):,} parameters)", 4 * sum(sizes)),
              Part("adapter gradients (fp32)", 4 * sum(sizes)),
              Part(f"optimizer state ({train.optimizer})", optimizer_state_bytes(
                  train.optimizer, sizes))]
    side = config.dataset.resolution  # buckets keep the area at most resolution^2
    shape = StepShape(train.batch_size, side, side, torch_dtype(compute),
                      train.gradient_checkpointing, trained_te, config.model.clip_skip)
    uncached = config.dataset.cache_latents == "off"
    step = measure_step(unet, text_encoder, vae, shape, encode_pixels=uncached)
    # The trace's adapter gradients (in the compute dtype there) are a part of their own;
    # a quantized base adds one layer's upcast weight at a time.
    activations = (step.step_peak - sum(sizes) * DTYPE_BYTES[compute]
                   + largest_layer_bytes(unet, precision, compute))
    checkpointing = "on" if train.gradient_checkpointing else "off"
    if trained_te:
        parts.append(Part("text encoder activations (trained)", step.text_encoder))
    parts.append(Part(f"U-Net step: activations and temporaries, batch {train.batch_size} at "
                      f"{side}x{side} px, gradient checkpointing {checkpointing}",
                      max(activations - step.text_encoder, 0)))
    if uncached:
        larger = step.vae_encode > step.step_peak
        parts.append(Part("VAE encoding each batch (dataset.cache_latents = off)",
                          max(step.vae_encode - step.step_peak, 0) if larger else step.vae_encode,
                          counted=larger,
                          note="before the step; only its excess over the step counts"))
    caches = cache_parts(config, trained_te, configs.text_encoder, DTYPE_BYTES[compute])
    if device != "cpu":  # both caches are kept in host memory
        caches = [Part(p.name, p.bytes, counted=False, note="in RAM, not on the GPU")
                  for p in caches]
    parts += caches
    transient = step.step_peak + step.vae_encode
    parts.append(_allowance(device, transient, sum(p.bytes for p in parts if p.counted)))
    return Estimate(device, parts, _process_bytes(device), None, None, configs.source,
                    notes=_notes(config, device, compute))


def _notes(config, device: str, compute: str) -> list[str]:
    notes = []
    if compute != "fp32":
        notes.append(f"Activations are traced in {compute}; the few ops autocast keeps in "
                     "fp32 (norms, softmax) are counted at that size.")
    if config.network.resume_from:
        notes.append("The adapter's size follows the [network] settings, not the "
                     "network.resume_from file.")
    if device == "cuda":
        notes.append("The CUDA context and allocator allowances are not measured yet.")
    return notes


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def compute_dtype(base_precision: str, mixed_precision: str) -> str:
    """The dtype the step computes in: a half-precision base as stored, else
    train.mixed_precision's (autocast), fp32 without it."""
    if base_precision in ("fp16", "bf16"):
        return base_precision
    return {"no": "fp32"}.get(mixed_precision, mixed_precision)


def optimizer_state_bytes(name: str, sizes: list[int]) -> int:
    if name == "adamw8bit":
        return sum(2 * n if n >= BNB_MIN_8BIT_SIZE else 8 * n for n in sizes)
    return OPTIMIZER_STATE_BYTES[name] * sum(sizes)


def cache_parts(config, trained_te: bool, text_config: dict, compute_bytes: int) -> list[Part]:
    """The in-memory latent and caption-embedding caches, from the number of images."""
    images = count_images(config)
    if not images:
        return []
    side, parts = config.dataset.resolution, []
    if config.dataset.cache_latents == "memory":
        copies = 2 if config.dataset.flip else 1  # a flipped latent is cached too
        per_image = copies * 4 * (side // 8) ** 2 * 4
        parts.append(Part(f"latent cache in memory ({images} images)", images * per_image))
    d = config.dataset
    random_captions = d.shuffle_captions or d.caption_dropout or d.tag_dropout
    if not trained_te and not random_captions:
        per_caption = 77 * text_config["hidden_size"] * compute_bytes
        parts.append(Part(f"text embedding cache ({images} captions)", images * per_caption))
    return parts


def count_images(config) -> int:
    """Image files under dataset.path by extension (no decoding: fast on big folders)."""
    import os

    from datasets_tools.formats import SUPPORTED_EXTENSIONS
    from trainer.demo_assets import builtin_dataset

    if builtin := builtin_dataset(config.dataset.path):
        root = builtin
    elif config.dataset.path and Path(config.dataset.path).is_dir():
        root = Path(config.dataset.path)
    else:
        return 0
    return sum(1 for _, _, files in os.walk(root) for f in files
               if Path(f).suffix.lower() in SUPPORTED_EXTENSIONS)


def _allowance(device: str, transient: int, tensors: int) -> Part:
    """`transient`: the bytes a step allocates and frees (VAE encoding included)."""
    if device == "cpu":
        return Part("CPU process overhead: freed heap kept by the allocator, thread pools, "
                    "data pipeline", CPU_FIXED_BYTES + int(CPU_HEAP_RETENTION * transient))
    return Part("CUDA context and allocator slack", CUDA_CONTEXT_BYTES +
                int(CUDA_ALLOCATOR_SLACK * tensors))


def _process_bytes(device: str) -> int:
    """CPU: this process's resident memory now (Python, torch, the libraries):
    what the training process also holds before its model loads."""
    if device != "cpu":
        return 0
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def available_memory(device: str) -> tuple[int | None, int | None]:
    """(available, total) bytes: system RAM on a CPU, the GPU's free memory on CUDA."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():  # an estimate for another machine's GPU
            return None, None
        free, total = torch.cuda.mem_get_info()
        return free, total
    try:
        import psutil

        memory = psutil.virtual_memory()
        return memory.available, memory.total
    except ImportError:
        pass
    try:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024
                for line in Path("/proc/meminfo").read_text().splitlines() if line.strip()}
        return info.get("MemAvailable"), info.get("MemTotal")
    except OSError:
        return None, None


def format_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / MIB:.0f} MiB" if n >= MIB else f"{math.ceil(n / 1024)} KiB"


def to_text(result: Estimate) -> str:
    width = max(len(p.name) for p in result.parts) + 2
    lines = [f"Memory estimate on {result.device} for {result.source}:", ""]
    for part in result.parts:
        mark = "" if part.counted else f"   (not added: {part.note})"
        lines.append(f"  {part.name:<{width}}{format_bytes(part.bytes):>11}{mark}")
    lines.append(f"  {'the run, at its peak':<{width}}{format_bytes(result.run_bytes):>11}")
    if result.process_bytes:
        lines.append(f"  {'the process itself (Python, torch, libraries)':<{width}}"
                     f"{format_bytes(result.process_bytes):>11}")
    lines += [f"  {'total':<{width}}{format_bytes(result.total_bytes):>11}", "",
              f"available: {format_bytes(result.available_bytes)} of "
              f"{format_bytes(result.total_memory_bytes)}"
              + {True: ": fits.", False: ": does NOT fit.", None: "."}[result.fits]]
    if result.advice:
        lines += ["", result.advice]
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)
