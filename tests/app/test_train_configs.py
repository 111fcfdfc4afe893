"""ds_configs/ and launch/train.py's option handling, without starting any rank (fast)."""

import glob
import json
import math
import os
import sys

import pytest

from tests.support import train_utils as tu  # noqa: E402

from ldb_ds.config import LDBConfig  # noqa: E402

CONFIGS = sorted(glob.glob(os.path.join(tu.REPO, "ds_configs", "*.json")))


def _train_module():
    from ldb_ds.train import main

    return main


def test_config_set_is_complete():
    names = {os.path.basename(p) for p in CONFIGS}
    for stage in range(4):
        assert {f"zero{stage}_baseline.json", f"zero{stage}_ldb.json"} <= names
    assert "zero2_bf16_ldb.json" in names and "paper_scratch_ldb.json" in names
    assert os.path.isfile(os.path.join(tu.REPO, "ds_configs", "README.md"))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_each_config(path):
    with open(path) as f:
        cfg = json.load(f)
    ldb = LDBConfig.from_ds_config(cfg)  # validates every key of the section
    assert ldb.enabled == ("_ldb" in os.path.basename(path))
    # DeepSpeed 0.19.8 clips at 1.0 when the key is absent: every config must say.
    assert "gradient_clipping" in cfg
    assert cfg["tensorboard"]["enabled"] is True
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if cfg["optimizer"]["type"].lower() not in ("adam", "adamw") and stage >= 1:
        assert cfg.get("zero_allow_untested_optimizer") is True
    if cfg.get("bf16", {}).get("enabled"):
        # BatchNorm buffers must follow the parameters to bf16 on a CPU.
        assert cfg["data_types"]["buffer_dtype"] == "bf16"
    # The train section holds only options train.py knows.
    mod = _train_module()
    dests = {a.dest for a in mod.build_parser()._actions}
    assert set(cfg.get("train", {})) <= dests


def test_paper_config_matches_the_paper():
    with open(os.path.join(tu.REPO, "ds_configs", "paper_scratch_ldb.json")) as f:
        cfg = json.load(f)
    opt = cfg["optimizer"]
    assert opt["type"] == "SGD" and opt["params"]["lr"] == 0.1 and opt["params"]["momentum"] == 0.9
    assert cfg["train_batch_size"] == 128 and cfg["train"]["sched"] == "cosine"
    ldb = LDBConfig.from_ds_config(cfg)
    assert (ldb.drop_rate, ldb.sampling_rate, ldb.kappa, ldb.batch_kappa) == (0.3, 2, 2.0, 2)
    assert (ldb.keep_first, ldb.keep_last) == (4, 1)


def test_options_from_json_and_command_line(tmp_path):
    mod = _train_module()
    cfg = tu.write_config(str(tmp_path / "c.json"), base="zero2_ldb.json",
                          train={"model": "resnet18", "epochs": 7, "lr": 0.2})
    args, ds = mod.parse_args(["--deepspeed_config", cfg, "--epochs", "3"])
    assert (args.model, args.epochs, args.lr, args.sched) == ("resnet18", 3, 0.2, "cosine")
    args.experiment = "x"
    resolved = mod.resolve_ds_config(ds, args, world_size=2)
    assert "train" not in resolved and resolved["optimizer"]["params"]["lr"] == 0.2
    assert resolved["tensorboard"] == {"enabled": True, "output_path": "runs", "job_name": "x"}
    args.batch_size = 16
    paper = json.load(open(os.path.join(tu.REPO, "ds_configs", "paper_scratch_ldb.json")))
    resolved = mod.resolve_ds_config(paper, args, world_size=2)
    assert resolved["train_micro_batch_size_per_gpu"] == 16 and "train_batch_size" not in resolved
    assert mod.default_experiment(args, ds, 4) == "digits-resnet18-ldb-z2-ws4"


def test_option_errors(tmp_path, capsys):
    mod = _train_module()
    bad = tu.write_config(str(tmp_path / "b.json"), train={"epoch": 3})
    with pytest.raises(SystemExit):
        mod.parse_args(["--deepspeed_config", bad])
    assert "unknown key(s) in the 'train' section" in capsys.readouterr().err
    sched = tu.write_config(str(tmp_path / "s.json"),
                            scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 5}})
    args, _ = mod.parse_args(["--deepspeed_config", sched])
    assert args.sched == "none"  # DeepSpeed's scheduler drives the LR
    with pytest.raises(SystemExit):
        mod.parse_args(["--deepspeed_config", sched, "--sched", "cosine"])
    assert "would both set the learning rate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mod.parse_args([])


def test_cosine_schedule():
    mod = _train_module()
    args, _ = mod.parse_args(["--deepspeed_config",
                              os.path.join(tu.REPO, "ds_configs", "zero0_ldb.json"),
                              "--epochs", "4", "--min-lr", "0.01"])
    lrs = [mod.epoch_lr_scale(e, args, 0.1) for e in range(4)]
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[2] == pytest.approx(0.01 + 0.5 * 0.09 * (1 + math.cos(math.pi / 2)))
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    args.warmup_epochs = 1
    assert mod.epoch_lr_scale(0, args, 0.1) == pytest.approx(0.05)
