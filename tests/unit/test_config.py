"""The layer_drop_back section: defaults, and an error naming key, value and what is allowed."""

import json

import pytest

from ldb_ds.config import DEFAULTS, LDBConfig, LDBConfigError


def test_absent_section_means_disabled():
    assert LDBConfig.from_ds_config({"train_batch_size": 8}).enabled is False
    assert LDBConfig.from_dict(None).enabled is False


def test_paper_defaults():
    cfg = LDBConfig.from_dict({"enabled": True})
    assert cfg == DEFAULTS
    assert (cfg.drop_rate, cfg.sampling_rate, cfg.keep_first, cfg.keep_last) == (0.3, 2, 4, 1)
    assert (cfg.lr_policy, cfg.kappa, cfg.batch_kappa, cfg.resample, cfg.granularity) == \
        ("kappa", 2.0, 2, "step", "module")


def test_reads_json_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"layer_drop_back": {"enabled": True, "drop_rate": 0.5}}))
    assert LDBConfig.from_ds_config(str(path)).drop_rate == 0.5


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        LDBConfig.from_ds_config(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LDBConfigError, match="not valid JSON"):
        LDBConfig.from_ds_config(str(bad))


def test_unknown_key_is_named():
    with pytest.raises(LDBConfigError, match=r"'drop_rte'.*allowed keys:.*drop_rate"):
        LDBConfig.from_dict({"enabled": True, "drop_rte": 0.3})


def test_section_must_be_an_object():
    with pytest.raises(LDBConfigError, match="must be a JSON object"):
        LDBConfig.from_dict([1, 2])


@pytest.mark.parametrize("key, value, allowed", [
    ("enabled", "yes", "bool"),
    ("drop_rate", 1.0, "0 <= drop_rate < 1"),
    ("drop_rate", -0.1, "0 <= drop_rate < 1"),
    ("drop_rate", "0.3", "int or float"),
    ("drop_rate", True, "int or float"),
    ("sampling_rate", 0, ">= 1"),
    ("sampling_rate", 2.5, "int"),
    ("granularity", "layer", "'param', 'module', 'block'"),
    ("keep_first", -1, ">= 0"),
    ("keep_last", 1.0, "int"),
    ("resample", "batch", "'step', 'epoch'"),
    ("lr_policy", "double", "'kappa', 'inverse_keep', 'none'"),
    ("kappa", 0, "> 0"),
    ("batch_kappa", 0, ">= 1"),
    ("batch_kappa", 1.5, "int"),
    ("batch_scaling", "both", "'micro_batch', 'accumulation'"),
    ("seed", -3, ">= 0"),
    # NaN passes no comparison but inf passes "> 0": both are refused as not finite.
    ("kappa", float("inf"), "a finite number"),
    ("kappa", float("nan"), "a finite number"),
    ("kappa", 10 ** 400, "a finite number"),
    ("drop_rate", float("nan"), "a finite number"),
    ("kappa", "2", "int or float"),
    ("keep_first", True, "int"),
    ("seed", 1.0, "int"),
])
def test_bad_values_name_key_value_and_allowed(key, value, allowed):
    with pytest.raises(LDBConfigError) as err:
        LDBConfig.from_dict({"enabled": True, key: value})
    message = str(err.value)
    assert f"layer_drop_back.{key} = {value!r}" in message
    assert allowed in message


def test_block_sources_are_typed_and_only_for_block_granularity():
    cfg = LDBConfig.from_dict({"enabled": True, "granularity": "block", "block_classes": ["BertLayer"]})
    assert cfg.block_classes == ("BertLayer",)  # JSON list -> tuple: the frozen config stays hashable
    assert LDBConfig.from_dict(cfg.to_dict()) == cfg
    pattern = LDBConfig.from_dict({"enabled": True, "granularity": "block", "block_pattern": r"enc\.layer\.\d+\."})
    assert pattern.block_pattern == r"enc\.layer\.\d+\." and pattern.block_classes is None


@pytest.mark.parametrize("section, message", [
    ({"granularity": "block", "block_classes": "BertLayer"}, "block_classes = 'BertLayer' is not allowed"),
    ({"granularity": "block", "block_classes": []}, "non-empty list of module class names"),
    ({"granularity": "block", "block_classes": ["BertLayer", 3]}, "non-empty list of module class names"),
    ({"granularity": "block", "block_pattern": "layer.(\\d+"}, "block_pattern = 'layer.(\\\\d+' is not allowed"),
    ({"granularity": "block", "block_pattern": 3}, "type str"),
    ({"granularity": "module", "block_classes": ["BertLayer"]}, "only used with granularity 'block'"),
    ({"granularity": "param", "block_pattern": "x"}, "only used with granularity 'block'"),
    ({"granularity": "block", "block_classes": ["A"], "block_pattern": "x"}, "not both"),
])
def test_bad_block_sources_are_named(section, message):
    with pytest.raises(LDBConfigError) as err:
        LDBConfig.from_dict({"enabled": True, **section})
    assert message in str(err.value)


def test_keep_first_and_keep_last_both_zero_is_refused_naming_the_fix():
    with pytest.raises(LDBConfigError, match=r"keep_first = 0 and keep_last = 0.*Set keep_last >= 1"):
        LDBConfig.from_dict({"enabled": True, "keep_first": 0, "keep_last": 0})
    # Nothing can be dropped at drop_rate 0, and one kept unit at either end is enough.
    assert LDBConfig.from_dict({"enabled": True, "keep_first": 0, "keep_last": 0, "drop_rate": 0.0}).keep_last == 0
    assert LDBConfig.from_dict({"enabled": True, "keep_first": 0, "keep_last": 1}).keep_first == 0


def test_json_infinity_in_a_file_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"layer_drop_back": {"enabled": true, "kappa": 1e999}}')  # json reads 1e999 as inf
    with pytest.raises(LDBConfigError, match=r"kappa = inf is not allowed: expected a finite number"):
        LDBConfig.from_ds_config(str(path))
