"""Resizing an SD1.5-size rank-128 LoCon to rank 32: wall time, CPU time and
peak RSS of the user's command, `python -m networks resize`, on the CPU.

The input is written once in the work folder, on every layer kohya's LoCon
adapts on SD1.5 (the layer shapes from the shipped configs on the meta device,
`trainer.sd15_config`): 350 modules, 264 on the attention and text-encoder
layers and 86 on the ResNet and resampler layers, 50 of them 3x3 convs. Rank
128 / alpha 64 on Linear and 1x1 layers and conv rank 64 / alpha 32 on the
3x3 convs, a common kohya LoCon setting (`network_dim=128`, `conv_dim=64`),
saved in fp16 as kohya saves. The factors are random with rank channels
falling off (0.97^i), so that rank 32 keeps a fraction below 1. The command
runs as a child of its own; its wall time, CPU time (user + system: on a
shared machine the steadier number) and peak RSS (`ru_maxrss`, from
`os.wait4`) are reported, with the mean and minimum kept Frobenius fraction.
`--algo loha` writes a rank-16 LoHa instead (resized through its rank-256
face-split factors, still without a full-size delta).

    nice -n 10 python -m bench.resize_lora [--work DIR] [--rank 32] [--algo loha] [--threads N]
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
SPECS = {  # (rank, alpha, conv_rank, conv_alpha)
    "locon": (128, 64, 64, 32),
    "loha": (16, 8, 16, 8),
}


def _factors(algo: str, shape, rank: int, generator):
    import torch

    out_dim, flat_in = shape[0], int(torch.Size(shape[1:]).numel())
    falloff = 0.97 ** torch.arange(rank, dtype=torch.float32)
    if algo == "locon":
        down = torch.randn(rank, flat_in, generator=generator) / flat_in**0.5
        up = torch.randn(out_dim, rank, generator=generator) * 0.01 * falloff
        if len(shape) == 4:
            return {"lora_down.weight": down.reshape(rank, *shape[1:]),
                    "lora_up.weight": up.reshape(out_dim, rank, 1, 1)}
        return {"lora_down.weight": down, "lora_up.weight": up}
    return {f"hada_w{i}_{side}": torch.randn(*dims, generator=generator) * 0.1
            for i in (1, 2) for side, dims in (("a", (out_dim, rank)), ("b", (rank, flat_in)))}


def build(path: Path, algo: str) -> None:
    """The input adapter file (a child's job)."""
    import torch

    from networks.kohya_file import save_network_file
    from networks.metadata import ExportInfo, build_metadata
    from networks.network import NetworkSpec
    from networks.targets import text_encoder_targets, unet_targets
    from trainer.sd15_config import build_sd15_from_config

    rank, alpha, conv_rank, conv_alpha = SPECS[algo]
    parts = build_sd15_from_config(device="meta")
    targets = [*unet_targets(parts.unet, conv=True), *text_encoder_targets(parts.text_encoder)]
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for target in targets:
        r, a = (conv_rank, conv_alpha) if target.is_conv_kxk else (rank, alpha)
        module = _factors(algo, tuple(target.layer.weight.shape), r, generator)
        module["alpha"] = torch.tensor(float(a))
        tensors |= {f"{target.lora_name}.{k}": v for k, v in module.items()}
    spec = NetworkSpec(algo, rank=rank, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha)
    save_network_file(path, tensors, build_metadata(spec, ExportInfo(title=f"bench {algo}")),
                      "fp16")


def measure(source: Path, rank: int, threads: int | None) -> dict:
    out = source.with_name(f"{source.stem}-r{rank}.safetensors")
    command = [sys.executable, "-m", "networks", "resize", str(source), "--rank", str(rank),
               "--out", str(out), "--json"]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    stdout = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"resize failed: {stdout[-2000:]}")
    summary = json.loads(stdout)["summary"]
    return {
        "input": source.name, "rank": rank, "modules": summary["modules"],
        "wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
        "mean_kept_fraction": round(summary["mean_kept_fraction"], 4),
        "min_kept_fraction": round(summary["min_kept_fraction"], 4),
        "file_mb_before": round(summary["size_before"] / 2**20, 1),
        "file_mb_after": round(summary["size_after"] / 2**20, 1),
        "threads": threads or "default",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-resize"))
    parser.add_argument("--algo", choices=sorted(SPECS), default="locon")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the command")
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    source = args.work / f"sd15-{args.algo}.safetensors"
    if args.build:
        build(source, args.algo)
        return
    if not source.is_file():
        args.work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bench.resize_lora", "--build", "--algo",
                        args.algo, "--work", str(args.work)], cwd=REPO, check=True)
        print(f"built {source.name} in {time.perf_counter() - started:.0f} s", flush=True)
    print(json.dumps(measure(source, args.rank, args.threads)), flush=True)


if __name__ == "__main__":
    main()
