"""The built-in model names as plain data: no transformers or torchvision import here.

Text models are transformers ``*Config`` keyword arguments with the published sizes, so that
nothing is ever downloaded. ``TORCHVISION_CLASSIFIERS`` mirrors
``torchvision.models.list_models(module=torchvision.models)``; a test keeps the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TextSpec:
    """One built-in text model: its family, a one-line description and its config arguments."""

    family: str
    description: str
    config: dict[str, Any]
    max_seq_len: int | None = None  # learned absolute positions allow no longer batches; None = no limit


def _gpt2(n_layer: int, n_embd: int, n_head: int) -> dict[str, Any]:
    return dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=50257, n_positions=1024)


# LLaMA sizes of the GaLore configs (configs/llama_*.json), which the IO-Adam paper follows
# (io-adam-digest §4). GaLore writes "max_sequence_length": 1024, which HF's LlamaConfig ignores;
# we set max_position_embeddings=1024 as meant. It only sizes the rotary cache, not the
# parameters, and RoPE accepts longer batches.
def _llama(hidden: int, intermediate: int, heads: int, layers: int) -> dict[str, Any]:
    return dict(
        hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
        num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=1024,
        rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False,
    )


TEXT_MODELS: dict[str, TextSpec] = {
    "gpt2": TextSpec("gpt2", "GPT-2 small: 12 layers, 768 wide, 124M params (tied LM head)",
                     _gpt2(12, 768, 12), max_seq_len=1024),
    "gpt2-medium": TextSpec("gpt2", "GPT-2 medium: 24 layers, 1024 wide, 355M params (tied LM head)",
                            _gpt2(24, 1024, 16), max_seq_len=1024),
    "gpt2-large": TextSpec("gpt2", "GPT-2 large: 36 layers, 1280 wide, 774M params (tied LM head)",
                           _gpt2(36, 1280, 20), max_seq_len=1024),
    "gpt2-xl": TextSpec("gpt2", "GPT-2 XL: 48 layers, 1600 wide, 1.56B params (tied LM head)",
                        _gpt2(48, 1600, 25), max_seq_len=1024),
    "llama-60m": TextSpec("llama", "LLaMA 60M (GaLore config): 8 layers, 512 wide, 58.1M params",
                          _llama(512, 1376, 8, 8)),
    "llama-130m": TextSpec("llama", "LLaMA 130M (GaLore config): 12 layers, 768 wide, 134M params",
                           _llama(768, 2048, 12, 12)),
    "llama-350m": TextSpec("llama", "LLaMA 350M (GaLore config): 24 layers, 1024 wide, 368M params",
                           _llama(1024, 2736, 16, 24)),
    "llama-1b": TextSpec("llama", "LLaMA 1B (GaLore config): 24 layers, 2048 wide, 1.34B params",
                         _llama(2048, 5461, 32, 24)),
    "llama-7b": TextSpec("llama", "LLaMA 7B (GaLore config): 32 layers, 4096 wide, 6.74B params",
                         _llama(4096, 11008, 32, 32)),
    "bert-base-uncased": TextSpec(
        "bert", "BERT base uncased, masked-LM head: 12 layers, 768 wide, 110M params",
        dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
             intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2,
             pad_token_id=0, mask_token_id=103),
        max_seq_len=512),
    # RoBERTa numbers positions from pad_token_id + 1, so 514 position rows hold 512 tokens.
    "roberta-base": TextSpec(
        "roberta", "RoBERTa base, masked-LM head: 12 layers, 768 wide, 125M params",
        dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
             intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
             layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2, mask_token_id=50264),
        max_seq_len=512),
    "t5-small": TextSpec(
        "t5", "T5 small (v1.0), seq2seq LM: 6+6 layers, 512 wide, 60.5M params (tied embeddings)",
        dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6,
             num_heads=8, relative_attention_num_buckets=32, feed_forward_proj="relu",
             tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)),
    # ALBERT v2 turns dropout off (hidden and attention dropout 0), unlike v1.
    "albert-base-v2": TextSpec(
        "albert", "ALBERT base v2, masked-LM head: 12 shared layers, 768 wide, 11.2M params",
        dict(vocab_size=30000, embedding_size=128, hidden_size=768, num_hidden_layers=12,
             num_attention_heads=12, intermediate_size=3072, hidden_act="gelu_new",
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=512,
             type_vocab_size=2, pad_token_id=0, bos_token_id=2, eos_token_id=3, mask_token_id=4),
        max_seq_len=512),
}

TORCHVISION_CLASSIFIERS: tuple[str, ...] = (
    "alexnet", "convnext_base", "convnext_large", "convnext_small", "convnext_tiny",
    "densenet121", "densenet161", "densenet169", "densenet201",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4",
    "efficientnet_b5", "efficientnet_b6", "efficientnet_b7",
    "efficientnet_v2_l", "efficientnet_v2_m", "efficientnet_v2_s", "googlenet", "inception_v3", "maxvit_t",
    "mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3",
    "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small",
    "regnet_x_16gf", "regnet_x_1_6gf", "regnet_x_32gf", "regnet_x_3_2gf", "regnet_x_400mf", "regnet_x_800mf",
    "regnet_x_8gf", "regnet_y_128gf", "regnet_y_16gf", "regnet_y_1_6gf", "regnet_y_32gf", "regnet_y_3_2gf",
    "regnet_y_400mf", "regnet_y_800mf", "regnet_y_8gf",
    "resnet101", "resnet152", "resnet18", "resnet34", "resnet50",
    "resnext101_32x8d", "resnext101_64x4d", "resnext50_32x4d",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0",
    "squeezenet1_0", "squeezenet1_1", "swin_b", "swin_s", "swin_t", "swin_v2_b", "swin_v2_s", "swin_v2_t",
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
    "vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32", "wide_resnet101_2", "wide_resnet50_2",
)


def model_names() -> list[tuple[str, str, str]]:
    """(name, family, one-line description) for every built-in name."""
    text = [(name, spec.family, spec.description) for name, spec in TEXT_MODELS.items()]
    vision = [(name, "torchvision", f"torchvision {name}, image classification (random init)")
              for name in TORCHVISION_CLASSIFIERS]
    return text + vision
