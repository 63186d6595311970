"""FeatureCache: features of the frozen bottom, keyed by tokens, reused across padding, persisted to disk."""
import jax
import numpy as np

from notellm_jax.train.feature_cache import FeatureCache, cache_path, fingerprint
from notellm_jax.model.llama import preset
from notellm_jax.model.params import init_params
from notellm_jax.model.notellm import NoteLLM
from notellm_jax.sharding import make_mesh

FROZEN = 2


def _setup():
    cfg = preset("tiny")
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

    cache = FeatureCache(model, mesh, FROZEN, chunk=2, path=tmp_path / "cache.npz")
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
    reloaded = FeatureCache(model, mesh, FROZEN, path=tmp_path / "cache.npz")
    np.testing.assert_array_equal(reloaded.features(frozen, ids, mask), got)
    assert (reloaded.misses, reloaded.hits) == (0, 3)


def test_cache_path_changes_with_the_frozen_weights(tmp_path):
    _, _, frozen, _ = _setup()
    changed = jax.tree.map(lambda x: x, frozen)
    changed["decoder"]["layers_0"]["mlp"]["up_proj"]["kernel"] = \
        np.asarray(changed["decoder"]["layers_0"]["mlp"]["up_proj"]["kernel"]) + 1e-3
    assert fingerprint(frozen) == fingerprint(jax.tree.map(np.asarray, frozen))
    assert cache_path(tmp_path, "m.gguf", FROZEN, frozen) != cache_path(tmp_path, "m.gguf", FROZEN, changed)
