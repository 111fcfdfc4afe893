"""ds_configs/ and the training application's options, without starting any rank (fast).

The parser is generated from ``TrainOptions``; these tests check that every field really is a
flag, that the old names still work, and the order of precedence: command line > ``-c`` YAML >
the JSON's ``train`` section > defaults.
"""

import dataclasses
import glob
import json
import math
import os
from typing import get_args

import pytest
import torch
import yaml

from ldb_ds.config import LDBConfig
from ldb_ds.train import arguments
from ldb_ds.train import options as O
from ldb_ds.train.loop import create_lr_scheduler
from ldb_ds.train.options import OptionsError, TrainOptions
from tests.support import train_utils as tu

CONFIGS = sorted(glob.glob(os.path.join(tu.REPO, "ds_configs", "*.json")))
ZERO0 = os.path.join(tu.REPO, "ds_configs", "zero0_ldb.json")


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
    # The train section holds only options the application knows, with allowed values, under
    # their current names (aliases are for users' old files, not for ours).
    section = cfg.get("train", {})
    assert set(arguments.check_keys(section, path)) == set(section)


def test_paper_config_matches_the_paper():
    with open(os.path.join(tu.REPO, "ds_configs", "paper_scratch_ldb.json")) as f:
        cfg = json.load(f)
    opt = cfg["optimizer"]
    assert opt["type"] == "SGD" and opt["params"]["lr"] == 0.1 and opt["params"]["momentum"] == 0.9
    assert cfg["train_batch_size"] == 128 and cfg["train"]["sched"] == "cosine"
    ldb = LDBConfig.from_ds_config(cfg)
    assert (ldb.drop_rate, ldb.sampling_rate, ldb.kappa, ldb.batch_kappa) == (0.3, 2, 2.0, 2)
    assert (ldb.keep_first, ldb.keep_last) == (4, 1)


def test_parser_is_generated_from_every_field():
    actions = {a.dest: a for a in arguments.build_parser()._actions if a.dest != "help"}
    fields = {f.name: f for f in dataclasses.fields(TrainOptions)}
    assert set(actions) == set(fields), "every option is a field and every field a flag"
    hints = O.type_hints()
    for name, f in fields.items():
        a = actions[name]
        m = f.metadata
        assert O.flag(name) in a.option_strings
        assert set(m["flags"]) | set(m["aliases"]) <= set(a.option_strings)
        assert a.help.startswith(m["help"]) and m["help"]
        kind, choices, _ = O.base_type(hints[name])
        if kind is bool:
            assert a.nargs == 0 and f.default is False  # a store_true flag
        else:
            assert a.type is kind
            assert tuple(a.choices or ()) == (choices or ())
    # The timm names and our earlier ones are spellings of one option.
    by_flag = {s: a.dest for a in actions.values() for s in a.option_strings}
    for spellings in (("-b", "--batch-size"), ("-j", "--workers"),
                      ("-vb", "--validation-batch-size", "--eval-batch-size"),
                      ("--log-interval", "--log-every"), ("--dataset-download", "--download"),
                      ("-c", "--config"), ("--deepspeed_config", "--deepspeed-config")):
        assert len({by_flag[s] for s in spellings}) == 1, spellings


def test_aliases_on_the_command_line_and_in_files(tmp_path):
    cfg = tu.write_config(str(tmp_path / "c.json"), train={"log_every": 4, "eval_batch_size": 7})
    opts, _ = arguments.parse_args(["--deepspeed_config", cfg, "-b", "8", "-j", "2", "--download"])
    assert (opts.batch_size, opts.workers, opts.dataset_download) == (8, 2, True)
    assert (opts.log_interval, opts.validation_batch_size) == (4, 7)
    opts, _ = arguments.parse_args(["--deepspeed-config", cfg, "--log-every", "3", "-vb", "5"])
    assert (opts.log_interval, opts.validation_batch_size) == (3, 5)
    opts, _ = arguments.parse_args(["--deepspeed_config", cfg, "--log-interval", "2",
                              "--eval-batch-size", "6", "--local_rank=1", "--deepspeed"])
    assert (opts.log_interval, opts.validation_batch_size, opts.local_rank) == (2, 6, 1)
    both = tu.write_config(str(tmp_path / "d.json"), train={"log_every": 4, "log_interval": 5})
    with pytest.raises(OptionsError, match="sets log_interval twice"):
        arguments.check_keys(json.load(open(both))["train"], "x")


def test_precedence_cli_over_yaml_over_json_over_defaults(tmp_path):
    cfg = tu.write_config(str(tmp_path / "c.json"), base="zero2_ldb.json",
                          train={"epochs": 7, "model": "resnet18", "lr": 0.2, "seed": 5})
    conf = tmp_path / "opts.yaml"
    conf.write_text(yaml.safe_dump({"deepspeed_config": cfg, "epochs": 5, "model": "resnet10t",
                                    "min_lr": "1e-3"}))  # YAML 1.1 reads 1e-3 as a string
    opts, ds = arguments.parse_args(["-c", str(conf), "--epochs", "3"])
    defaults = TrainOptions()
    assert opts.epochs == 3                       # command line
    assert opts.model == "resnet10t"              # -c YAML over the JSON section
    assert opts.min_lr == 1e-3                    # -c YAML over the default
    assert (opts.lr, opts.seed) == (0.2, 5)       # JSON section over the defaults
    assert opts.dataset == defaults.dataset and opts.log_interval == defaults.log_interval
    assert opts.deepspeed_config == cfg and ds["zero_optimization"]["stage"] == 2
    assert opts.sched == "cosine"  # resolved: the config has no DeepSpeed scheduler
    # The command line's --deepspeed_config wins over the YAML's.
    other = tu.write_config(str(tmp_path / "o.json"), base="zero0_ldb.json")
    opts, ds = arguments.parse_args(["-c", str(conf), "--deepspeed_config", other])
    assert opts.deepspeed_config == other and opts.model == "resnet10t" and opts.lr is None


def test_resolved_deepspeed_config(tmp_path):
    cfg = tu.write_config(str(tmp_path / "c.json"), base="zero2_ldb.json",
                          train={"model": "resnet18", "lr": 0.2})
    opts, ds = arguments.parse_args(["--deepspeed_config", cfg])
    opts.experiment = "x"
    resolved = arguments.resolve_ds_config(ds, opts)
    assert "train" not in resolved and resolved["optimizer"]["params"]["lr"] == 0.2
    assert resolved["tensorboard"] == {"enabled": True, "output_path": "runs", "job_name": "x"}
    opts.batch_size = 16
    paper = json.load(open(os.path.join(tu.REPO, "ds_configs", "paper_scratch_ldb.json")))
    resolved = arguments.resolve_ds_config(paper, opts)
    assert resolved["train_micro_batch_size_per_gpu"] == 16 and "train_batch_size" not in resolved
    assert arguments.default_experiment(opts, ds, 4) == "digits-resnet18-ldb-z2-ws4"


def test_a_data_dir_goes_with_the_dataset_it_was_given_for(tmp_path, capsys):
    """The paper configs name CIFAR-10 in data/; --dataset digits on the command line leaves that
    folder unused (dropped, with a note). A data_dir given beside digits at the same level, or
    later, is still refused: who names a folder there expects it to be read."""
    paper = os.path.join(tu.REPO, "ds_configs", "paper_scratch_ldb.json")
    opts, _ = arguments.parse_args(["--deepspeed_config", paper, "--dataset", "digits"])
    assert opts.dataset == "digits" and opts.data_dir is None and opts.model == "resnet50"
    assert "data_dir 'data' from the 'train' section" in capsys.readouterr().out
    opts, _ = arguments.parse_args(["--deepspeed_config", paper, "--dataset", "cifar100"])
    assert opts.data_dir == "data"  # a dataset that reads a folder keeps the file's
    conf = tmp_path / "opts.yaml"
    conf.write_text(yaml.safe_dump({"dataset": "synthetic"}))
    opts, _ = arguments.parse_args(["--deepspeed_config", paper, "-c", str(conf)])
    assert opts.dataset == "synthetic" and opts.data_dir is None
    err = _error(capsys, ["--deepspeed_config", paper, "--dataset", "digits", "--data-dir", "data"])
    assert "--data-dir (data_dir) = 'data' is not used by --dataset digits" in err
    both = tu.write_config(str(tmp_path / "both.json"), train={"dataset": "digits", "data_dir": "data"})
    assert "is not used by --dataset digits" in _error(capsys, ["--deepspeed_config", both])


def _error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        arguments.parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_option_errors(tmp_path, capsys):
    bad = tu.write_config(str(tmp_path / "b.json"), train={"epoch": 3})
    err = _error(capsys, ["--deepspeed_config", bad])
    assert "unknown key(s) in the 'train' section" in err and "epochs" in err
    sched = tu.write_config(str(tmp_path / "s.json"),
                            scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 5}})
    opts, _ = arguments.parse_args(["--deepspeed_config", sched])
    assert opts.sched == "none"  # DeepSpeed's scheduler drives the LR
    assert "would both set the learning rate" in _error(
        capsys, ["--deepspeed_config", sched, "--sched", "cosine"])
    assert "--deepspeed_config is required" in _error(capsys, [])
    assert "invalid choice: 'cosin'" in _error(capsys, ["--deepspeed_config", ZERO0, "--sched", "cosin"])
    value = tu.write_config(str(tmp_path / "v.json"), train={"epochs": 0})
    assert "--epochs (epochs) = 0 is not allowed" in _error(capsys, ["--deepspeed_config", value])
    choice = tu.write_config(str(tmp_path / "ch.json"), train={"dist_bn": "all"})
    err = _error(capsys, ["--deepspeed_config", choice])
    assert "dist_bn" in err and "'all'" in err and "reduce, broadcast, none" in err
    boolean = tu.write_config(str(tmp_path / "bo.json"), train={"epochs": True})
    assert "expected a value of type int" in _error(capsys, ["--deepspeed_config", boolean])
    rank = tu.write_config(str(tmp_path / "r.json"), train={"local_rank": 0})
    assert "cannot set local_rank" in _error(capsys, ["--deepspeed_config", rank])
    no_opt = tu.write_config(str(tmp_path / "n.json"))
    cfg = json.load(open(no_opt))
    del cfg["optimizer"]
    json.dump(cfg, open(no_opt, "w"))
    assert "no 'optimizer' section" in _error(capsys, ["--deepspeed_config", no_opt])
    # -c files: a missing file, an unknown key, a command-line-only key, not a mapping.
    assert "no such file" in _error(capsys, ["-c", str(tmp_path / "none.yaml")])
    for text, expected in (("epoch: 3\n", "unknown key(s) in -c"), ("config: x.yaml\n", "cannot set config"),
                           ("- 1\n", "must hold a mapping"), ("epochs: [1\n", "not valid YAML")):
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        assert expected in _error(capsys, ["-c", str(path), "--deepspeed_config", ZERO0])


def test_option_types_match_the_application():
    from ldb_ds.workloads.data import DATASETS
    from ldb_ds.workloads.models import STEMS

    assert get_args(O.Dataset) == DATASETS and get_args(O.Stem) == STEMS


def test_docs_list_every_option():
    """docs/training.md's option table is the one generated from the fields."""
    with open(os.path.join(tu.REPO, "docs", "training.md")) as f:
        assert arguments.options_table() in f.read(), "regenerate: python -m ldb_ds.train.arguments --update-docs"


def _lrs(opts, epochs, base=0.1):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=base)
    sched = create_lr_scheduler(opts, optimizer)
    out = []
    for e in range(epochs):
        sched.step(e)
        out.append(optimizer.param_groups[0]["lr"])
    return out


def test_cosine_schedule_is_timms_with_the_old_semantics():
    """Warm-up base*(e+1)/(W+1), then a cosine from the base LR to --min-lr over the rest."""
    lrs = _lrs(TrainOptions(epochs=4, min_lr=0.01), 4)
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[2] == pytest.approx(0.01 + 0.5 * 0.09 * (1 + math.cos(math.pi / 2)))
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    lrs = _lrs(TrainOptions(epochs=6, warmup_epochs=2), 6)
    assert lrs[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1])
    assert lrs[3:] == pytest.approx([0.05 * (1 + math.cos(math.pi * t / 4)) for t in (1, 2, 3)])
    lrs = _lrs(TrainOptions(epochs=3, warmup_epochs=1, warmup_lr=0.001), 2)
    assert lrs == pytest.approx([0.001, 0.1])
    assert create_lr_scheduler(TrainOptions(sched="none"), None) is None
