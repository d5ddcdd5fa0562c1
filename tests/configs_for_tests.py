"""Tiny Hugging Face configs (random weights, built in a second) that the recipe tests measure."""

GPT2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 2, "n_embd": 64, "n_head": 4,
        "vocab_size": 512, "n_positions": 64, "bos_token_id": 0, "eos_token_id": 0}
LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
         "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 512,
         "max_position_embeddings": 64, "bos_token_id": 0, "eos_token_id": 0}
