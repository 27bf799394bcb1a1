"""Extracting a rank-32 LoRA from two SD1.5-size checkpoints: wall time and
peak RSS of the user's command, `python -m trainer extract`, on the CPU.

Two random-weight SD1.5-architecture single files (fp16, 2.1 GB each, like
the published pruned SD1.5 file) are built once in the work folder by a
child process: the base from the shipped configs (`trainer.sd15_config`),
the tuned one the base plus, on every layer a LoCon adapts, a rank-32 change
of 1% of the layer's weight scale and full-rank noise of 0.1% (so the
errors reported are not zero). The command then runs as a child of its own;
its wall time, the time until both models are loaded (its second progress
line), its CPU time and peak RSS (`ru_utime + ru_stime`, `ru_maxrss` of that
child, from `os.wait4`) and the load average around it are reported.
`--min-diff 0`: the text encoder is extracted too (264 modules).

    nice -n 10 python -m bench.extract_lora [--work DIR] [--conv-rank 32] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RANK = 32


def _write(parts, path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from trainer.ldm_keys import text_encoder_to_ldm, unet_to_ldm, vae_to_ldm

    unet = parts.unet
    state = unet_to_ldm(unet.state_dict(), unet.config.layers_per_block)
    state |= vae_to_ldm(parts.vae.state_dict())
    state |= text_encoder_to_ldm(parts.text_encoder.state_dict())
    half = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v).contiguous()
            for k, v in state.items()}
    save_file(half, str(path), metadata={"format": "pt"})


def build(folder: Path) -> None:
    """base.safetensors and tuned.safetensors in `folder` (a child's job: ~7 GB)."""
    import torch

    from networks.targets import text_encoder_targets, unet_targets
    from trainer.sd15_config import build_sd15_from_config

    folder.mkdir(parents=True, exist_ok=True)
    parts = build_sd15_from_config(with_vae=True, seed=0)
    _write(parts, folder / "base.safetensors")
    generator = torch.Generator().manual_seed(1)
    targets = [*unet_targets(parts.unet, conv=True), *text_encoder_targets(parts.text_encoder)]
    with torch.no_grad():
        for target in targets:
            weight = target.layer.weight
            flat = weight.reshape(weight.shape[0], -1)
            scale = float(flat.std())
            up = torch.randn(flat.shape[0], RANK, generator=generator)
            down = torch.randn(RANK, flat.shape[1], generator=generator) / RANK**0.5
            noise = torch.randn(flat.shape, generator=generator)
            flat += 0.01 * scale * (up @ down) + 0.001 * scale * noise
    _write(parts, folder / "tuned.safetensors")


def measure(work: Path, conv_rank: int | None, threads: int | None) -> dict:
    out = work / f"extracted-r{RANK}{f'-c{conv_rank}' if conv_rank else ''}.safetensors"
    command = [sys.executable, "-m", "trainer", "extract", "--base", str(work / "base.safetensors"),
               "--tuned", str(work / "tuned.safetensors"), "--rank", str(RANK), "--min-diff", "0",
               "--out", str(out), "--json"]
    if conv_rank:
        command += ["--conv-rank", str(conv_rank)]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    loaded_at = None
    for line in child.stderr:
        if loaded_at is None and line.startswith("progress: 2/2 loaded tuned"):
            loaded_at = time.perf_counter() - started
    stdout = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"extract failed: {stdout[-2000:]}")
    report = json.loads(stdout.strip().splitlines()[-2])
    errors = [m["relative_error"] for m in report["modules"]]
    return {
        "rank": RANK, "conv_rank": conv_rank, "modules": len(errors),
        "wall_s": round(wall, 1), "load_s": round(loaded_at or 0.0, 1),
        "svd_and_save_s": round(wall - (loaded_at or 0.0), 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
        "mean_relative_error": round(sum(errors) / len(errors), 4),
        "file_mb": round(out.stat().st_size / 2**20, 1),
        "threads": threads or "default",
        # what else ran: the machine is shared, so wall time is not CPU time
        "load_avg_1min_before_after": [round(load_before, 1), round(os.getloadavg()[0], 1)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-extract"))
    parser.add_argument("--conv-rank", type=int, help="also extract the 3x3 convs (LoCon)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the command")
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build(args.work)
        return
    if not (args.work / "tuned.safetensors").is_file():
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bench.extract_lora", "--build", "--work",
                        str(args.work)], cwd=REPO, check=True)
        print(f"built the two checkpoints in {time.perf_counter() - started:.0f} s", flush=True)
    print(json.dumps(measure(args.work, args.conv_rank, args.threads)), flush=True)


if __name__ == "__main__":
    main()
