"""The canonical DeepSpeed training script, with ``ldb_ds.initialize`` in place of ``deepspeed.initialize``.

Exactly the pattern of DeepSpeed's tutorials: argparse with ``--local_rank`` and
``deepspeed.add_config_arguments(parser)``; the launcher passes ``--deepspeed
--deepspeed_config ds.json``; ``initialize(args=args, model=..., model_parameters=...)``
with no ``config=``. tests/app/test_canonical_script.py starts it with the ``deepspeed``
launcher and reads what rank 0 writes to ``--out``.
"""

import argparse
import json

import deepspeed
import torch
import torch.nn.functional as F
from torch import nn

import ldb_ds


def main() -> None:
    parser = argparse.ArgumentParser(description="canonical DeepSpeed script with LayerDropBack")
    parser.add_argument("--local_rank", type=int, default=-1, help="passed by the deepspeed launcher")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", required=True)
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(5) for m in (nn.Linear(8, 8), nn.Tanh())], nn.Linear(8, 4))
    engine, optimizer, _, _ = ldb_ds.initialize(args=args, model=model, model_parameters=model.parameters())

    rank = engine.global_rank
    modes, dropped = [], []
    for epoch in range(args.epochs):
        engine.set_epoch(epoch)
        for step in range(3):
            g = torch.Generator().manual_seed(100 * epoch + 10 * step + rank)
            x = torch.randn(engine.micro_batch_size, 8, generator=g)
            y = torch.randint(0, 4, (engine.micro_batch_size,), generator=g)
            loss = F.cross_entropy(engine(x), y)
            engine.backward(loss)
            engine.step()
            dropped.append(engine.ldb.dropped_units)
        modes.append(engine.ldb.mode.value)
    engine.finish()
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"enabled": engine.ldb.enabled, "modes": modes, "dropped": dropped,
                       "drop_steps": engine.ldb.drop_steps, "groups": len(engine.ds_engine.basic_optimizer.param_groups),
                       "units": len(engine.ldb.units), "world_size": engine.world_size,
                       "local_rank": args.local_rank, "deepspeed_config": args.deepspeed_config,
                       "all_trainable": all(p.requires_grad for p in model.parameters())}, f)
    engine.destroy()
    # On the CPU, gloo threads sometimes abort the process at exit unless the group is destroyed
    # (docs/design.md, section 5).
    deepspeed.comm.destroy_process_group()


if __name__ == "__main__":
    main()
