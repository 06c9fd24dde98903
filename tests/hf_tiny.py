"""Tiny random Hugging Face models and an offline tokenizer, saved into folders, for tests.

    make_tokenizer()                       -> PreTrainedTokenizerFast (word-level, built in memory)
    make_model(kind, seed=0, **overrides)  -> (model, tokenizer); kind in KINDS
    save_tiny(folder, kind, seed=0, max_shard_size=None, **overrides) -> folder (config, safetensors, tokenizer)
    random_texts(n, seed=0, min_words=2, max_words=12) -> list[str]

Everything is built from configs (hidden 32, 2 layers, vocab ~100; qwen2: a byte-level BPE of 400); nothing
is downloaded.
"""

from __future__ import annotations

import os
import random

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = [f"w{i}" for i in range(90)]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[BOS]", "[EOS]"]
VOCAB_SIZE = 100  # >= len(SPECIALS) + len(WORDS)
CHAT_TEMPLATE = (
    "{% for m in messages %}[BOS] {{ m['role'] }} {{ m['content'] }} [EOS] {% endfor %}"
    "{% if add_generation_prompt %}[BOS] assistant {% endif %}"
)
KINDS = ("bert", "bert-cls", "gpt2", "gpt2-cls", "llama", "llama-cls", "mistral", "qwen2", "gemma3")


def make_tokenizer(kind: str = "bert"):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind == "qwen2":
        return _byte_level_bpe()
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + ["user", "assistant", "system"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind.startswith("bert"):
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
    elif kind.startswith("llama") or kind in ("mistral", "qwen2", "gemma3"):
        tok.post_processor = processors.TemplateProcessing(
            single="[BOS] $A", pair="[BOS] $A [BOS] $B", special_tokens=[("[BOS]", vocab["[BOS]"])]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        bos_token="[BOS]", eos_token="[EOS]", model_max_length=64,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


QWEN2_VOCAB_SIZE = 400  # >= the byte-level BPE's vocabulary


def _byte_level_bpe():
    """transformers loads every qwen2 folder's tokenizer as Qwen2Tokenizer (a byte-level BPE built from the
    file's vocab and merges), which turns the word-level one into nothing but [BOS]: qwen2 gets a byte-level
    BPE trained in memory (deterministic) on the same words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = WORDS + ["user", "assistant", "system"]
    trainer = trainers.BpeTrainer(vocab_size=QWEN2_VOCAB_SIZE, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(words)] * 3 + words, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]",
                                   eos_token="[EOS]", model_max_length=64)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_config(kind: str, **overrides):
    import transformers as T

    common = dict(vocab_size=VOCAB_SIZE, pad_token_id=0, bos_token_id=4, eos_token_id=5)
    if kind.startswith("bert"):
        cfg = T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           max_position_embeddings=64, hidden_dropout_prob=0.1, **common)
        cfg.architectures = ["BertForSequenceClassification" if kind == "bert-cls" else "BertModel"]
        if kind == "bert-cls":
            cfg.num_labels = 3
    elif kind.startswith("gpt2"):
        cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **common)
        cfg.architectures = ["GPT2ForSequenceClassification" if kind == "gpt2-cls" else "GPT2LMHeadModel"]
        if kind == "gpt2-cls":
            cfg.num_labels = 2
    elif kind.startswith("llama"):
        cfg = T.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=48, max_position_embeddings=64, tie_word_embeddings=False, **common)
        cfg.architectures = ["LlamaForSequenceClassification" if kind == "llama-cls" else "LlamaForCausalLM"]
        if kind == "llama-cls":
            cfg.num_labels = 2
    elif kind == "mistral":
        cfg = T.MistralConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=48, max_position_embeddings=64, **common)
        cfg.architectures = ["MistralForCausalLM"]
    elif kind == "qwen2":
        cfg = T.Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=48, max_position_embeddings=64, tie_word_embeddings=False,
                            **dict(common, vocab_size=QWEN2_VOCAB_SIZE))
        cfg.architectures = ["Qwen2ForCausalLM"]
    elif kind == "gemma3":
        # What Gemma-3 brings that Llama has not: q/k norms, scaled embeddings, sliding-window layers beside
        # global ones (two rotary embeddings), tied input/output embeddings. A window of 4 tokens makes the
        # local layers see less than the global ones on the tests' sentences.
        cfg = T.Gemma3TextConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=8, intermediate_size=48, max_position_embeddings=64, sliding_window=4,
                                 layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                 tie_word_embeddings=True, **common)
        cfg.architectures = ["Gemma3ForCausalLM"]
    else:
        raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def make_model(kind: str, seed: int = 0, **overrides):
    import transformers as T

    cfg = make_config(kind, **overrides)
    torch.manual_seed(seed)
    model = getattr(T, cfg.architectures[0])(cfg)
    with torch.no_grad():  # make biases / norms non-trivial so every Gram is informative
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n.lower() or "ln_" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    return model, make_tokenizer(kind)


def save_tiny(folder, kind: str, seed: int = 0, max_shard_size=None, dtype=None, **overrides) -> str:
    """dtype: the checkpoint's (and config's) dtype, e.g. torch.bfloat16 as real LLMs ship; default fp32."""
    folder = os.fspath(folder)
    model, tok = make_model(kind, seed, **overrides)
    if dtype is not None:
        model.to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kw)
    tok.save_pretrained(folder)
    return folder


def random_texts(n: int, seed: int = 0, min_words: int = 2, max_words: int = 12) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def batches_of(tokenizer, texts, batch_size: int = 4, max_length: int = 32):
    """Right-padded batches (dicts of input_ids / attention_mask) of the given texts."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out
