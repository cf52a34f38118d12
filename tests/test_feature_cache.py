"""The frozen-encoder token cache: round trip, reuse by fingerprint, and a stream positioned by batch index."""

import itertools

import torch

from lavis_lite.config import VisionConfig
from lavis_lite.data.feature_cache import FeatureCache, build_feature_cache, cache_fingerprint, cached_batches


def fake_batches(count: int, size: int = 5):
    for start in range(0, count, size):
        n = min(size, count - start)
        yield {"image": torch.arange(start, start + n).float()[:, None, None].expand(n, 3, 4),
               "key": [f"k{i}" for i in range(start, start + n)], "caption": [f"c{i}" for i in range(start, start + n)]}


def tokenize(captions):
    return {"input_ids": torch.tensor([[int(c[1:])] for c in captions]), "attention_mask": torch.ones(len(captions), 1)}


def test_round_trip_and_reuse(tmp_path):
    encoder = lambda images: images * 2  # noqa: E731  [B, 3, 4] "tokens"
    cache = build_feature_cache(encoder, fake_batches(23), tmp_path / "c", "fp1", chunk_size=8)
    assert len(cache) == 23 and cache.keys[7] == "k7" and cache.captions[22] == "c22"
    torch.testing.assert_close(cache.tokens([22, 3]), torch.tensor([44.0, 6.0])[:, None, None].expand(2, 3, 4))
    untouched = build_feature_cache(lambda x: 1 / 0, fake_batches(23), tmp_path / "c", "fp1")
    assert len(untouched) == 23, "a complete cache with the same fingerprint is reused"
    assert not FeatureCache.is_complete(tmp_path / "c", "fp2")


def test_micro_batches_give_the_same_tokens(tmp_path):
    calls = []

    def encoder(images):
        calls.append(len(images))
        return images * 2

    whole = build_feature_cache(lambda images: images * 2, fake_batches(23, size=10), tmp_path / "whole", "fp")
    split = build_feature_cache(encoder, fake_batches(23, size=10), tmp_path / "split", "fp", micro_batch=4)
    assert calls == [4, 4, 2, 4, 4, 2, 3], "each loader batch is encoded in micro-batches of at most 4"
    assert split.keys == whole.keys
    torch.testing.assert_close(split.tokens(range(23)), whole.tokens(range(23)), rtol=0, atol=0)


def test_stream_is_a_function_of_the_batch_index(tmp_path):
    cache = build_feature_cache(lambda x: x, fake_batches(40), tmp_path / "c", "fp")
    straight = list(itertools.islice(cached_batches(cache, tokenize, 4, seed=3), 25))
    resumed = list(itertools.islice(cached_batches(cache, tokenize, 4, seed=3, start_batch=17), 8))
    for a, b in zip(straight[17:], resumed):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["vision_tokens"], b["vision_tokens"])
    epoch = torch.cat([b["input_ids"] for b in straight[:10]]).flatten()
    assert sorted(epoch.tolist()) == list(range(40)), "each epoch is a permutation of the cache"
    ranks = [next(cached_batches(cache, tokenize, 4, seed=3, rank=r, world_size=2))["input_ids"] for r in (0, 1)]
    assert set(ranks[0].flatten().tolist()).isdisjoint(ranks[1].flatten().tolist())


def test_fingerprint_follows_encoder_and_shards(tmp_path):
    shard = tmp_path / "a.tar"
    shard.write_bytes(b"x")
    base = cache_fingerprint(VisionConfig(kind="vit"), 32, [str(shard)])
    assert base == cache_fingerprint(VisionConfig(kind="vit"), 32, [str(shard)])
    assert base != cache_fingerprint(VisionConfig(kind="vit", width=48), 32, [str(shard)])
    assert base != cache_fingerprint(VisionConfig(kind="vit"), 64, [str(shard)])
    shard.write_bytes(b"xy")
    assert base != cache_fingerprint(VisionConfig(kind="vit"), 32, [str(shard)])
