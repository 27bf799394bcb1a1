"""A plain diffusers + peft LoRA job, the yardstick for bench/e2e_small.py.

In the spirit of diffusers' examples/text_to_image/train_text_to_image_lora.py:
the pipeline parts are loaded from a diffusers folder, peft's LoraConfig puts
LoRA on the same U-Net layers as ours (every Linear / 1x1 conv inside a
Transformer2DModel), and each step encodes its image with the VAE and its
caption with the frozen text encoder, adds noise, predicts it, and takes an
AdamW step (weight decay 1e-2, gradient norm clipped at 1.0, constant rate,
as the example's defaults). The LoRA weights are saved as safetensors at the
end. The images go through PIL and numpy (resize, centre crop, [-1, 1]) where
the example uses torchvision, which this project does not install.

The bench runs it as `python bench/e2e_small_reference.py ...`, not under
`accelerate launch`: torch keeps its own thread default (one thread per
core), where accelerate would set OMP_NUM_THREADS=1.

    python bench/e2e_small_reference.py --model DIR/diffusers --data IMAGES \
        --out lora.safetensors --timing timing.json [--steps 50]

The timing JSON holds the wall-clock time (time.time) when the first step
ended and each step's duration, measured as the example's loop runs it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

# The Linear / 1x1-conv layers of SD's Transformer2DModel blocks: what our
# trainer's plain LoRA targets (networks/targets.py), by peft's suffix match.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="diffusers folder")
    p.add_argument("--data", type=Path, required=True, help="images with .txt captions")
    p.add_argument("--out", type=Path, required=True, help="LoRA .safetensors to write")
    p.add_argument("--timing", type=Path, required=True, help="JSON of step times to write")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=4.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args()


def load_images(folder: Path, resolution: int) -> tuple[torch.Tensor, list[str]]:
    pixels, captions = [], []
    for path in sorted(folder.glob("*.png")):
        image = Image.open(path).convert("RGB")
        scale = resolution / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)),
                             Image.BILINEAR)  # fmt: skip
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        pixels.append(torch.from_numpy(array).permute(2, 0, 1))
        captions.append(path.with_suffix(".txt").read_text().strip())
    return torch.stack(pixels), captions


def load_parts(model: Path):
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    for part in (text_encoder, vae, unet):
        part.requires_grad_(False)
    return tokenizer, text_encoder, vae, unet, scheduler


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    tokenizer, text_encoder, vae, unet, noise_scheduler = load_parts(args.model)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.alpha,
                                init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=1e-2,
                                  eps=1e-8)  # fmt: skip
    pixels, captions = load_images(args.data, args.resolution)
    ids = tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length",
                    truncation=True, return_tensors="pt").input_ids  # fmt: skip
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(pixels, ids), batch_size=args.batch, shuffle=True)
    unet.train()
    step_s: list[float] = []
    first_step_end = None
    bar = tqdm(total=args.steps, desc="steps")
    started = time.perf_counter()
    while len(step_s) < args.steps:
        for batch_pixels, batch_ids in loader:
            latents = vae.encode(batch_pixels).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps,
                                      (latents.shape[0],)).long()  # fmt: skip
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            text = text_encoder(batch_ids, return_dict=False)[0]
            prediction = unet(noisy, timesteps, text, return_dict=False)[0]
            loss = F.mse_loss(prediction.float(), noise.float(), reduction="mean")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            bar.update(1)
            bar.set_postfix(loss=loss.item())
            now = time.perf_counter()
            step_s.append(now - started)
            started = now
            if first_step_end is None:
                first_step_end = time.time()
            if len(step_s) >= args.steps:
                break
    bar.close()
    state = {k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    args.timing.write_text(json.dumps({"first_step_end": first_step_end, "step_s": step_s,
                                       "lora_tensors": len(state)}))  # fmt: skip
    save_file(state, str(args.out))


if __name__ == "__main__":
    main()
