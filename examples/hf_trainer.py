"""LayerDropBack inside the Hugging Face Trainer on DeepSpeed: a small ViT on the bundled digits.

The only LDB-specific lines are the import and ``LDBTrainer`` in place of ``Trainer``; the
``layer_drop_back`` section of the DeepSpeed JSON (examples/ds_config_hf.json) does the rest.
No download: the model is built from a config, the data ships inside ldb_ds.

    pip install ".[hf]"
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 examples/hf_trainer.py \\
        --deepspeed examples/ds_config_hf.json --output-dir runs/hf-vit-digits
    tensorboard --logdir runs/hf-vit-digits        # train/LDB/mode, train/Comm/grad_bytes, ...

On GPUs drop ``DS_ACCELERATOR=cpu OMP_NUM_THREADS=1``. ``--resume`` continues from the last
checkpoint in ``--output-dir`` with the same masks.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from transformers import TrainingArguments, ViTConfig, ViTForImageClassification

from deepspeed.accelerator import get_accelerator

from ldb_ds.integrations.hf import LDBTrainer
from ldb_ds.workloads.data import build_datasets


class DictImages(Dataset):
    """(image, label) pairs as the Trainer's dict samples."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        x, y = self.base[i]
        return {"pixel_values": x, "labels": y}


def accuracy(pred) -> dict[str, float]:
    return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--deepspeed", default="examples/ds_config_hf.json", help="DeepSpeed JSON with a layer_drop_back section")
    p.add_argument("--output-dir", default="runs/hf-vit-digits")
    p.add_argument("--epochs", type=float, default=15)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--max-train-samples", type=int, default=None, help="a smaller training split (quick runs)")
    p.add_argument("--report-to", default="tensorboard", help="the Trainer's report_to ('none' to turn off)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    a = p.parse_args()

    data = build_datasets("digits")  # 32x32 RGB, 10 classes; training split with random shifts
    train = data.train if a.max_train_samples is None else Subset(data.train, range(a.max_train_samples))
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(
        image_size=data.img_size, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=a.layers,
        num_attention_heads=4, intermediate_size=128, num_labels=data.num_classes))

    args = TrainingArguments(
        output_dir=a.output_dir, deepspeed=a.deepspeed, num_train_epochs=a.epochs,
        per_device_train_batch_size=a.batch_size, per_device_eval_batch_size=a.batch_size, learning_rate=a.lr,
        weight_decay=0.05, warmup_steps=0.1, lr_scheduler_type="cosine", logging_steps=5,
        eval_strategy="epoch", save_strategy="epoch", save_total_limit=2, report_to=a.report_to,
        use_cpu=get_accelerator().device_name() == "cpu", seed=0)
    trainer = LDBTrainer(model=model, args=args, train_dataset=DictImages(train),
                         eval_dataset=DictImages(data.test), compute_metrics=accuracy)
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        ldb = trainer.ldb
        print(f"LDB: {len(ldb.units)} units ({', '.join(u.name for u in ldb.units)}); {ldb.steps} steps, "
              f"{ldb.drop_steps} in DROP epochs, {ldb.dropped_unit_steps} unit-steps dropped")
        print(f"test accuracy {100 * metrics['eval_accuracy']:.1f}%")
    trainer.save_model()  # every unit is trainable again: the full model is saved


if __name__ == "__main__":
    main()
