"""Small torch models for the demo repository, and a deterministic training loop.

Each is the smallest network of its family that learns its synthetic task in a few epochs on
two CPU cores; they exist to exercise the exporter and the server, not as clinical models.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import nn


class RiskMLP(nn.Module):
    """Tabular measurements [n, features] -> logits over (low, high) risk."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_features, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DigitsCNN(nn.Module):
    """8x8 grey images [n, 1, 8, 8] -> logits over the 10 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class ECGCNN1d(nn.Module):
    """Multi-lead signals [n, leads, samples] -> logits (regular, irregular rhythm). Global
    average pooling over time makes any recording length acceptable; downsampling is a strided
    convolution because torch.export cannot keep the length variable through MaxPool1d."""

    def __init__(self, leads: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(leads, 8, 7, padding=3),
            nn.ReLU(),
            nn.Conv1d(8, 16, 5, stride=2, padding=2),
            nn.ReLU(),
        )
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=-1))


class VitalsGRU(nn.Module):
    """Vitals sequences [n, time, vitals] of any length -> one deterioration logit [n, 1]."""

    def __init__(self, n_vitals: int, hidden: int = 16) -> None:
        super().__init__()
        self.gru = nn.GRU(n_vitals, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, last = self.gru(x)
        return self.head(last[-1])


class NotesTransformer(nn.Module):
    """Token ids and attention mask [n, length] -> logits (routine, concerning).

    Padding is masked out of attention and out of the mean over tokens, so the answer for a note
    does not depend on how far it was padded."""

    def __init__(self, vocab: int, width: int = 32, heads: int = 4, max_length: int = 512) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(max_length, width)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(width, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.tokens(input_ids) + self.positions(positions)[None]
        h = self.encoder(h, src_key_padding_mask=attention_mask == 0)
        keep = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0))


class TriageHead(nn.Module):
    """A pooled sentence embedding [n, width] -> logits over the triage classes (a small MLP
    trained on a frozen pretrained encoder's embeddings)."""

    def __init__(self, width: int, classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.net(embedding)


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seeded, single-threaded, deterministic torch for the block; the caller's RNG state,
    thread count and determinism setting are restored afterwards."""
    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_deterministic)
            torch.set_num_threads(threads)


def train(
    model: nn.Module,
    inputs: np.ndarray | Mapping[str, np.ndarray],
    targets: np.ndarray,
    *,
    epochs: int,
    seed: int,
    batch_size: int = 64,
    lr: float = 1e-2,
) -> nn.Module:
    """Adam on cross-entropy (or BCE for one logit), seeded minibatch order; returns the model
    in eval mode. Call inside `deterministic(seed)`."""
    arrays = list(inputs.values()) if isinstance(inputs, Mapping) else [inputs]
    tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    y = torch.from_numpy(np.ascontiguousarray(targets))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=order).split(batch_size):
            logits = model(*(t[idx] for t in tensors))
            if logits.shape[-1] == 1:
                loss = nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y[idx].float())
            else:
                loss = nn.functional.cross_entropy(logits, y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()
