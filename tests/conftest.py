"""Tiny models built in the test from configs (never downloaded)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")   # Triton kernels run on CPU tensors (read at import)

import pytest  # noqa: E402
import torch  # noqa: E402

HIDDEN, INTER, LAYERS, VOCAB = 80, 144, 2, 101   # 80 and 144 are not multiples of 32


def tiny_config(family: str):
    import transformers as tf
    common = dict(vocab_size=VOCAB)
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family]
        return cls(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                   num_attention_heads=4, num_key_value_heads=2, **common)
    if family == "gemma3":
        return tf.Gemma3TextConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=20,
                                   sliding_window=16, **common)
    if family == "opt":
        return tf.OPTConfig(hidden_size=HIDDEN, ffn_dim=INTER, num_hidden_layers=LAYERS,
                            num_attention_heads=4, word_embed_proj_dim=HIDDEN,
                            max_position_embeddings=256, **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=HIDDEN, n_inner=INTER, n_layer=LAYERS, n_head=4, n_positions=256,
                             **common)
    if family == "bert":
        return tf.BertConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                             num_attention_heads=4, max_position_embeddings=256, **common)
    raise ValueError(family)


FAMILIES = ("llama", "mistral", "qwen2", "gemma3", "opt", "gpt2", "bert")
EXPECTED_LINEARS = {"llama": 7, "mistral": 7, "qwen2": 7, "gemma3": 7, "opt": 6, "gpt2": 4, "bert": 6}


def tiny_model(family: str, seed: int = 0):
    import transformers as tf
    torch.manual_seed(seed)
    config = tiny_config(family)
    cls = {"gemma3": tf.Gemma3ForCausalLM, "bert": tf.BertModel, "gpt2": tf.GPT2LMHeadModel,
           "opt": tf.OPTForCausalLM}.get(family) or tf.AutoModelForCausalLM
    model = cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)
    return model.float().eval()


def token_batches(n: int = 4, seqlen: int = 32, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, seqlen), generator=g)
    return list(ids.split(batch))


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)
