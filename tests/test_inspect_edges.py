"""`python -m networks inspect` on broken adapters: each kind gets its verdict
and exit status (0 fine, 1 problems found, 2 unreadable), never a traceback."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from networks.__main__ import main

REPO = Path(__file__).resolve().parents[1]
NAME = "lora_unet_down_blocks_0_attentions_0_proj_in"


def lora(rank=4, up_rank=None, alpha: torch.Tensor | None | str = "4", **extra) -> dict:
    alpha = torch.tensor(4.0) if isinstance(alpha, str) else alpha
    tensors = {f"{NAME}.lora_down.weight": torch.randn(rank, 8),
               f"{NAME}.lora_up.weight": torch.randn(16, rank if up_rank is None else up_rank),
               **{f"{NAME}.{k}": v for k, v in extra.items()}}
    if alpha is not None:
        tensors[f"{NAME}.alpha"] = alpha
    return tensors


def locon(down=(4, 8, 1, 1), mid=(4, 4, 3, 3), up=(16, 4, 1, 1)) -> dict[str, torch.Tensor]:
    tensors = {"lora_down.weight": down, "lora_up.weight": up, "lora_mid.weight": mid}
    return {f"{NAME}.{k}": torch.randn(*shape) for k, shape in tensors.items() if shape} | {
        f"{NAME}.alpha": torch.tensor(4.0)}


def loha(w1=((16, 4), (4, 8)), w2=((16, 4), (4, 8)), t1=None, t2=None) -> dict:
    shapes = {"hada_w1_a": w1[0], "hada_w1_b": w1[1], "hada_w2_a": w2[0], "hada_w2_b": w2[1],
              "hada_t1": t1, "hada_t2": t2}
    return {f"{NAME}.{k}": torch.randn(*s) for k, s in shapes.items() if s} | {
        f"{NAME}.alpha": torch.tensor(2.0)}


def lokr(alpha: float | None = 2.0, **shapes) -> dict:
    """A LoKr module for a 32 x 24 layer (w1 (4, 4), w2 (8, 6)): w2 low-rank
    unless told otherwise; a shape of None leaves the tensor out."""
    shapes = {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 6)} | shapes
    tensors = {f"{NAME}.{k}": torch.randn(*s) for k, s in shapes.items() if s}
    return tensors | ({} if alpha is None else {f"{NAME}.alpha": torch.tensor(alpha)})


def inspect(path: Path, capsys, *args: str) -> tuple[int, str, str]:
    status = main(["inspect", str(path), *args])
    out, err = capsys.readouterr()
    return status, out, err


def write(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "adapter.safetensors"
    save_file(tensors, path)
    return path


GOOD = {
    "lora": lora(),
    "locon tucker": locon(),
    "locon 3x3": locon(down=(4, 8, 3, 3), mid=None),
    "loha": loha(),
    "loha tucker": loha(((4, 16), (4, 8)), ((4, 16), (4, 8)), (4, 4, 3, 3), (4, 4, 3, 3)),
    "no alpha": lora(alpha=None),
    "alpha as a one-element vector": lora(alpha=torch.tensor([4.0])),
    "lokr": lokr(),
    "lokr decompose both": lokr(lokr_w1=None, lokr_w1_a=(4, 2), lokr_w1_b=(2, 4)),
    "lokr full": lokr(lokr_w2_a=None, lokr_w2_b=None, lokr_w2=(8, 6)),
    "lokr full conv, no alpha": lokr(None, lokr_w2_a=None, lokr_w2_b=None, lokr_w2=(8, 6, 3, 3)),
    "lokr flattened conv w2_b": lokr(lokr_w2_b=(2, 54)),
    "lokr tucker": lokr(lokr_w2_a=(2, 8), lokr_w2_b=(2, 6), lokr_t2=(2, 2, 3, 3)),
}


@pytest.mark.parametrize("tensors", GOOD.values(), ids=GOOD)
def test_well_formed_adapters_pass(tmp_path, capsys, tensors):
    status, out, err = inspect(write(tmp_path, tensors), capsys)
    assert (status, err) == (0, "")
    assert out.splitlines()[-1] == "OK: loads in A1111, ComfyUI and lycoris."


ALPHA = ("1 modules have an alpha that is not one finite, non-negative number: loaders fail on "
         "it or scale the update wrongly (e.g. " + NAME + ": {}).")
SHAPES = ("1 modules have tensors whose ranks or shapes do not fit together: loaders fail on "
          "them or apply something else (e.g. " + NAME + ": {}).")
PROBLEMS = {
    "non-scalar alpha": (lora(alpha=torch.ones(4)),
                         ALPHA.format("alpha has shape (4,), not one number")),
    "alpha matrix": (lora(alpha=torch.ones(2, 2)),
                     ALPHA.format("alpha has shape (2, 2), not one number")),
    "NaN alpha": (lora(alpha=torch.tensor(float("nan"))), ALPHA.format("alpha is nan")),
    "infinite alpha": (lora(alpha=torch.tensor(float("inf"))), ALPHA.format("alpha is inf")),
    "negative alpha": (lora(alpha=torch.tensor(-2.0)), ALPHA.format("alpha is negative (-2)")),
    "lora up/down ranks disagree": (lora(rank=4, up_rank=3), SHAPES.format(
        "lora_down has rank 4 ((4, 8)) but lora_up has rank 3 ((16, 3))")),
    "locon mid does not chain": (locon(mid=(4, 5, 3, 3)), SHAPES.format(
        "Tucker lora_down (4, 8, 1, 1), lora_mid (4, 5, 3, 3) and lora_up (16, 4, 1, 1) do not "
        "chain (rank x in x 1 x 1, rank x rank x k x k, out x rank x 1 x 1)")),
    "locon 2-D up on a 4-D down": (locon(down=(4, 8, 3, 3), mid=None, up=(16, 4)), SHAPES.format(
        "lora_down (4, 8, 3, 3) and lora_up (16, 4) are not both 2-D (linear) or both 4-D "
        "(conv)")),
    "locon up not 1x1": (locon(down=(4, 8, 3, 3), mid=None, up=(16, 4, 3, 3)), SHAPES.format(
        "lora_up (16, 4, 3, 3) is not a 1x1 convolution")),
    "loha w1 and w2 ranks disagree": (loha(w2=((16, 2), (2, 8))), SHAPES.format(
        "hada_w1 has rank 4 but hada_w2 rank 2")),
    "loha w1_a and w1_b disagree": (loha(w1=((16, 3), (4, 8))), SHAPES.format(
        "the factors' ranks do not match (hada_w1_a (16, 3), hada_w1_b (4, 8), "
        "hada_w2_a (16, 4), hada_w2_b (4, 8))")),
    "loha factors of different sizes": (loha(w2=((12, 4), (4, 8))), SHAPES.format(
        "the two Hadamard factors are not the same size (hada_w1_a (16, 4), hada_w1_b (4, 8), "
        "hada_w2_a (12, 4), hada_w2_b (4, 8))")),
    "loha tucker core does not fit": (
        loha(((4, 16), (4, 8)), ((4, 16), (4, 8)), (4, 4, 3, 3), (4, 3, 3, 3)), SHAPES.format(
            "the factors' ranks do not match (hada_w1_a (4, 16), hada_w1_b (4, 8), hada_w2_a "
            "(4, 16), hada_w2_b (4, 8), hada_t1 (4, 4, 3, 3), hada_t2 (4, 3, 3, 3))")),
    "loha with one tucker core": (loha(t1=(4, 4, 3, 3)), SHAPES.format(
        "only one of hada_t1 and hada_t2 is present (Tucker needs both)")),
    "lokr w2_a and w2_b disagree": (lokr(lokr_w2_a=(8, 3)), SHAPES.format(
        "lokr_w2_a and lokr_w2_b do not multiply (lokr_w1 (4, 4), lokr_w2_a (8, 3), "
        "lokr_w2_b (2, 6))")),
    "lokr w1_a and w1_b disagree": (lokr(lokr_w1=None, lokr_w1_a=(4, 2), lokr_w1_b=(3, 4)),
                                    SHAPES.format(
        "lokr_w1_a and lokr_w1_b do not multiply (lokr_w1_a (4, 2), lokr_w1_b (3, 4), "
        "lokr_w2_a (8, 2), lokr_w2_b (2, 6))")),
    "lokr tucker core does not fit": (
        lokr(lokr_w2_a=(2, 8), lokr_w2_b=(2, 6), lokr_t2=(2, 3, 3, 3)), SHAPES.format(
            "the Tucker lokr_t2 does not chain with lokr_w2_a and lokr_w2_b (rank x rank x k x "
            "k, rank x out, rank x in) (lokr_t2 (2, 3, 3, 3), lokr_w1 (4, 4), lokr_w2_a (2, 8), "
            "lokr_w2_b (2, 6))")),
    "lokr tucker core on a whole w2": (
        lokr(lokr_w2_a=None, lokr_w2_b=None, lokr_w2=(8, 6), lokr_t2=(2, 2, 3, 3)), SHAPES.format(
            "the Tucker lokr_t2 does not chain with lokr_w2_a and lokr_w2_b (rank x rank x k x "
            "k, rank x out, rank x in) (lokr_t2 (2, 2, 3, 3), lokr_w1 (4, 4), lokr_w2 (8, 6))")),
    "lokr w1 whole and factorised": (lokr(lokr_w1_a=(4, 2), lokr_w1_b=(2, 4)), SHAPES.format(
        "lokr_w1 is stored both whole and as lokr_w1_a/_b")),
    "lokr w1 not a matrix": (lokr(lokr_w1=(4, 4, 1)), SHAPES.format(
        "the lokr factors are not matrices (w2 may be a 4-D kernel) (lokr_w1 (4, 4, 1), "
        "lokr_w2_a (8, 2), lokr_w2_b (2, 6))")),
    # A1111 skips a factor with only one half; so does every loader that checks.
    "lokr w2_a without w2_b": (lokr(lokr_w2_b=None), f"1 unknown modules (e.g. {NAME}): no "
                               "loader will apply them."),
    "lokr rank 0": (lokr(lokr_w2_a=(8, 0), lokr_w2_b=(0, 6)), "1 modules have rank 0: they "
                    f"change nothing, and loaders that divide alpha by the rank fail on them "
                    f"(e.g. {NAME}: rank 0)."),
    "rank 0": (lora(rank=0), "1 modules have rank 0: they change nothing, and loaders that "
                             f"divide alpha by the rank fail on them (e.g. {NAME}: rank 0)."),
    "no tensors": ({}, "the file holds no tensors: there is nothing to apply."),
}


@pytest.mark.parametrize("tensors, problem", PROBLEMS.values(), ids=PROBLEMS)
def test_broken_modules_are_problems_with_exit_1(tmp_path, capsys, tensors, problem):
    path = write(tmp_path, tensors)
    status, out, err = inspect(path, capsys)
    assert (status, err) == (1, "")
    assert f"PROBLEM: {problem}" in out.splitlines()
    assert "OK:" not in out and out.splitlines()[-1].startswith("Problems found: ")
    status, out, _ = inspect(path, capsys, "--json")
    assert status == 1 and problem in json.loads(out)["problems"]


def test_a_lokr_file_reports_its_ranks_and_alphas(tmp_path, capsys):
    tensors = lokr() | {k.replace(NAME, NAME + "_full"): v for k, v in lokr(
        3.0, lokr_w2_a=None, lokr_w2_b=None, lokr_w2=(8, 6)).items()}
    status, out, _ = inspect(write(tmp_path, tensors), capsys, "--json")
    report = json.loads(out)
    assert status == 0 and report["problems"] == []
    assert report["algorithms"] == {"lokr": 2}
    assert report["ranks"] == {"2": 1, "full": 1} and report["alphas"] == {"2": 1, "3": 1}


@pytest.mark.parametrize("args, options, warning", [
    ({"algo": "lokr", "factor": "8", "decompose_both": "True", "conv_dim": "4"},
     {"factor": 8, "decompose_both": True}, None),
    ({"factor": "0"}, {}, "warning: ss_network_args factor = '0' must be -1 (automatic) or a "
                          "whole number of at least 1: the tensors decide instead."),
    ({"algo": ["lokr"], "full_matrix": "maybe"}, {}, "warning: ss_network_args full_matrix = "
     "'maybe' is not True or False: the tensors decide instead."),
])  # fmt: skip
def test_the_recorded_options_are_reported(tmp_path, capsys, args, options, warning):
    path = tmp_path / "adapter.safetensors"
    save_file(lokr(), path, {"ss_network_args": json.dumps(args)})
    status, out, _ = inspect(path, capsys, "--json")
    assert status == 0 and json.loads(out)["options"] == options
    status, out, _ = inspect(path, capsys)
    if options:
        assert "Options: factor = 8, decompose_both = true" in out.splitlines()
    assert (warning in out.splitlines()) if warning else "warning: ss_network_args" not in out


def test_alpha_0_is_a_warning_naming_the_disagreement(tmp_path, capsys):
    status, out, _ = inspect(write(tmp_path, lora(alpha=torch.tensor(0.0))), capsys)
    assert status == 0
    assert ("warning: 1 modules have alpha 0: lycoris and this trainer scale them by 0 (no "
            "effect), A1111 and kohya by 1 (as if alpha = rank).") in out.splitlines()


def good_bytes() -> bytes:
    return save(lora(), metadata={"ss_network_dim": "4"})


def header_bytes(header: object, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw)) + raw + data


UNREADABLE = {
    "missing": (None, "{path} does not exist."),
    "a folder": ("folder", "{path} is a folder, not a .safetensors file."),
    "empty": (b"", "{path} is empty (0 bytes)."),
    "shorter than a header length": (b"abc", "{path} is not a safetensors file (it does not "
                                             "start with a safetensors header)."),
    "text": (b"this is a caption, not weights\n", "{path} is not a safetensors file (it does not "
                                                  "start with a safetensors header)."),
    "torch pickle": ("pickle", "{path} is a PyTorch pickle/zip file (.ckpt/.pt), not a "
                               ".safetensors file."),
    "truncated data": (good_bytes()[:-10], "{path} is truncated: its header lists 388 bytes of "
                                           "tensor data, the file holds 378 (an interrupted "
                                           "download or copy?)."),
    "truncated header": (good_bytes()[:40], "{path} is truncated or not a safetensors file: its "
                                            "header should be 376 bytes, the file holds 40."),
    "bytes past the data": (good_bytes() + b"\0" * 8, "{path} has bytes its header does not "
                                                      "list: its header lists 388 bytes of "
                                                      "tensor data, the file holds 396 (an "
                                                      "interrupted download or copy?)."),
    "garbage header": (header_bytes(b"{not json at all"), "{path} has a damaged header (not a "
                                                          "JSON object): the file is corrupt or "
                                                          "not a safetensors file."),
    "header not an object": (header_bytes([1, 2]), "{path} has a damaged header (not a JSON "
                                                   "object): the file is corrupt or not a "
                                                   "safetensors file."),
    "bad tensor entry": (header_bytes({"a.lora_down.weight": {"dtype": "F32", "shape": [2, 2],
                                                              "data_offsets": [0, 3]}}, b"\0" * 3),
                         "{path} has a damaged header (the entry of tensor "
                         "'a.lora_down.weight' is not valid)."),
    "negative shape": (header_bytes({"x": {"dtype": "F32", "shape": [-1],
                                           "data_offsets": [0, 0]}}),
                       "{path} has a damaged header (the entry of tensor 'x' is not valid)."),
    "overlapping tensors": (header_bytes({n: {"dtype": "F32", "shape": [4], "data_offsets": o}
                                          for n, o in (("a", [0, 16]), ("b", [8, 24]))},
                                         b"\0" * 24),
                            "{path} has a damaged header (its tensors overlap or leave gaps)."),
    "metadata not text": (header_bytes({"__metadata__": {"a": 1}}),
                          "{path} has a damaged header (its metadata is not text)."),
    "header not UTF-8": (header_bytes(b"\xff\xfe\xfd"), "{path} has a damaged header (not a "
                                                         "JSON object): the file is corrupt or "
                                                         "not a safetensors file."),
}


def make_unreadable(tmp_path: Path, content) -> Path:
    path = tmp_path / "adapter.safetensors"
    if content == "folder":
        path.mkdir()
    elif content == "pickle":
        torch.save(lora(), path)
    elif content is not None:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("content, message", UNREADABLE.values(), ids=UNREADABLE)
def test_unreadable_files_exit_2_with_one_paragraph(tmp_path, capsys, content, message):
    path = make_unreadable(tmp_path, content)
    status, out, err = inspect(path, capsys)
    assert (status, out) == (2, "")
    hint = " Give the path of a LoRA/LyCORIS .safetensors file."
    assert err == f"error: {message.format(path=path)}{hint}\n"


@pytest.mark.parametrize("content, status", [
    (lora(), 0), (lora(alpha=torch.ones(3)), 1), (good_bytes()[:-1], 2),
])  # fmt: skip
def test_exit_status_of_the_command(tmp_path, content, status):
    path = tmp_path / "adapter.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        save_file(content, path)
    done = subprocess.run([sys.executable, "-m", "networks", "inspect", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == status, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert (done.stderr.startswith("error: ") and done.stdout == "") == (status == 2)
