"""The toy demo model: a tiny SD1.5-shaped model that draws coloured shapes
from their names ("a red circle"), and the concept its demo teaches.

`model.path = "demo-shapes"` is this model; `dataset.path = "demo-mychar"` is
eight yellow stars captioned "mychar", a colour and a shape the toy never saw
(`trainer/demo_toy_data.py`). `presets/demo-learns.toml` trains one on the
other in about two minutes on a CPU, and its previews turn from the base's
drawing into yellow stars. (`"demo"` is a different, random-weight model for
tests: `trainer/demo_model.py`.)

The weights are `assets/demo-shapes-v1.safetensors` (fp16, about 3 MB),
written by `python -m trainer.demo_toy_pretrain` (seeded): every weight as
`unet.`, `vae.` or `text_encoder.` + its diffusers / transformers name, but
the text encoder's token embedding: that 49408 x 32 table stays random (3 MB
more in fp16), rebuilt from the seed by `token_embedding` (torch's seeded CPU
generator) and checked against the hash the asset keeps.
`ensure_toy_model` turns the asset into a diffusers folder in the cache on
first use (seconds).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from core.errors import UserError
from core.paths import cache_root

TOY_MODEL_KEYWORD = "demo-shapes"
TOY_DATASET_KEYWORD = "demo-mychar"
ASSET = Path(__file__).resolve().parent / "assets" / "demo-shapes-v1.safetensors"
# SD1.5's configs at the smallest width, except for the norms: GroupNorm(32)
# over 32 channels normalises each channel alone, which erases how strong a
# channel is, and with it the colour (a VAE trained with 32 groups decoded
# every picture in grey). Groups of four channels keep their ratios. The layout and every
# weight shape stay SD1.5's, but a single-file copy would load with 32 groups:
# the toy is used as the diffusers folder `ensure_toy_model` writes.
TOY_UNET = {"block_out_channels": [32, 32, 32, 32], "cross_attention_dim": 32,
            "norm_num_groups": 8}
TOY_VAE = {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 8}
PARTS = ("unet", "vae", "text_encoder")
TOKEN_KEY = "text_encoder.embeddings.token_embedding.weight"
_TOKEN_STD = 0.02  # CLIP's own initialisation


def toy_model_dir() -> Path:
    """Named after the asset's bytes: a rebuilt asset never meets an old folder."""
    digest = hashlib.sha256(ASSET.read_bytes()).hexdigest()[:12] if ASSET.is_file() else "none"
    return cache_root() / f"demo-shapes-{digest}"


def token_embedding(seed: int):
    """The text encoder's token table: seeded normal values (CLIP's init scale)."""
    import torch

    from trainer.demo_model import DEMO_TEXT
    from trainer.sd15_config import load_sd15_config

    vocab = load_sd15_config("text_encoder")["vocab_size"]
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((vocab, DEMO_TEXT["hidden_size"]), generator=generator) * _TOKEN_STD


def embedding_hash(table) -> str:
    return hashlib.sha256(table.float().contiguous().numpy().tobytes()).hexdigest()


def build_toy_components(seed: int = 0) -> dict:
    """Untrained components: seeded weights, the token table of `token_embedding`."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainer.demo_model import DEMO_TEXT
    from trainer.sd15_config import load_sd15_config
    from trainer.tokenizer import load_offline_tokenizer

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config({**load_sd15_config("unet"), **TOY_UNET})
        vae = AutoencoderKL.from_config({**load_sd15_config("vae"), **TOY_VAE})
        text_encoder = CLIPTextModel(
            CLIPTextConfig(**{**load_sd15_config("text_encoder"), **DEMO_TEXT}))
    finally:
        torch.random.set_rng_state(state)
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight.copy_(token_embedding(seed))
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(),
            "tokenizer": load_offline_tokenizer(),
            "scheduler": PNDMScheduler.from_config(load_sd15_config("scheduler"))}


def _flat_text_key(key: str) -> str:
    # transformers >= 5.6 flattened CLIPTextModel; older ones nest it in text_model.
    return key.removeprefix("text_model.")


def save_asset(components: dict, path: Path, seed: int, steps: dict) -> int:
    """Write the asset (fp16, `part.key` names, no token table); returns its size."""
    import torch
    from safetensors.torch import save

    from core.atomic import atomic_write_bytes

    state = {}
    for part in PARTS:
        for key, value in components[part].state_dict().items():
            name = f"{part}.{_flat_text_key(key) if part == 'text_encoder' else key}"
            if value.is_floating_point():  # not CLIP's position_ids buffer
                state[name] = value.detach().to(torch.float16).contiguous().clone()
    table = state.pop(TOKEN_KEY)
    metadata = {"format": "pt", "demo_toy": "v1", "seed": str(seed),
                "token_embedding_sha256": embedding_hash(token_embedding(seed)),
                **{k: str(v) for k, v in steps.items()}}
    if not torch.equal(table, token_embedding(seed).half()):  # it is rebuilt, not stored
        raise ValueError("the text encoder's token table is not the seeded one")
    payload = save(state, metadata=metadata)
    atomic_write_bytes(path, payload)
    return len(payload)


def load_asset(path: Path = ASSET) -> dict:
    """The trained components from the asset, the token table rebuilt."""
    from safetensors import safe_open

    if not path.is_file():
        raise UserError(f"the toy demo model's weights {path} are missing; rebuild them with "
                        f"`python -m trainer.demo_toy_pretrain {path}` (about 30 minutes on a "
                        "CPU).")
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
        state = {key: file.get_tensor(key).float() for key in file.keys()}
    seed = int(metadata.get("seed", "0"))
    table = token_embedding(seed)
    if embedding_hash(table) != metadata.get("token_embedding_sha256"):
        raise UserError(f"this torch rebuilds a different text-encoder token table than the one "
                        f"{path.name} was trained with; rebuild the asset with "
                        f"`python -m trainer.demo_toy_pretrain {path}`.")
    state[TOKEN_KEY] = table
    components = build_toy_components(seed)
    for part in PARTS:
        model = components[part]
        nested = part == "text_encoder" and hasattr(model, "text_model")
        own = {("text_model." if nested else "") + key[len(part) + 1:]: value
               for key, value in state.items() if key.startswith(f"{part}.")}
        missing, unexpected = model.load_state_dict(own, strict=False)
        buffers = dict(model.named_buffers())
        # Only integer buffers (CLIP's position ids) are not in the asset.
        left = [k for k in missing if k not in buffers or buffers[k].is_floating_point()]
        if unexpected or left:
            raise UserError(f"{path} does not fit the toy's layout ({part}: missing "
                            f"{left[:3]}, unexpected {unexpected[:3]}); rebuild it with "
                            f"`python -m trainer.demo_toy_pretrain {path}`.")
    return components


def _build_into(folder: Path, build) -> None:
    """`build(staging)`, then rename it to `folder`: never a half-made folder."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    staging.chmod(0o755)
    try:
        build(staging)
        staging.rename(folder)
    except OSError:  # another process made it first
        if not folder.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_diffusers_folder(components: dict, folder: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from trainer.tokenizer import write_tokenizer_files

    pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    write_tokenizer_files(folder / "tokenizer")


def ensure_toy_model() -> Path:
    """The toy model's diffusers folder, built from the asset on first use."""
    folder = toy_model_dir() / "diffusers"
    if not (folder / "model_index.json").is_file():
        components = load_asset()
        _build_into(folder, lambda staging: write_diffusers_folder(components, staging))
    return folder


def ensure_concept_dataset() -> Path:
    """The concept's images (`demo_toy_data.write_concept_dataset`)."""
    from trainer.demo_toy_data import write_concept_dataset

    root = cache_root() / "demo-mychar-v1"
    if not root.is_dir():
        _build_into(root, write_concept_dataset)
    return root
