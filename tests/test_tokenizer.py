"""The offline CLIP tokenizer reproduces SD1.x's
(docs/FORMATS.md "The CLIP tokenizer offline")."""

import pytest

from core.errors import UserError
from trainer import tokenizer as tok_mod

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_TRAINER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_test_vector_and_sd15_padding(cache_dir):
    tokenizer = tok_mod.load_offline_tokenizer()
    assert tokenizer("a photo of a cat").input_ids == CAT_IDS
    padded = tokenizer(
        "a photo of a cat", padding="max_length", max_length=tokenizer.model_max_length
    ).input_ids
    assert tokenizer.model_max_length == 77
    assert padded == CAT_IDS + [49407] * (77 - len(CAT_IDS))
    assert tokenizer.pad_token_id == 49407
    assert len(tokenizer) == 49408
    long = tokenizer("cat " * 100, truncation=True, max_length=77).input_ids
    assert len(long) == 77 and long[0] == 49406 and long[-1] == 49407


def test_vocabulary_layout_follows_simple_tokenizer():
    vocab, merges = tok_mod.build_vocab_and_merges(tok_mod.find_bpe_file())
    assert len(vocab) == 49408 and len(merges) == 49152 - 256 - 2
    assert vocab["!"] == 0 and vocab["a"] == 64 and vocab["a</w>"] == 256 + 64
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    # First merge follows the 512 byte symbols.
    assert vocab["".join(merges[0].split())] == 512


def test_cache_is_generated_once(cache_dir):
    first = tok_mod.offline_tokenizer_dir()
    assert first.parent == cache_dir
    stamps = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    assert set(stamps) == {
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    assert tok_mod.offline_tokenizer_dir() == first
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == stamps  # no temp leftovers


def test_files_written_into_a_folder_load_with_transformers(tmp_path):
    from transformers import CLIPTokenizer

    tok_mod.write_tokenizer_files(tmp_path / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path / "tokenizer"), local_files_only=True)
    assert tokenizer("a photo of a cat").input_ids == CAT_IDS
    assert tokenizer.model_max_length == 77


def test_missing_clip_package_says_make_install(monkeypatch, cache_dir):
    monkeypatch.setattr(tok_mod, "_PACKAGES", (("no_such_module_xyz", "no-such-dist-xyz"),))
    with pytest.raises(UserError, match="make install"):
        tok_mod.load_offline_tokenizer()
