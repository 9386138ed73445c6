"""Training the demo models with Lightning, seeded and deterministic, with a weights cache.

Trained weights are stored as safetensors under the cache folder, keyed by the training config
and the source of the demo's own modules, so a second `mmdiag demo` does not retrain and a
change to the generator or the models does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from mmdiag.pipeline.demo import models, shapes, vocab
from mmdiag.pipeline.store import cache_root, load_weights, save_weights

log = logging.getLogger("mmdiag")


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: Literal["film", "late", "transformer"] = "film"
    p_mark: float = 0.8  # shortcut strength in the training data (0.5 = no shortcut)
    p_mark_colour: float | None = None  # on colour photos, where it differs (shapes.generate)
    n_train: int = 8000
    epochs: int = 5
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def key(self) -> str:
        return source_key(self, (shapes, models, vocab, sys.modules[__name__]))


def source_key(config: BaseModel, modules) -> str:
    """A weights-cache key: the training config and the source of the modules that train."""
    h = hashlib.sha256(json.dumps(config.model_dump(), sort_keys=True).encode())
    for module in modules:
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()[:16]


def build(config: TrainConfig) -> torch.nn.Module:
    return models.ARCHS[config.arch]()


def train(config: TrainConfig, device: str = "cpu", progress: bool | None = None) -> torch.nn.Module:
    """Train a demo model from scratch (Lightning), returning it in eval mode on the CPU."""
    import lightning as L  # ~8 s to import: only where training happens

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = build(config)

        def training_step(self, batch, _):
            image, text, y = batch
            loss = torch.nn.functional.cross_entropy(self.net({"image": image, "text": text}), y)
            self.log("loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return adamw_one_cycle(self, config.lr, config.weight_decay)

    L.seed_everything(config.seed, workers=True, verbose=False)
    data = shapes.generate(config.n_train, config.p_mark, seed=config.seed * 1000 + shapes.SPLIT_SEEDS["train"], name="train", p_mark_colour=config.p_mark_colour)
    module = Module()
    fit(module, (data.inputs["image"], data.inputs["text"], data.labels), config, config.arch, device, progress)
    return module.net.cpu().eval()


def adamw_one_cycle(module, lr: float, weight_decay: float):
    """The demo models' optimiser: AdamW with a one-cycle learning rate, stepped per batch."""
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=module.trainer.estimated_stepping_batches)
    return [opt], [{"scheduler": sched, "interval": "step"}]


def fit(module, tensors: tuple[torch.Tensor, ...], config: BaseModel, name: str, device: str = "cpu", progress: bool | None = None) -> None:
    """Lightning's Trainer on `tensors` (shuffled by the config's seed, `batch_size` a step,
    `epochs` epochs), deterministic and quiet: a progress bar on a terminal, a line per epoch
    elsewhere."""
    import lightning as L

    class EpochLog(L.Callback):
        def on_train_epoch_end(self, trainer, _module):
            loss = float(trainer.callback_metrics.get("loss", float("nan")))
            log.info("train %s: epoch %d/%d, loss %.4f", name, trainer.current_epoch + 1, config.epochs, loss)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*tensors), batch_size=config.batch_size, shuffle=True, generator=torch.Generator().manual_seed(config.seed))
    progress = sys.stderr.isatty() if progress is None else progress
    _quiet_lightning()
    trainer = L.Trainer(
        max_epochs=config.epochs,
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        gradient_clip_val=getattr(config, "grad_clip", None),
        callbacks=[L.pytorch.callbacks.RichProgressBar()] if progress else [EpochLog()],
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(LeafSpec|num_workers|does not have many workers).*")
        trainer.fit(module, loader)


def _quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


def load_or_train(config: TrainConfig, cache: Path | None = None, device: str = "cpu") -> tuple[torch.nn.Module, bool]:
    """The trained model for this config from the weights cache, training it on a miss.
    Returns (model, came_from_cache)."""
    path = cache_root(cache) / "models" / f"{config.arch}-{config.key()}.safetensors"
    model = build(config)
    if (state := load_weights(path)) is not None:
        model.load_state_dict(state)
        return model.eval(), True
    start = time.perf_counter()
    model = train(config, device=device)
    log.info("trained %s in %.1f s", config.arch, time.perf_counter() - start)
    save_weights(path, model.state_dict(), metadata={"config": config.model_dump_json()})
    return model, False
