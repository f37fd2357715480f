"""Small model builders from `transformers` configs, shared by the demo, examples and tests.

Nothing is downloaded: every model is built from a config with random weights.
"""

from __future__ import annotations

import torch

from autopart.errors import AutopartError


def gpt2(
    *,
    n_layer: int,
    n_embd: int,
    n_head: int,
    seq: int,
    vocab: int,
    device: str | torch.device = "cpu",
    dropout: float = 0.1,
    seed: int = 0,
):
    """A GPT-2 language model and one sample of token ids, ``(model, (input_ids,))``."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as err:
        raise AutopartError(
            "GPT models need `transformers`: pip install 'autopart[models]'"
        ) from err
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=seq,
        vocab_size=vocab,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        use_cache=False,
        # The default token ids (50256) lie outside small vocabularies.
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = GPT2LMHeadModel(config)
        input_ids = torch.randint(0, vocab, (1, seq)) if str(device) != "meta" else None
    if input_ids is None:
        input_ids = torch.zeros(1, seq, dtype=torch.long, device="meta")
    return model, (input_ids,)
