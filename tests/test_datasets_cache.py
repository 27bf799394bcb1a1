"""Latent and text-embedding caches: reuse, invalidation, and damaged files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from datasets_tools import (
    LatentCache,
    LatentRequest,
    TextEmbeddingCache,
    compute_crop,
    module_identity,
    prepare_image,
)
from tests.datasets_helpers import save_image, tiny_vae

TARGET = (64, 64)


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


class CountingVAE:
    """Wraps the VAE and counts the images that go through its encoder."""

    def __init__(self, vae) -> None:
        self.vae, self.config, self.images = vae, vae.config, 0

    def parameters(self):
        return self.vae.parameters()

    def encode(self, x):
        self.images += x.shape[0]
        return self.vae.encode(x)


def dataset(root: Path, n: int = 3) -> list[LatentRequest]:
    paths = [save_image(root / f"img{i}.png", (80, 64), seed=i) for i in range(n)]
    return [LatentRequest(p, compute_crop((80, 64), TARGET)) for p in paths]


def expected_latent(vae, path: Path, flip: bool = False) -> torch.Tensor:
    pixels = prepare_image(path, compute_crop((80, 64), TARGET), flip=flip).pixels
    with torch.no_grad():
        return vae.encode(pixels[None]).latent_dist.mode()[0] * vae.config.scaling_factor


def test_latents_are_the_scaled_mode_of_the_vae(tmp_path: Path, vae) -> None:
    requests = dataset(tmp_path)
    cache = LatentCache(vae, "vae-a")
    entry = cache.get(requests[0])
    assert entry.latent.shape == (4, 8, 8)
    assert torch.allclose(entry.latent, expected_latent(vae, requests[0].path), atol=1e-5)
    assert cache.get(requests[0]) is not None and cache.stats.encoded == 1  # memory reuse


def test_second_run_encodes_nothing(tmp_path: Path, vae) -> None:
    requests = dataset(tmp_path / "imgs")
    first = CountingVAE(vae)
    stats = LatentCache(first, "vae-a", tmp_path / "cache").build(requests, batch_size=2)
    assert (stats.encoded, stats.reused, first.images) == (3, 0, 3)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3
    second = CountingVAE(vae)
    cache = LatentCache(second, "vae-a", tmp_path / "cache")
    stats = cache.build(requests)
    assert (stats.encoded, stats.reused, second.images) == (0, 3, 0)
    entry = cache.get(requests[1])
    assert torch.allclose(entry.latent, expected_latent(vae, requests[1].path), atol=1e-5)
    assert second.images == 0


def test_editing_one_image_re_encodes_exactly_that_one(tmp_path: Path, vae) -> None:
    requests = dataset(tmp_path / "imgs")
    LatentCache(vae, "vae-a", tmp_path / "cache").build(requests)
    keys_before = {r.path: LatentCache(vae, "vae-a", tmp_path / "cache").key(r) for r in requests}
    save_image(requests[1].path, (80, 64), seed=99)  # same name, new content
    counting = CountingVAE(vae)
    cache = LatentCache(counting, "vae-a", tmp_path / "cache")
    stats = cache.build(requests)
    assert (stats.encoded, stats.reused, counting.images) == (1, 2, 1)
    assert {r.path: cache.key(r) != keys_before[r.path] for r in requests} == {
        requests[0].path: False, requests[1].path: True, requests[2].path: False}
    assert torch.allclose(cache.get(requests[1]).latent,
                          expected_latent(vae, requests[1].path), atol=1e-5)


def test_changed_vae_or_crop_never_reuses_a_latent(tmp_path: Path, vae) -> None:
    requests = dataset(tmp_path / "imgs", n=2)
    LatentCache(vae, "vae-a", tmp_path / "cache").build(requests)
    assert LatentCache(vae, "vae-b", tmp_path / "cache").build(requests).encoded == 2
    moved = [LatentRequest(r.path, compute_crop((80, 64), TARGET, "random",
                                                __import__("random").Random(1)))
             for r in requests]
    assert moved[0].crop != requests[0].crop
    assert LatentCache(vae, "vae-a", tmp_path / "cache").build(moved).encoded == 2
    assert LatentCache(vae, "vae-a", tmp_path / "cache").build(requests + moved).encoded == 0


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "empty", "other_key"])
def test_damaged_cache_file_is_detected_deleted_and_rebuilt(tmp_path, vae, damage) -> None:
    requests = dataset(tmp_path / "imgs", n=2)
    cache = LatentCache(vae, "vae-a", tmp_path / "cache")
    cache.build(requests)
    victim = cache.store.path_for(cache.key(requests[0]))
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":  # same length, one tensor byte changed
        victim.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    elif damage == "empty":
        victim.write_bytes(b"")
    else:
        victim.write_bytes(cache.store.path_for(cache.key(requests[1])).read_bytes())
    counting = CountingVAE(vae)
    again = LatentCache(counting, "vae-a", tmp_path / "cache")
    stats = again.build(requests)
    assert (stats.discarded, stats.encoded, stats.reused, counting.images) == (1, 1, 1, 1)
    assert victim.read_bytes() != b"" and again.store.load(again.key(requests[0])) is not None
    assert torch.allclose(again.get(requests[0]).latent,
                          expected_latent(vae, requests[0].path), atol=1e-5)


def test_interrupted_write_leaves_no_file_that_could_be_read(tmp_path, vae, monkeypatch) -> None:
    requests = dataset(tmp_path / "imgs", n=1)
    cache_dir = tmp_path / "cache"

    def crash(src, dst):  # noqa: ANN001
        raise KeyboardInterrupt  # e.g. the user stopped the run mid-write

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        LatentCache(vae, "vae-a", cache_dir).build(requests)
    monkeypatch.undo()
    assert list(cache_dir.iterdir()) == []  # neither a final file nor a stray temp file
    # A leftover temp file from a killed process is never mistaken for an entry.
    cache = LatentCache(vae, "vae-a", cache_dir)
    (cache_dir / f".{cache.key(requests[0])}.abc.tmp").write_bytes(b"partial")
    assert cache.build(requests).encoded == 1


def test_flip_variant_is_cached_with_the_entry(tmp_path: Path, vae) -> None:
    requests = dataset(tmp_path / "imgs", n=1)
    plain = LatentCache(vae, "vae-a", tmp_path / "cache")
    plain.build(requests)
    with_flip = [LatentRequest(r.path, r.crop, flip=True) for r in requests]
    counting = CountingVAE(vae)
    cache = LatentCache(counting, "vae-a", tmp_path / "cache")
    assert cache.build(with_flip).encoded == 1  # the old entry lacked the flipped latent
    assert counting.images == 2  # the image and its mirror
    entry = cache.get(with_flip[0])
    latent, mask = entry.pick(flip=True)
    assert mask is None
    assert torch.allclose(latent, expected_latent(vae, requests[0].path, flip=True), atol=1e-5)
    assert LatentCache(vae, "vae-a", tmp_path / "cache").build(with_flip + requests).encoded == 0


def test_alpha_mask_is_cached_at_latent_resolution(tmp_path: Path, vae) -> None:
    im = Image.new("RGBA", (64, 64), (255, 0, 0, 255))
    im.paste((0, 0, 0, 0), (32, 0, 64, 64))
    im.save(tmp_path / "a.png")
    request = LatentRequest(tmp_path / "a.png", compute_crop((64, 64), TARGET), flip=True,
                            mask=True)
    entry = LatentCache(vae, "vae-a", tmp_path / "cache").get(request)
    assert entry.mask is not None and entry.mask.shape == (1, 8, 8)
    assert entry.mask[0, :, :4].eq(1).all() and entry.mask[0, :, 4:].eq(0).all()
    assert entry.pick(flip=True)[1][0, :, :4].eq(0).all()
    reread = LatentCache(vae, "vae-a", tmp_path / "cache").get(request)
    assert torch.equal(reread.mask, entry.mask)


def test_module_identity_follows_the_weights(vae) -> None:
    other = tiny_vae(seed=1)
    assert module_identity(vae) == module_identity(tiny_vae(seed=0))
    assert module_identity(vae) != module_identity(other)


class CountingEncoder:
    def __init__(self, scale: float = 1.0) -> None:
        self.calls: list[list[str]] = []
        self.scale = scale

    def __call__(self, captions: list[str]) -> torch.Tensor:
        self.calls.append(captions)
        return torch.stack([torch.full((3, 2), float(len(c)) * self.scale) for c in captions])


def test_text_embeddings_are_cached_by_caption(tmp_path: Path) -> None:
    encoder = CountingEncoder()
    cache = TextEmbeddingCache(encoder, "te-a", tmp_path / "te")
    out = cache.get_many(["a cat", "a dog!", "a cat"])
    assert out.shape == (3, 3, 2) and out[0, 0, 0] == 5 and out[1, 0, 0] == 6
    assert encoder.calls == [["a cat", "a dog!"]]  # duplicates encoded once, in one call
    again = TextEmbeddingCache(CountingEncoder(), "te-a", tmp_path / "te")
    assert again.build(["a cat", "a dog!", "new"]).encoded == 1
    assert torch.equal(again.get("a dog!"), out[1])
    changed = TextEmbeddingCache(CountingEncoder(scale=2.0), "te-b", tmp_path / "te")
    assert changed.get("a cat")[0, 0] == 10  # another encoder id never reuses entries
    victim = cache.store.path_for(cache.key("a cat"))
    victim.write_bytes(victim.read_bytes()[:20])
    rebuilt = TextEmbeddingCache(CountingEncoder(), "te-a", tmp_path / "te")
    stats = rebuilt.build(["a cat"])
    assert (stats.discarded, stats.encoded) == (1, 1)
