"""ldb_ds.initialize's config arguments: one config, given one way; the errors name both sources.

These fail before DeepSpeed is called, so no process group is needed; the working variants
(path, dict, config_params, hjson, args) run on real ranks in tests/dist/test_field_dist.py and
under the deepspeed launcher in tests/app/test_canonical_script.py.
"""

import argparse
import warnings

import pytest
from torch import nn

import ldb_ds
from ldb_ds import config as ldb_config

CFG = {"train_micro_batch_size_per_gpu": 2, "layer_drop_back": {"enabled": True}}


def test_args_and_config_together_is_a_clear_error():
    args = argparse.Namespace(local_rank=-1, deepspeed=True, deepspeed_config="ds.json")
    with pytest.raises(ValueError) as err:
        ldb_ds.initialize(args=args, model=nn.Linear(2, 2), config=CFG)
    msg = str(err.value)
    assert "args.deepspeed_config = 'ds.json'" in msg and "config = a dict" in msg
    assert "drop config=" in msg and "args.deepspeed_config = None" in msg
    assert args.deepspeed_config == "ds.json"  # untouched


def test_config_and_config_params_together_is_an_error():
    with pytest.warns(FutureWarning, match="config_params"), pytest.raises(ValueError, match="both config="):
        ldb_ds.initialize(model=nn.Linear(2, 2), config=CFG, config_params=CFG)


def test_no_config_at_all_says_how_to_give_one():
    with pytest.raises(ValueError, match=r"needs a DeepSpeed config: config=.*--deepspeed_config"):
        ldb_ds.initialize(args=argparse.Namespace(local_rank=-1, deepspeed_config=None), model=nn.Linear(2, 2))


def test_section_without_enabled_warns_once_naming_section_and_key(monkeypatch):
    monkeypatch.setattr(ldb_config, "_not_enabled_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ldb_config.LDBConfig.from_dict({"drop_rate": 0.3}).enabled is False
        assert ldb_config.LDBConfig.from_dict({"drop_rate": 0.5}).enabled is False
        assert ldb_config.LDBConfig.from_dict({"enabled": False}).enabled is False
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "'layer_drop_back'" in messages[0] and '"enabled": true' in messages[0] and "OFF" in messages[0]
    assert "'drop_rate'" in messages[0]


def test_hjson_config_file_is_read_like_deepspeed_reads_it(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('// comment\n{ layer_drop_back: { enabled: true, drop_rate: 0.4 } }')
    assert ldb_config.LDBConfig.from_ds_config(str(path)).drop_rate == 0.4
