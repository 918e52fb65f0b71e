"""The small transformer language model (with dropout) the resume jobs train."""
from torch import nn


class TinyLM(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, vocab)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)))
