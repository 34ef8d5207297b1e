"""Released RVSE++ / VSE-infinity BiGRU checkpoints: names, shapes and outputs.

The released modules are rebuilt here from their published structure (names and shapes
only: ``EncoderImageAggr`` / RVSE++ ``ImageEncoder`` with ``fc``, ``mlp.layers``,
``mlp.bns`` and ``gpool``; ``EncoderText`` / ``TextEncoder`` with ``embed``, ``rnn`` and
``gpool``), their forward written the way that code computes it, and their state dicts
saved as the released trainers save them.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rvsepp.cli import main
from rvsepp.model import sinusoidal_positions
from rvsepp.released import (
    ReleasedCheckpointError,
    infer_architecture,
    load_for_eval,
    released_state_dict,
)

FEATURES, EMBED, WORD, PE, HIDDEN = 12, 8, 6, 4, 4
WORDS = ["a", "dog", "runs", "cat", "sits", "red", "ball"]


class ReleasedMLP(nn.Module):
    """The released MLP: Linear layers in ``layers``, one BatchNorm per layer in ``bns``
    (the last one built but never applied)."""

    def __init__(self, inputs: int, hidden: int, outputs: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(inputs, hidden), nn.Linear(hidden, outputs)])
        self.bns = nn.ModuleList([nn.BatchNorm1d(hidden), nn.BatchNorm1d(outputs)])

    def forward(self, x):
        batch, width, dim = x.shape
        x = F.relu(self.bns[0](self.layers[0](x.reshape(batch * width, dim))))
        return self.layers[1](x).view(batch, width, -1)


class ReleasedGPO(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(PE, HIDDEN, 1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(HIDDEN, 1, bias=False)

    def forward(self, features, lengths):
        """Position scores item by item (no packing), then the sorted weighted sum."""
        pooled = []
        for item, length in enumerate(lengths.tolist()):
            out, _ = self.gru(sinusoidal_positions(length, PE).unsqueeze(0))
            out = (out[..., :HIDDEN] + out[..., HIDDEN:]) / 2
            weights = torch.softmax(self.linear(out)[0] / 0.1, dim=0)
            ranked = features[item, :length].sort(dim=0, descending=True).values
            pooled.append((ranked * weights).sum(dim=0))
        return torch.stack(pooled)


class ReleasedImageEncoder(nn.Module):
    def __init__(self, parallel: bool) -> None:
        super().__init__()
        self.parallel = parallel
        self.fc = nn.Linear(FEATURES, EMBED)
        self.mlp = ReleasedMLP(FEATURES if parallel else EMBED, EMBED // 2, EMBED)
        self.gpool = ReleasedGPO()

    def forward(self, images, lengths):
        features = self.fc(images)
        features = self.mlp(images if self.parallel else features) + features
        return F.normalize(self.gpool(features, lengths), dim=-1)


class ReleasedTextEncoder(nn.Module):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, WORD)
        self.rnn = nn.GRU(WORD, EMBED, 1, batch_first=True, bidirectional=True)
        self.gpool = ReleasedGPO()

    def forward(self, tokens, lengths):
        out = []
        for item, length in enumerate(lengths.tolist()):
            states, _ = self.rnn(self.embed(tokens[item : item + 1, :length]))
            out.append((states[0, :, :EMBED] + states[0, :, EMBED:]) / 2)
        padded = nn.utils.rnn.pad_sequence(out, batch_first=True)
        return F.normalize(self.gpool(padded, lengths), dim=-1)


def released_models(parallel: bool, vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    image, text = ReleasedImageEncoder(parallel), ReleasedTextEncoder(vocab_size)
    with torch.no_grad():  # non-trivial BatchNorm state, as after training
        for bn in image.mlp.bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.num_batches_tracked.fill_(123)
    return image.eval(), text.eval()


def scan_vocab_file(path) -> None:
    words = ["<pad>", "<start>", "<end>", "<unk>", *WORDS]
    path.write_text(json.dumps({
        "word2idx": {w: i for i, w in enumerate(words)},
        "idx2word": {str(i): w for i, w in enumerate(words)},
        "idx": len(words),
    }))  # fmt: skip


def save_released_checkpoint(path, image, text, legacy: bool = False) -> None:
    """As the released ``save_checkpoint``: options as an argparse.Namespace."""
    opt = argparse.Namespace(data_name="f30k_precomp", embed_size=EMBED, word_dim=WORD,
                             img_dim=FEATURES, margin=0.2, max_violation=True)  # fmt: skip
    payload = {"epoch": 17, "model": [image.state_dict(), text.state_dict()], "best_rsum": 501.5,
               "opt": opt, "Eiters": 12345}  # fmt: skip
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)


@pytest.mark.parametrize(("parallel", "legacy"), [(False, False), (True, False), (False, True)])
def test_released_checkpoint_loads_and_gives_the_released_embeddings(tmp_path, parallel, legacy):
    vocab_path = tmp_path / "f30k_precomp_vocab.json"
    scan_vocab_file(vocab_path)
    vocab_size = 4 + len(WORDS) + 1  # the released loader appends <mask>
    image, text = released_models(parallel, vocab_size)
    path = tmp_path / "model_best.pth"
    save_released_checkpoint(path, image, text, legacy)

    loaded = load_for_eval(path, "cpu", vocab_path)
    assert loaded.config.image_mlp == ("parallel" if parallel else "residual")
    assert loaded.config.tokenizer == "nltk" and loaded.feature_dim == FEATURES
    assert "epoch 17" in loaded.description and "501.5" in loaded.description
    model = loaded.model
    assert not model.training and loaded.vocab.mask_id == vocab_size - 1

    torch.manual_seed(1)
    lengths = torch.tensor([5, 3, 1])
    regions = torch.randn(3, 5, FEATURES)
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_images(regions, lengths), image(regions, lengths), rtol=1e-5, atol=1e-6
        )
        tokens = torch.tensor([[1, 4, 5, 6, 2], [1, 7, 8, 2, 0], [1, 11, 3, 2, 0]])
        token_lengths = torch.tensor([5, 4, 4])
        ours = model.encode_texts({"tokens": tokens, "lengths": token_lengths})
        torch.testing.assert_close(ours, text(tokens, token_lengths), rtol=1e-5, atol=1e-6)
    # The unused second BatchNorm is dropped; everything else is accounted for.
    renamed = released_state_dict(image.state_dict(), text.state_dict())
    assert set(renamed) == set(model.state_dict())


def test_released_names_and_shapes_map_one_to_one():
    image, text = released_models(False, 20)
    renamed = released_state_dict(image.state_dict(), text.state_dict())
    image_state = image.state_dict()
    assert torch.equal(
        renamed["image_encoder.mlp.1.running_var"], image_state["mlp.bns.0.running_var"]
    )
    assert torch.equal(renamed["image_encoder.mlp.3.weight"], image_state["mlp.layers.1.weight"])
    assert torch.equal(
        renamed["image_encoder.gpo.score.weight"], image_state["gpool.linear.weight"]
    )
    assert torch.equal(renamed["text_encoder.gru.weight_hh_l0_reverse"],
                       text.state_dict()["rnn.weight_hh_l0_reverse"])  # fmt: skip
    # A DataParallel prefix is accepted.
    wrapped = {f"module.{k}": v for k, v in text.state_dict().items()}
    assert released_state_dict(image_state, wrapped).keys() == renamed.keys()
    arch = infer_architecture(image_state, text.state_dict(), None)
    assert (arch.feature_dim, arch.embed_dim, arch.word_dim, arch.vocab_size) == (12, 8, 6, 20)
    assert (arch.gpo_pe_dim, arch.gpo_hidden, arch.image_mlp) == (4, 4, "residual")


def test_released_checkpoint_errors(tmp_path):
    vocab_path = tmp_path / "vocab.json"
    scan_vocab_file(vocab_path)
    image, text = released_models(False, 4 + len(WORDS) + 1)
    path = tmp_path / "model_best.pth"
    save_released_checkpoint(path, image, text)
    with pytest.raises(ReleasedCheckpointError, match="SCAN's vocabulary"):
        load_for_eval(path, "cpu", None)
    _, wrong_text = released_models(False, 30)
    save_released_checkpoint(tmp_path / "other.pth", image, wrong_text)
    with pytest.raises(ReleasedCheckpointError, match="30 rows"):
        load_for_eval(tmp_path / "other.pth", "cpu", vocab_path)
    extra = {**text.state_dict(), "rnn.weight_ih_l1": torch.zeros(3)}
    with pytest.raises(ReleasedCheckpointError, match="weight_ih_l1"):
        released_state_dict(image.state_dict(), extra)
    square = {**image.state_dict(), "fc.weight": torch.zeros(EMBED, EMBED)}
    with pytest.raises(ReleasedCheckpointError, match="cannot tell the image MLP"):
        infer_architecture(square, text.state_dict(), None)
    torch.save({"something": 1}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="neither an rvsepp checkpoint"):
        load_for_eval(tmp_path / "foreign.pth")


def test_eval_command_accepts_a_released_checkpoint(tmp_path, capsys):
    data = tmp_path / "f30k_precomp"
    data.mkdir()
    rng = np.random.default_rng(0)
    np.save(data / "test_ims.npy", rng.normal(size=(4, 6, FEATURES)).astype(np.float32))
    captions = [f"A {w} dog runs." for w in ("red", "cat", "ball", "sits") for _ in range(5)]
    (data / "test_caps.txt").write_text("\n".join(captions) + "\n")
    vocab_path = tmp_path / "f30k_precomp_vocab.json"
    scan_vocab_file(vocab_path)
    image, text = released_models(False, 4 + len(WORDS) + 1)
    save_released_checkpoint(tmp_path / "model_best.pth", image, text)
    status = main(["eval", "--data", str(data), "--checkpoint", str(tmp_path / "model_best.pth"),
                   "--vocab", str(vocab_path), "--device", "cpu"])  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0, out
    assert "released RVSE++ checkpoint" in out and "4 images, 20 captions" in out
    assert "argsort" in out and "pessimistic" in out
