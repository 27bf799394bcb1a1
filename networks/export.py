"""Export a trained network and load a file back (to continue training or to
apply it), with user-facing errors."""

from __future__ import annotations

import json
import os

from torch import nn

from core.atomic import DEFAULT_ADVICE
from core.errors import UserError

from .algorithms import ALGORITHMS
from .base import Dropout
from .kohya_file import read_network_file, save_network_file
from .metadata import ExportInfo, build_metadata
from .network import DORA_OPTIONS, AdapterNetwork, NetworkSpec


def export_network(
    network: AdapterNetwork, path: str | os.PathLike, info: ExportInfo, precision: str = "fp16",
    advice: str = DEFAULT_ADVICE,
) -> None:
    if network.spec is None:
        raise ValueError("export needs the NetworkSpec the network was built with")
    metadata = build_metadata(network.spec, info)
    save_network_file(path, network.state_dict(), metadata, precision, advice)


def load_network(
    path: str | os.PathLike,
    unet: nn.Module | None,
    text_encoder: nn.Module | None,
    dropout: Dropout = Dropout(),
) -> AdapterNetwork:
    tensors, metadata = read_network_file(path)
    try:
        network = AdapterNetwork.from_state_dict(tensors, unet, text_encoder, dropout)
    except KeyError as exc:
        raise UserError(
            f"{path} does not fit this base model: {exc.args[0]}. "
            "Is it an SD 1.x LoRA/LyCORIS file?"
        ) from exc
    if not network.adapters:
        names = ", ".join(a.label.split(" (")[0] for a in ALGORITHMS.values())
        raise UserError(f"{path} holds no {names} modules: it is not an adapter this "
                        "trainer can load.")
    network.spec = spec_from_metadata(metadata, network, dropout)
    return network


def spec_from_metadata(
    metadata: dict[str, str], network: AdapterNetwork, dropout: Dropout
) -> NetworkSpec:
    """The spec a file was trained with: ranks and alphas from its `ss_*` keys,
    else its tensors; options from what its tensors show (they decide what a
    loader applies), else from `ss_network_args`."""
    first = network.adapters[0]
    args = _json_or_empty(metadata.get("ss_network_args"))
    algorithm = args.get("algo") or first.algorithm
    if algorithm == "lora" and any(a.rank != first.rank for a in network.unet_adapters):
        algorithm = "locon"
    if algorithm not in ALGORITHMS or ALGORITHMS[algorithm].module_class != (
        ALGORITHMS[first.algorithm].module_class
    ):
        algorithm = first.algorithm
    options = _file_options(algorithm, args, network)
    shared = {k: options.pop(k) for k in ("tucker", *DORA_OPTIONS) if k in options}
    return NetworkSpec(
        algorithm=algorithm,
        rank=_number(int, metadata.get("ss_network_dim"), first.rank),
        alpha=_number(float, metadata.get("ss_network_alpha"), float(first.alpha)),
        conv_rank=_number(int, args.get("conv_dim"), first.rank),
        conv_alpha=_number(float, args.get("conv_alpha"), float(first.alpha)),
        dropout=dropout,
        train_unet=bool(network.unet_adapters),
        train_text_encoder=bool(network.text_encoder_adapters),
        options=options,
        **shared,
    )


def _file_options(algorithm: str, args: dict, network: AdapterNetwork) -> dict[str, object]:
    """What the tensors show wins; `ss_network_args` fills in the rest."""
    first = network.adapters[0]
    shown = type(first).network_options(
        [a for a in network.adapters if type(a) is type(first)], args
    )
    options = {}
    for option in ALGORITHMS[algorithm].options:
        if option.name in shown:
            options[option.name] = shown[option.name]
        elif option.arg in args:
            try:
                options[option.name] = option.from_arg(str(args[option.arg]))
            except ValueError:
                options[option.name] = option.default
    return options


def _number(kind: type, text: str | None, fallback):
    """A rank or alpha from the header, else the tensors' (kohya's dynamic
    resize writes "Dynamic": the ranks differ per module)."""
    try:
        return kind(float(text)) if text is not None else fallback
    except (TypeError, ValueError, OverflowError):
        return fallback


def _json_or_empty(text: str | None) -> dict:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
