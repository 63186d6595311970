"""FeatureCache: features of the frozen bottom, keyed by tokens, reused across padding, persisted to disk
incrementally, stored in the compute dtype under a size cap, all misses of a batch in one call whose row
count follows the misses (a bucket), not the batch."""
import jax
import jax.numpy as jnp
import numpy as np

from notellm_jax.infer.feature_cache import FeatureCache, cache_path, fingerprint
from notellm_jax.model.families import preset
from notellm_jax.model.params import init_params
from notellm_jax.model.notellm import NoteLLM
from notellm_jax.sharding import make_mesh

FROZEN = 2


def _setup(**runtime):
    cfg = preset("tiny", **runtime)
    model = NoteLLM(cfg, emb_dim=8)
    frozen = {"decoder": {k: v for k, v in init_params(cfg, jax.random.key(0)).items()
                          if k == "embed_tokens" or k in {f"layers_{i}" for i in range(FROZEN)}}}
    return cfg, model, frozen, make_mesh(1, 1, 1, devices=jax.devices()[:1])


def _padded(seqs, length, side):
    ids = np.zeros((len(seqs), length), np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for row, seq in enumerate(seqs):
        sl = slice(length - len(seq), length) if side == "left" else slice(0, len(seq))
        ids[row, sl] = seq
        mask[row, sl] = 1
    return ids, mask


def test_features_match_the_bottom_and_are_reused_across_padding(tmp_path):
    cfg, model, frozen, mesh = _setup()
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (5, 9, 12)]
    ids, mask = _padded(seqs, 16, "right")
    direct = np.asarray(model.apply({"params": frozen}, ids, mask, FROZEN, method=NoteLLM.bottom))

    cache = FeatureCache(model, mesh, FROZEN, path=tmp_path / "cache")
    got = cache.features(frozen, ids, mask)
    np.testing.assert_allclose(got[mask > 0], direct[mask > 0], atol=1e-6)
    assert (got[mask == 0] == 0).all()
    assert (cache.misses, cache.hits) == (3, 0)

    # Same sequences, left padded to another length: all hits, same features at the real tokens.
    ids_left, mask_left = _padded(seqs[::-1], 20, "left")
    left = cache.features(frozen, ids_left, mask_left)
    assert (cache.misses, cache.hits) == (3, 3)
    for row, seq in enumerate(seqs[::-1]):
        np.testing.assert_allclose(left[row][mask_left[row] > 0], direct[2 - row][: len(seq)], atol=1e-6)

    cache.save()
    reloaded = FeatureCache(model, mesh, FROZEN, path=tmp_path / "cache")
    np.testing.assert_array_equal(reloaded.features(frozen, ids, mask), got)
    assert (reloaded.misses, reloaded.hits) == (0, 3)


def test_cache_path_changes_with_the_frozen_weights(tmp_path):
    _, _, frozen, _ = _setup()
    changed = jax.tree.map(lambda x: x, frozen)
    changed["decoder"]["layers_0"]["mlp"]["up_proj"]["kernel"] = \
        np.asarray(changed["decoder"]["layers_0"]["mlp"]["up_proj"]["kernel"]) + 1e-3
    assert fingerprint(frozen) == fingerprint(jax.tree.map(np.asarray, frozen))
    assert cache_path(tmp_path, "m.gguf", FROZEN, frozen) != cache_path(tmp_path, "m.gguf", FROZEN, changed)


def test_bf16_store_size_cap_one_call_per_batch_and_incremental_parts(tmp_path):
    cfg, model, frozen, mesh = _setup(compute_dtype="bfloat16")
    rng = np.random.default_rng(1)
    seqs = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (4, 6, 7, 9)]
    ids, mask = _padded(seqs, 12, "left")
    direct = np.asarray(model.apply({"params": frozen}, ids, mask, FROZEN, method=NoteLLM.bottom), np.float32)
    close = dict(rtol=3e-2, atol=2e-3)  # bf16: the cache's jitted bottom fuses differently from eager apply
    one_row = 4 * cfg.hidden_size * 2  # the first sequence's features in bf16
    cache = FeatureCache(model, mesh, FROZEN, path=tmp_path / "cache", max_bytes=one_row * 2.5)
    calls = []
    bottom = cache._bottom
    cache._bottom = lambda *args: calls.append(args[1].shape) or bottom(*args)

    got = cache.features(frozen, ids[:2], mask[:2])
    assert calls == [(2, 12)] and got.dtype == jnp.bfloat16 and cache.bytes == one_row * 2.5
    np.testing.assert_allclose(np.float32(got[mask[:2] > 0]), direct[:2][mask[:2] > 0], **close)
    cache.save()
    # Rows 2 and 3 miss: one call for both; the store is full, so they are returned but not kept.
    got = cache.features(frozen, ids, mask)
    assert calls[1:] == [(4, 12)] and (cache.misses, cache.hits, cache.uncached) == (4, 2, 2)
    np.testing.assert_allclose(np.float32(got[mask > 0]), direct[mask > 0], **close)
    assert len(cache.store) == 2
    cache.save()  # nothing new: no second part
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["part-00000.npz"]

    bigger = FeatureCache(model, mesh, FROZEN, path=tmp_path / "cache")
    assert len(bigger.store) == 2 and bigger.features(frozen, ids, mask).dtype == jnp.bfloat16
    bigger.save()  # appends rows 2 and 3 as a second part; the first part is not rewritten
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["part-00000.npz", "part-00001.npz"]
    again = FeatureCache(model, mesh, FROZEN, path=tmp_path / "cache")
    np.testing.assert_array_equal(again.features(frozen, ids, mask), got)
    assert (again.misses, again.hits) == (0, 4)


def test_misses_run_in_a_bucket_sized_by_the_misses_not_the_batch():
    cfg, model, frozen, mesh = _setup()
    rng = np.random.default_rng(2)
    seqs = [rng.integers(3, cfg.vocab_size, int(n)).tolist() for n in rng.integers(3, 14, 32)]
    ids, mask = _padded(seqs, 16, "right")
    direct = np.asarray(model.apply({"params": frozen}, ids, mask, FROZEN, method=NoteLLM.bottom))
    cache = FeatureCache(model, mesh, FROZEN, min_rows=4)
    calls = []
    bottom = cache._bottom
    cache._bottom = lambda *args: calls.append(args[1].shape[0]) or bottom(*args)
    # 32-row batches holding sequences 0..n-1, the rest repeats of sequence 0: the new sequences number
    # 3, then 5, then 24, so the bottom runs 4, 8 and 32 rows (the last capped at the batch).
    for n in (3, 8, 32):
        batch = list(range(n)) + [0] * (32 - n)
        got = cache.features(frozen, ids[batch], mask[batch])
        np.testing.assert_allclose(got[mask[batch] > 0], direct[batch][mask[batch] > 0], atol=1e-6)
    assert calls == [4, 8, 32]
    assert (cache.misses, cache.hits) == (32, 3 * 32 - 32)
    assert [cache.bucket(m, 32) for m in (1, 4, 5, 9, 17, 32)] == [4, 4, 8, 16, 32, 32]
    assert [cache.bucket(m, 24) for m in (1, 17, 24)] == [4, 24, 24]


def _key(seq) -> bytes:
    ids, mask = _padded([seq], 8, "right")
    return FeatureCache.key(ids[0], mask[0])


def test_lru_cap_evicts_the_least_recently_used_like_a_hand_run_list():
    """The service's cache (`lru=True`) against a plain list kept in use order, on a hand-built access
    sequence; a batch whose misses evict its own hits still returns every row's features."""
    cfg, model, frozen, mesh = _setup()
    rng = np.random.default_rng(3)
    seqs = {name: rng.integers(3, cfg.vocab_size, 5).tolist() for name in "ABCDE"}
    ids, mask = _padded(list(seqs.values()), 8, "right")
    direct = dict(zip(seqs, np.asarray(model.apply({"params": frozen}, ids, mask, FROZEN, method=NoteLLM.bottom))))
    one = 5 * cfg.hidden_size * 4  # one sequence's float32 features
    cache = FeatureCache(model, mesh, FROZEN, max_bytes=3 * one, lru=True, min_rows=1)
    used: list[str] = []  # the reference: least recently used first, at most 3
    for name in "ABCADBEAEC":
        hit = name in used
        used = [n for n in used if n != name] + [name]
        used = used[-3:]
        hits, misses = cache.hits, cache.misses
        got = cache.features(frozen, *_padded([seqs[name]], 8, "right"))
        assert (cache.hits - hits, cache.misses - misses) == (int(hit), int(not hit)), name
        np.testing.assert_allclose(got[0, :5], direct[name][:5], atol=1e-6)
        assert list(cache.store) == [_key(seqs[n]) for n in used]
        assert (cache.entries, cache.size_bytes) == (len(used), len(used) * one)
    assert cache.evicted == 10 - 3 - 2  # 7 misses (A B C D E, then A and C again), 3 entries kept
    # used is [A, E, C]; this batch hits A and E (now [C, A, E]) and misses B and D, whose storing evicts C and
    # then A, a hit of this very batch: every row still gets its features.
    got = cache.features(frozen, *_padded([seqs[n] for n in "ABDE"], 8, "right"))
    for row, name in enumerate("ABDE"):
        np.testing.assert_allclose(got[row, :5], direct[name][:5], atol=1e-6)
    assert list(cache.store) == [_key(seqs[n]) for n in "EBD"]
    big = FeatureCache(model, mesh, FROZEN, max_bytes=one - 1, lru=True, min_rows=1)
    big.features(frozen, *_padded([seqs["A"]], 8, "right"))
    assert (big.entries, big.uncached) == (0, 1)
