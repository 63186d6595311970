"""ScaNN index: recall relative to exact search at the default settings, save/reload, parameter rules."""
import importlib.util

import numpy as np
import pytest

from notellm_jax.config import RetrievalConfig
from notellm_jax.errors import StoreFormatError
from notellm_jax.infer import ann
from notellm_jax.eval.retrieval import exact_topk
from notellm_jax.infer.ann import neighbour_overlap

if importlib.util.find_spec("scann") is None:  # absent on the GPU machines by design (ENVIRONMENT.md)
    pytest.skip("scann is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def clustered():
    vectors = ann.clustered_vectors(20_500, 64, 150, seed=0)
    return vectors[500:], vectors[:500]  # database, queries from the same distribution


def test_default_tree_index_recall_vs_exact(clustered, tmp_path):
    database, queries = clustered
    params = ann.choose_params(len(database), 10, RetrievalConfig())
    assert not params.brute_force and params.num_leaves == round(len(database) ** 0.5)
    searcher = ann.build_index(database, 10, params)
    approx, scores = ann.search(searcher, queries, 10)
    exact, exact_scores = exact_topk(queries, database, 10)
    assert neighbour_overlap(approx, exact) >= 0.95
    np.testing.assert_allclose(scores[:, 0], exact_scores[:, 0], atol=1e-5)  # exact reorder: true cosines

    reloaded = ann.load_index(ann.save_index(searcher, tmp_path / "index"))
    again, again_scores = ann.search(reloaded, queries, 10)
    np.testing.assert_array_equal(again, approx)
    np.testing.assert_array_equal(again_scores, scores)


def test_small_pool_is_brute_force_and_exact():
    rng = np.random.default_rng(1)
    database, queries = rng.normal(size=(800, 16)), rng.normal(size=(40, 16))
    params = ann.choose_params(len(database), 20, RetrievalConfig())
    assert params.brute_force
    approx, _ = ann.search(ann.build_index(database, 20, params), queries, 20)
    exact, _ = exact_topk(queries / np.linalg.norm(queries, axis=1, keepdims=True),
                          database / np.linalg.norm(database, axis=1, keepdims=True), 20)
    assert neighbour_overlap(approx, exact) == 1.0


def test_param_rules_and_errors(tmp_path):
    assert ann.choose_params(40_000, 10, RetrievalConfig()) == ann.ScannParams(200, 20, 250)
    assert ann.choose_params(40_000, 100, RetrievalConfig()).reorder == 1000
    custom = RetrievalConfig(scann_num_leaves=50, scann_leaves_to_search=5, scann_reorder=64)
    assert ann.choose_params(900, 10, custom) == ann.ScannParams(50, 5, 64)
    with pytest.raises(ValueError, match="k=11 is outside 1..10"):
        ann.choose_params(10, 11, RetrievalConfig())
    with pytest.raises(ValueError, match="scann_reorder=5 is smaller than k=10"):
        ann.choose_params(100, 10, RetrievalConfig(scann_reorder=5))
    with pytest.raises(ValueError, match="leaves_to_search=60 exceeds num_leaves=50"):
        ann.choose_params(1000, 10, RetrievalConfig(scann_num_leaves=50, scann_leaves_to_search=60))
    with pytest.raises(FileNotFoundError, match="holds no ScaNN index"):
        ann.load_index(tmp_path)


def test_index_saved_under_a_relative_path_reloads(tmp_path, monkeypatch):
    """ScaNN records asset paths as given: a relative folder (the main job's default) must still reload."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    database = rng.normal(size=(300, 16)).astype(np.float32)
    queries = rng.normal(size=(20, 16)).astype(np.float32)
    searcher = ann.build_index(database, 5, ann.choose_params(len(database), 5, RetrievalConfig()))
    ann.save_index(searcher, "runs/x/scann_index")
    reloaded = ann.load_index("runs/x/scann_index")
    np.testing.assert_array_equal(ann.search(reloaded, queries, 5)[0], ann.search(searcher, queries, 5)[0])


def test_index_folder_holds_no_pickle_and_one_is_refused(tmp_path):
    """ScaNN's load_searcher unpickles scann_docids.pkl; the project's loader refuses any pickle instead
    (a planted one here would run code on load), and save never writes one."""
    scann_ops_pybind = ann.scann_pybind()

    rng = np.random.default_rng(2)
    database = rng.normal(size=(200, 8)).astype(np.float32)
    searcher = ann.build_index(database, 3, ann.choose_params(len(database), 3, RetrievalConfig()))
    folder = ann.save_index(searcher, tmp_path / "index")
    assert not list(folder.rglob("*.pkl"))
    moved = folder.rename(tmp_path / "moved")  # relative asset paths: the folder can be moved
    queries = database[:5]
    np.testing.assert_array_equal(ann.search(ann.load_index(moved), queries, 3)[0], ann.search(searcher, queries, 3)[0])
    (moved / "scann_docids.pkl").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(StoreFormatError, match="refusing to load an index folder holding pickle files"):
        ann.load_index(moved)
    with_docids = scann_ops_pybind.builder(ann.l2_normalise(database), 3, "dot_product").score_brute_force().build(
        docids=[str(i) for i in range(len(database))])
    with pytest.raises(ValueError, match="keep ids outside ScaNN"):
        ann.save_index(with_docids, tmp_path / "other")
