"""The adapter algorithms by name, without torch: the registry every other
layer reads (the config schema's choices and option fields, the GUI dropdown,
file recognition for `inspect`, `ss_network_args`).

One `Algorithm` line per algorithm names the module class that implements it
(imported only when a network is built, see `networks.registry`), whether it
targets the k x k convolutions, the file keys that identify its modules and the
options it takes. An option is a `[network]` config key of its own, typed, with
a default and help text; options shared by several algorithms (Tucker, DoRA)
are declared once below and listed by each algorithm that supports them.
Adding an algorithm is one module implementing `networks.base.AdapterModule`
and one line in `ALGORITHMS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    """One algorithm option: a `[network]` key and its `ss_network_args` entry.

    `arg` is the name LyCORIS uses in `ss_network_args` (values are strings
    there, "True"/"False" for booleans), so files read the same in both.
    """

    name: str
    type: type
    default: bool | int | float
    help: str
    arg: str
    # What is wrong with a value of the right type ("must be ..."), None if nothing.
    check: Callable[[object], str | None] | None = None

    def to_arg(self, value) -> str:
        return str(value)

    def problem(self, value) -> str | None:
        return None if self.check is None else self.check(value)

    def from_arg(self, text: str):
        """The value of a `ss_network_args` string; ValueError if it is not one."""
        if self.type is bool:
            if text not in ("True", "False", "true", "false"):
                raise ValueError(f"{self.arg} = {text!r} is not True or False")
            return text in ("True", "true")
        value = self.type(text)
        if self.problem(value):
            raise ValueError(f"{self.arg} = {text!r} {self.problem(value)}")
        return value


TUCKER = Option(
    "tucker", bool, False,
    "Tucker decomposition of k x k conv kernels (locon/loha/lokr): a k x k core between "
    "1x1 factors (for lokr, of a low-rank w2 only).", "use_tucker",
)  # fmt: skip
DORA = Option(
    "dora", bool, False,
    "DoRA (Liu et al. 2024, arXiv:2402.09353): also learn the weight's magnitude per "
    "input channel, saved as dora_scale; A1111 and ComfyUI apply it as trained, lycoris "
    "when set to wd_on_output=False.", "dora_wd",
)  # fmt: skip
DORA_ON_OUTPUT = Option(
    "dora_on_output", bool, False,
    "DoRA magnitude per output channel (LyCORIS wd_on_output) instead of per input "
    "channel. Warning: A1111 applies such files wrongly and ComfyUI has an open bug "
    "for them; only lycoris loads them as trained.", "wd_on_output",
)  # fmt: skip



def _factor_problem(value) -> str | None:
    if value == -1 or value >= 1:
        return None
    return "must be -1 (automatic) or a whole number of at least 1"


FACTOR = Option(
    "factor", int, -1,
    "LoKr: each dimension is split as f x dim/f for the factor f when f divides it, "
    "else as evenly as sides up to f allow; the small factor w1 takes the smaller side. "
    "-1: the split closest to a square root. Larger factors move capacity into the full "
    "w1 (LyCORIS factor).", "factor", _factor_problem,
)  # fmt: skip
DECOMPOSE_BOTH = Option(
    "decompose_both", bool, False,
    "LoKr: store w1 as a low-rank product too (where the rank is below half its larger "
    "side), not only w2.", "decompose_both",
)  # fmt: skip
FULL_MATRIX = Option(
    "full_matrix", bool, False,
    "LoKr: keep both factors full matrices, never low-rank products; rank and alpha "
    "then change nothing (the scale is 1).", "full_matrix",
)  # fmt: skip

# Module tensors of the LoRA family; "alpha" and "dora_scale" may join any module.
LORA_KEYS = (frozenset({"lora_down.weight"}), frozenset({"lora_up.weight"}))
LOHA_KEYS = tuple(frozenset({f"hada_w{i}_{s}"}) for i in (1, 2) for s in ("a", "b"))
# LoKr: each factor whole or as both halves of its product, (w or w_a) and (w or w_b):
# A1111's rule; a module with a lone lokr_w1_a is no loader's.
LOKR_KEYS = tuple(frozenset({f"lokr_w{i}", f"lokr_w{i}_{s}"}) for i in (1, 2) for s in ("a", "b"))


@dataclass(frozen=True)
class Algorithm:
    """What the rest of the program knows about an algorithm without torch.

    keys: a module is this algorithm's when, for every set, its file suffixes
    include one of the set's names (alternatives, e.g. LoKr's full or
    factorised w1). file_name: the algorithm a file module is reported as
    (LoCon files are LoRA files that also cover convolutions).
    """

    name: str
    label: str
    help: str
    module_class: str  # "package.module:Class"
    targets_conv: bool
    keys: tuple[frozenset[str], ...]
    options: tuple[Option, ...] = ()
    file_name: str = ""

    def recognises(self, suffixes: set[str] | frozenset[str]) -> bool:
        return all(alternatives & suffixes for alternatives in self.keys)

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(option.name for option in self.options)


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("lora", "LoRA", "low-rank up @ down on attention and linear layers",
                  "networks.lora:LoRAModule", False, LORA_KEYS, (DORA, DORA_ON_OUTPUT)),
        Algorithm("locon", "LoCon (LoRA + convolutions)", "LoRA on the convolutions too",
                  "networks.lora:LoRAModule", True, LORA_KEYS, (TUCKER, DORA, DORA_ON_OUTPUT),
                  file_name="lora"),
        Algorithm("loha", "LoHa", "Hadamard product of two low-rank pairs, also on convs",
                  "networks.loha:LoHaModule", True, LOHA_KEYS, (TUCKER, DORA, DORA_ON_OUTPUT)),
        Algorithm("lokr", "LoKr (Kronecker product)",
                  "Kronecker product of a small and a low-rank factor, also on convs",
                  "networks.lokr:LoKrModule", True, LOKR_KEYS,
                  (FACTOR, DECOMPOSE_BOTH, FULL_MATRIX, TUCKER, DORA, DORA_ON_OUTPUT)),
    )
}  # fmt: skip


def all_options() -> dict[str, Option]:
    """Every option of every algorithm by name; one name means one option."""
    options: dict[str, Option] = {}
    for algorithm in ALGORITHMS.values():
        for option in algorithm.options:
            if options.setdefault(option.name, option) != option:
                raise ValueError(f"two algorithms declare different options named {option.name}")
    return options


def algorithms_using(option: str) -> list[str]:
    return [a.name for a in ALGORITHMS.values() if option in a.option_names]


def file_algorithm(suffixes: set[str] | frozenset[str]) -> Algorithm | None:
    """The algorithm whose keys a file module has (LoCon is reported as LoRA)."""
    for algorithm in ALGORITHMS.values():
        if not algorithm.file_name and algorithm.recognises(suffixes):
            return algorithm
    return None


def choices() -> list[tuple[str, str]]:
    """(label, name) pairs for a dropdown."""
    return [(a.label, a.name) for a in ALGORITHMS.values()]
