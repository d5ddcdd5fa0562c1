"""Every reproduction, in the order the README lists them, and the model files they use."""

from __future__ import annotations

from memprof.report.papers import others, smmf, smmf_glue, smmf_text
from memprof.report.papers.model import Reproduction

MODEL_FILES = (
    "`gpt2-117m-megatron/`, `gpt2-345m-megatron/`: Megatron GPT-2 with the vocabulary padded to 50,304.",
    "`bert-345m-megatron/`: Megatron-LM's BERT-345M example (24 layers, 1024 wide, 16 heads, vocabulary 30,522 "
    "padded to 30,592), with HF's masked-LM head (Megatron's also has the 2-way NSP head and pooler: 1.05M "
    "parameters more, 0.3 %).",
    "`t5-220m-megatron/`: Megatron-LM's T5 example (12+12 layers, 768 wide, 12 heads, FFN 3072, kv 64, the "
    "bert-large-cased vocabulary of 28,996 plus 100 sentinels padded to 29,184), as HF T5 (no biases).",
    "`wmt_transformer.py`: torch.nn.Transformer with Vaswani et al.'s base (512 wide, FFN 2048, 8 heads, 6+6 "
    "layers) and big (1024, 4096, 16) dimensions, tensor2tensor's 32,768-subword WMT32k vocabulary, untied "
    "source, target and output embeddings.",
    "`marian-en-ro/`, `bart-base/`, `mbart-large-cc25/`: Helsinki-NLP/opus-mt-en-ro, facebook/bart-base and "
    "facebook/mbart-large-cc25 as their published config.json dimensions (built from config, never downloaded).",
    "`llama-7b-seqcls/`: LLaMA-7b as LlamaForSequenceClassification (2 labels, no LM head), for SMMF's GLUE LoRA "
    "runs.",
    "`roberta-base-cola/`: RobertaForSequenceClassification with 2 labels.",
    "`vit_small.py`: the vit-pytorch ViT layout that IO-Adam trains on CIFAR-10 (6,324,970 parameters).",
    "`yolov5.py`: YOLOv5s and YOLOv5m (v6 layout: Conv-BN-SiLU, C3, SPPF, PANet neck, 3-scale detect head; 80 "
    "classes) written from the published architecture in plain PyTorch, nothing imported from Ultralytics.",
    "`llama-2-70b/`: LLaMA-2-70B (used by the estimate-accuracy report).",
)


def reproductions() -> dict[str, Reproduction]:
    """Every reproduction by name, in catalog order."""
    made = (smmf.table1(), smmf_text.table2(), smmf_text.table3(), smmf_glue.table4(), smmf_glue.table6(),
            smmf_glue.table7(), smmf.table8(), smmf_text.table9_13(), others.adapprox_table2(),
            others.alada_table4(), others.io_adam_table2(), others.io_adam_table4())
    return {r.name: r for r in made}
