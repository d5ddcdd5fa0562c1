"""A Hugging Face Trainer run on a tiny random GPT-2 (built from its config, nothing downloaded) and a synthetic
dataset, with memprof's callback measuring steps 2-4:

    python examples/hf_trainer.py            # writes hf-trainer.json; `memprof report hf-trainer.json` shows it
"""

import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from memprof.integrations.huggingface import MemprofCallback


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, count: int, seq_len: int, vocab: int) -> None:
        self.ids = torch.randint(0, vocab, (count, seq_len), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def main(output: str = "hf-trainer.json", steps: int = 3, skip: int = 1,
         train_steps: int | None = None) -> MemprofCallback:
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=32, bos_token_id=0,
                        eos_token_id=0)
    model = GPT2LMHeadModel(config)
    callback = MemprofCallback(steps=steps, skip=skip, output=output)
    with tempfile.TemporaryDirectory() as folder:
        args = TrainingArguments(output_dir=folder, max_steps=train_steps or skip + steps + 1,
                                 per_device_train_batch_size=2, learning_rate=1e-3, report_to=[], save_strategy="no",
                                 logging_strategy="no", use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=RandomTokens(64, 32, config.vocab_size),
                callbacks=[callback]).train()
    return callback


if __name__ == "__main__":
    record = main().record
    print(f"{record.settings.spec}: optimizer state by role {record.components('optimizer_state')}, "
          f"peak {record.peaks.allocated} B ({record.peaks.phase}, step {record.peaks.step})")
