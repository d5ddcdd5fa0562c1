"""A plain PyTorch training loop: a tiny GPT-2 built from its config (random weights, nothing downloaded), AdamW,
random token batches. Measure it with

    memprof run examples/train_gpt2.py --steps 3 --csv run.csv

or inside the script, around any number of steps: ``with memprof.track(model, optimizer) as run: …``.
"""

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1024, n_positions=args.seq_len, bos_token_id=0,
                        eos_token_id=0)
    model = GPT2LMHeadModel(config).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    for step in range(args.steps):
        batch = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device=args.device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step}: loss {loss.item():.3f}")


if __name__ == "__main__":
    main()
