"""`train.compile`: the U-Net compiled with torch.compile, its adapters in place.

The adapters are forward hooks on the U-Net's layers; Dynamo traces them into
the one U-Net graph (no graph break: tests/test_compile.py asserts it with
`torch._dynamo.explain`), so their parameters stay graph inputs that the
optimizer updates, and the network exports, merges and resumes as in eager
mode (the compiled module shares the U-Net's weights; only `sd.unet` is ever
saved).

Shapes are static: a graph per (batch, bucket) shape. On this 2-core CPU,
dynamic shapes cost more than a recompile (Dynamo + AOTAutograd traced a
dynamic demo U-Net in 76-96 s against 35 s for a static shape), and Inductor
failed on the dynamic CPU graph (sympy "cannot determine truth value of
Relational"). A run sees only its dataset's bucket sizes (and at most one short
batch size per bucket), so the recompile limit is raised to cover them;
BENCHMARKS.md has the compile time per shape.

Python floats on the adapters (multiplier, scale) and their switches (enabled,
merged, training) become guards: a changed multiplier or a disabled network
compiles once more and is then cached, never once per step. Module dropout
draws a 0/1 tensor under compile instead of branching on a random number
(networks/base.py), which would split the graph at every adapter.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from core.paths import cache_root

# Inductor generates and builds kernels; tests swap in "aot_eager" (the same
# Dynamo graph and AOTAutograd joint graph, run by eager kernels), which
# checks our side of compilation at a fraction of Inductor's CPU build time.
BACKEND = "inductor"
# Bucket shapes x {full, short last batch} x {train, eval} with room to spare.
MIN_RECOMPILE_LIMIT = 64


def compile_cache_dir():
    """Inductor's and AOTAutograd's on-disk caches: a second run of the same
    config (same shapes, same torch) loads compiled kernels instead of
    building them. Kept with the other caches rather than in /tmp."""
    return cache_root() / "torch-compile"


def prepare(network) -> None:
    """The scale is cached per alpha value in eager mode; a graph cannot read
    a tensor back, so it reads the cache, refreshed here after any load
    (alpha is not trained)."""
    for adapter in network.adapters:
        adapter.refresh_scale()


def compile_unet(unet: nn.Module, network, bucket_shapes: int = 1, backend=None,
                 fullgraph: bool = False) -> nn.Module:
    """The compiled U-Net to call in the training step; `unet` itself stays
    the eager module (previews and exports use it). A graph break (a user's
    xformers, say) falls back to eager for that part unless `fullgraph`."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))
    prepare(network)
    limit = max(MIN_RECOMPILE_LIMIT, 4 * bucket_shapes)
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, limit)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4 * limit)
    return torch.compile(unet, backend=backend or BACKEND, dynamic=False, fullgraph=fullgraph)


def step_unet(config, unet: nn.Module, network, data, log: bool) -> nn.Module:
    """The U-Net the training step calls: compiled with train.compile."""
    if not config.train.compile:
        return unet
    shapes = len(set(data.buckets))
    if log:
        print(
            f"train.compile: the U-Net is compiled with its adapters ({BACKEND}); the first "
            f"step at each of the {shapes} bucket size(s) waits for it (minutes on a CPU), "
            f"later runs of the same shapes reuse {compile_cache_dir()}",
            flush=True,
        )
    return compile_unet(unet, network, shapes)
