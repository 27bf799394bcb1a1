"""What `train.compile` costs and gains on this machine, on the demo model:
the training step (forward, backward, AdamW) eager against compiled, and the
compile time of a bucket shape with a cold and with a warm compile cache.

Each measurement runs in a fresh process (a cache warm in memory would hide
the cost a new run pays): the first process compiles into an empty cache
folder, the second into the one the first filled. Eager and compiled steps
alternate in one process, on one U-Net with one LoRA, so their ratio is
measured side by side.

    python -m bench.compile_cost [--backend inductor] [--steps 20] [--shapes 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = [(8, 8), (16, 4), (4, 16)]  # latent sizes of 64x64, 128x32 and 32x128 buckets


def child(args) -> dict:
    import torch

    from networks.network import AdapterNetwork, NetworkSpec
    from trainer.compile import compile_unet
    from trainer.demo_assets import ensure_demo_model
    from trainer.model_loading import load_sd_model
    from trainer.optim import build_optimizer

    sd = load_sd_model(ensure_demo_model())
    network = AdapterNetwork.create(NetworkSpec(rank=16, alpha=8, train_text_encoder=False),
                                    sd.unet, None).attach()
    sd.unet.requires_grad_(False)
    network.train()
    sd.unet.train()
    optimizer = build_optimizer("adamw", network.parameter_groups(1e-4, 0), 0.01)
    compiled = compile_unet(sd.unet, network, backend=args.backend)
    text = torch.randn(1, 77, sd.unet.config.cross_attention_dim)

    def step(unet, shape) -> float:
        start = time.perf_counter()
        latents = torch.randn(1, 4, *shape)
        loss = unet(latents, torch.tensor([500]), text).sample.square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    compile_s = [step(compiled, shape) for shape in SHAPES[: args.shapes]]
    eager, fast = [], []
    for _ in range(args.steps):
        eager.append(step(sd.unet, SHAPES[0]))
        fast.append(step(compiled, SHAPES[0]))
    return {"first_step_s": compile_s, "eager_ms": statistics.median(eager) * 1000,
            "compiled_ms": statistics.median(fast) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--shapes", type=int, default=2, choices=range(1, len(SHAPES) + 1))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    import torch

    results = {"backend": args.backend, "threads": torch.get_num_threads(), "runs": []}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for label in ("cold cache", "warm cache"):
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "bench.compile_cost", "--child", "--backend",
                 args.backend, "--steps", str(args.steps), "--shapes", str(args.shapes)],
                env=env, capture_output=True, text=True, check=True)  # fmt: skip
            run = json.loads(done.stdout.strip().splitlines()[-1])
            run.update(label=label, process_s=time.perf_counter() - started)
            results["runs"].append(run)
            first = ", ".join(f"{s:.1f}" for s in run["first_step_s"])
            ratio = run["compiled_ms"] / run["eager_ms"]
            print(f"{label}: first step per shape {first} s; step eager {run['eager_ms']:.1f} ms"
                  f", compiled {run['compiled_ms']:.1f} ms ({ratio:.2f}x); "
                  f"process {run['process_s']:.0f} s")
    out = Path(__file__).parent / "results" / "compile_cost.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
