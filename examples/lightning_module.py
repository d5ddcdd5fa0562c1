"""A tiny LightningModule trained by Lightning's Trainer, with memprof's callback measuring steps 2-4:

    python examples/lightning_module.py      # writes lightning.json; `memprof report lightning.json` shows it

Needs ``pip install memprof-optim[lightning]``.
"""

import lightning
import torch

from memprof.integrations.lightning import MemprofCallback


class TinyRegressor(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def main(output: str = "lightning.json", steps: int = 3, skip: int = 1,
         train_steps: int | None = None) -> MemprofCallback:
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 32, generator=generator), torch.randn(64, 1, generator=generator))
    callback = MemprofCallback(steps=steps, skip=skip, output=output)
    trainer = lightning.Trainer(max_steps=train_steps or skip + steps + 1, accelerator="auto", devices=1, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                callbacks=[callback])
    trainer.fit(TinyRegressor(), torch.utils.data.DataLoader(data, batch_size=8))
    return callback


if __name__ == "__main__":
    record = main().record
    print(f"{record.settings.spec}: optimizer state by role {record.components('optimizer_state')}, "
          f"peak {record.peaks.allocated} B ({record.peaks.phase}, step {record.peaks.step})")
