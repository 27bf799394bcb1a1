"""Offline CLIP tokenizer for SD 1.x.

A single-file checkpoint carries no tokenizer and we never reach a model hub,
so the BPE files for transformers' `CLIPTokenizer` are derived from the merges
list that ships inside the `clip` package (clip-anytorch), exactly the way
OpenAI's `clip/simple_tokenizer.py` (`SimpleTokenizer.__init__`) builds its
vocabulary. See docs/FORMATS.md "The CLIP tokenizer offline".

Token ids: `<|startoftext|>` = 49406, `<|endoftext|>` = 49407, 49,408 tokens,
77 positions, padding with `<|endoftext|>` like SD1.5's own tokenizer folder.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import tempfile
from pathlib import Path

from core.atomic import atomic_write_text
from core.errors import UserError
from core.paths import cache_root

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_ID = 49406
EOS_ID = 49407

# Packages known to ship the OpenAI merges file; the first one is ours
# (Makefile installs clip-anytorch), open_clip has an identical copy.
_PACKAGES = (("clip", "clip-anytorch"), ("open_clip", "open-clip-torch"))


def find_bpe_file() -> Path:
    """Return the path of OpenAI's `bpe_simple_vocab_16e6.txt.gz`.

    The package is located, not imported: `clip/__init__.py` imports
    torchvision, which is deliberately absent here.
    """
    for module_name, dist_name in _PACKAGES:
        spec = importlib.util.find_spec(module_name)
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(location) / BPE_FILE_NAME
            if candidate.is_file():
                return candidate
        try:
            files = importlib.metadata.files(dist_name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for entry in files:
            if entry.name == BPE_FILE_NAME:
                candidate = Path(entry.locate())
                if candidate.is_file():
                    return candidate
    raise UserError(
        f"The CLIP vocabulary file {BPE_FILE_NAME} was not found because the clip-anytorch "
        "package is not installed; run `make install` to install it."
    )


def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character table of GPT-2/CLIP byte-level BPE.

    Same order as `clip/simple_tokenizer.py::bytes_to_unicode`; the order
    matters because the first 256 token ids follow it.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in byte_values:
            byte_values.append(byte)
            code_points.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, (chr(c) for c in code_points), strict=True))


def build_vocab_and_merges(bpe_path: Path) -> tuple[dict[str, int], list[str]]:
    """Vocabulary and merge list as built by OpenAI's `SimpleTokenizer`."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    # Line 0 is a version header; OpenAI keeps exactly 49152-256-2 merges so
    # that merges + 2*256 byte symbols + 2 specials = 49,408 tokens.
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(merge.split()) for merge in merges]
    vocab += [BOS_TOKEN, EOS_TOKEN]
    if len(vocab) != VOCAB_SIZE:
        raise UserError(
            f"The CLIP vocabulary file {bpe_path} yields {len(vocab)} tokens instead of "
            f"{VOCAB_SIZE}; reinstall clip-anytorch with `make install`."
        )
    return {token: index for index, token in enumerate(vocab)}, merges


def _file_contents(bpe_path: Path) -> dict[str, str]:
    vocab, merges = build_vocab_and_merges(bpe_path)
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        # SD1.5's tokenizer pads with <|endoftext|> (SD2 uses "!").
        "pad_token": EOS_TOKEN,
        "do_lower_case": True,
        "add_prefix_space": False,
    }
    special_tokens = {
        k: tokenizer_config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")
    }
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False, sort_keys=False),
        # "#version" is the header line HF merges files start with.
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special_tokens, indent=2) + "\n",
    }


def write_tokenizer_files(folder: str | os.PathLike) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in _file_contents(find_bpe_file()).items():
        atomic_write_text(folder / name, text)
    return folder


def offline_tokenizer_dir() -> Path:
    """Folder with the generated tokenizer files, created on first use.

    Keyed by a hash of the merges file so another package version never
    reuses stale files.
    """
    bpe_path = find_bpe_file()
    digest = hashlib.sha256(bpe_path.read_bytes()).hexdigest()[:16]
    folder = cache_root() / f"clip-tokenizer-{digest}"
    names = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
    if not all((folder / name).is_file() for name in names):
        try:
            write_tokenizer_files(folder)
        except (OSError, UserError):
            # Read-only home (CI sandboxes): fall back to a private temp folder.
            folder = write_tokenizer_files(tempfile.mkdtemp(prefix="clip-tokenizer-"))
    return folder


def load_offline_tokenizer(folder: str | os.PathLike | None = None):
    """An SD1.x `CLIPTokenizer` built without network access.

    With `folder`, the files are written there first (e.g. a diffusers
    `tokenizer/` subfolder); otherwise the user cache is used.
    """
    from transformers import CLIPTokenizer

    source = write_tokenizer_files(folder) if folder is not None else offline_tokenizer_dir()
    return CLIPTokenizer.from_pretrained(str(source), local_files_only=True)
