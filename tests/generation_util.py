"""Helpers of the generation tests: random prompts in Mistral's vocabulary and a small logits processor."""
import math

import torch

VOCAB = 32000   # Mistral's tokenizer, so that text tests and model tests share one vocabulary


def random_prompts(*lengths):
    return [torch.randint(3, VOCAB, (n,)).tolist() for n in lengths]


class AllowOnly:
    """A logits processor allowing `tokens` at every step (a small vocabulary makes ends and ties of rank common,
    and tokens the model finds improbable make its log-probabilities small); it has no state, so reorder only
    counts its calls."""

    def __init__(self, tokens):
        self.tokens = torch.tensor(tokens)
        self.reorders = 0

    def reset(self, batch_size):
        """No state to reset."""

    def mask(self, logits, rows):
        keep = logits[:, self.tokens].clone()
        logits.fill_(-math.inf)
        logits[:, self.tokens] = keep

    def advance(self, row, token_id):
        assert token_id in self.tokens.tolist()

    def reorder(self, rows, sources):
        self.reorders += 1
