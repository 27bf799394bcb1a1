"""kohya's network options for `import-kohya`: `LoRA_type` (GUI) or
`network_module` + `network_args` (sd-scripts) -> network.type and its
options, and the options of other model families (SDXL, FLUX.1, SD3).
"""

from __future__ import annotations

from networks.algorithms import algorithms_using, all_options
from trainer.kohya_import_draft import Draft, flag, inactive, number, show, unset
from trainer.kohya_import_groups import key_values, set_number
from trainer.kohya_import_tables import (
    FAMILY_OPTIONS,
    FAMILY_SWITCHES,
    KOHYA_LORA_MODULES,
    LORA_TYPES,
    LYCORIS_ALGOS,
    LYCORIS_MODULES,
    NO_EQUIVALENT,
)

CONV_TYPES = ("locon", "loha", "lokr")
# LyCORIS option names (networks.algorithms Option.arg) -> our option; use_cp is
# LyCORIS's old name for use_tucker.
OPTION_ARGS = {o.arg: o for o in all_options().values()} | {"use_cp": all_options()["tucker"]}
DROPOUT_ARGS = {"dropout": "network.dropout", "rank_dropout": "network.rank_dropout",
                "module_dropout": "network.module_dropout"}


def network(args: dict, draft: Draft) -> None:
    lora_type, module = args.pop("LoRA_type", None), args.pop("network_module", None)
    net_args = key_values(args.pop("network_args", None), "network_args", draft)
    algo = net_args.pop("algo", None)
    if not unset(lora_type):
        kind = LORA_TYPES.get(str(lora_type))
        if kind is None:
            family = str(lora_type).startswith(("Flux", "SD3"))
            draft.skip("LoRA_type", lora_type, "a LoRA of another model family: this trainer "
                       "trains SD1.5-family models; the preset trains an SD1.5 LoRA"
                       if family else _no_algorithm("a plain LoRA"))
            kind = "lora"
        draft.set_from("network.type", kind, "LoRA_type", lora_type)
    else:
        kind = _module_kind(module, algo, "conv_dim" in net_args, draft)
    conv = {name: args.pop(name, None) for name in ("conv_dim", "conv_alpha")}
    conv = {n: v for n, v in conv.items() if not unset(v)} | {
        n: net_args.pop(n) for n in ("conv_dim", "conv_alpha") if n in net_args}
    for name, target in (("conv_dim", "network.conv_rank"), ("conv_alpha", "network.conv_alpha")):
        if name not in conv:
            continue
        if kind not in CONV_TYPES:
            draft.unused_by_kohya.append(f"{name} = {show(name, conv[name])} (network.type "
                                         f'"{kind}" has no convolution adapters)')
            continue
        set_number(draft, target, conv[name], name, int if name == "conv_dim" else float)
    lycoris = unset(lora_type) or str(lora_type).startswith("LyCORIS/")
    _options(args, net_args, kind, draft, lycoris)
    for name, marker in (("train_on_input", "iA3"), ("unit", "DyLoRA")):
        raw = args.pop(name, None)
        if inactive(raw) or raw == 1 and name == "unit":
            continue
        if marker in str(lora_type):
            draft.skip(name, raw, NO_EQUIVALENT[name])
        else:
            draft.unused_by_kohya.append(f"{name} = {show(name, raw)} (only for {marker})")
    if kind == "lokr":
        _full_lokr(args, draft)
    for name, value in net_args.items():
        reason = NO_EQUIVALENT.get(name, "a network argument this trainer does not know")
        if name in ("preset",) and str(value).lower() == "full":
            continue  # LyCORIS's default preset: every layer, as network.type's own set
        draft.skip(f"network_args {name}", value, reason)


def _full_lokr(args: dict, draft: Draft) -> None:
    """LyCORIS: a LoKr dimension this large (kohya_ss presets use 100000)
    keeps both factors full, which is network.full_matrix here."""
    try:
        dim = number(args.get("network_dim"), int)
    except (TypeError, ValueError):
        return
    if dim <= 1024:  # network.rank's upper bound
        return
    args.pop("network_dim")
    draft.set("network.full_matrix", True, "network_dim",
              shown=f"network_dim = {dim}: LyCORIS keeps LoKr factors this large full")
    draft.values.pop("network.conv_rank", None)  # full factors: conv rank changes nothing


def model_family(args: dict, draft: Draft) -> None:
    """Options of SDXL / FLUX.1 / SD3: lost with the family when its switch is
    on, and unused by kohya too when it is off."""
    for switch, options in FAMILY_OPTIONS.items():
        on = not unset(args.get(switch)) and flag(args.get(switch))
        for name in options:
            raw = args.pop(name, None)
            if inactive(raw):
                continue
            if on:
                draft.skip(name, raw, f"a {FAMILY_SWITCHES[switch]} option; this trainer "
                           "trains SD1.5-family models only")
            else:
                draft.unused_by_kohya.append(f"{name} = {show(name, raw)} (only with "
                                             f"{switch} = true)")


def _module_kind(module, algo, has_conv: bool, draft: Draft) -> str:
    module_text = "" if unset(module) else str(module)
    if module_text in LYCORIS_MODULES:
        name = (algo or "lora").lower()
        kind = LYCORIS_ALGOS.get(name)
        if kind is None:
            draft.skip("network_args algo", algo, _no_algorithm("a plain LoRA"))
            kind = "lora"
        kind = "locon" if kind == "lora" and has_conv else kind
        draft.set("network.type", kind, "network_module", "algo",
                  shown=f'network_module = "{module_text}", algo = "{name}"')
        return kind
    if module_text and module_text not in KOHYA_LORA_MODULES:
        draft.skip("network_module", module, _no_algorithm("a plain LoRA"))
    kind = "locon" if has_conv else "lora"
    if module_text or has_conv:
        draft.set("network.type", kind, "network_module",
                  shown=f'network_module = "{module_text or "networks.lora"}"'
                  + (", network_args conv_dim" if has_conv else ""))
    return kind


def _no_algorithm(instead: str) -> str:
    return (f"an adapter algorithm this trainer does not have (it has lora, locon, loha, lokr); "
            f"the preset trains {instead} instead")


def _options(args: dict, net_args: dict, kind: str, draft: Draft, lycoris: bool) -> None:
    """LyCORIS options (use_tucker, dora_wd, factor...) and the dropouts, from
    network_args or the GUI's own fields of the same names."""
    found = {n: net_args.pop(n) for n in list(net_args) if n in OPTION_ARGS or n in DROPOUT_ARGS}
    gui_fields = set()
    for name in [*OPTION_ARGS, *DROPOUT_ARGS, "network_dropout"]:
        if name in args and not unset(args[name]) and name not in found:
            found[name] = args[name]
            gui_fields.add(name)
        args.pop(name, None)
    if "network_dropout" in found:
        found.setdefault("dropout", found.pop("network_dropout"))
    for name, raw in found.items():
        if name in DROPOUT_ARGS:
            set_number(draft, DROPOUT_ARGS[name], raw, name, float)
            continue
        option = OPTION_ARGS[name]
        text = str(int(raw)) if isinstance(raw, float) and raw.is_integer() else str(raw)
        try:
            value = raw if isinstance(raw, bool) else option.from_arg(text)
        except ValueError as exc:
            draft.skip(name, raw, f"value not supported: {exc}")
            continue
        if value == option.default:
            continue
        if name in gui_fields and not lycoris:  # kohya_ss passes them to LyCORIS only
            draft.unused_by_kohya.append(f"{name} = {show(name, raw)} (LoRA_type is not "
                                         "LyCORIS)")
            continue
        if kind not in algorithms_using(option.name):
            where = ", ".join(algorithms_using(option.name))
            draft.skip(name, raw, f"network.{option.name} applies to {where} here, not to "
                                  f'network.type "{kind}"')
            continue
        draft.set_from(f"network.{option.name}", value, name, raw)
