"""Cutting real timm/torchvision models into LDB units, and one param group per unit."""

import pytest
import timm
import torch
import torchvision
from timm.optim import param_groups_weight_decay

from ldb_ds.config import LDBConfig, LDBConfigError
from ldb_ds.refusals import check_sampleable
from ldb_ds.units import (build_units, describe_tied_weights, normalise_param_groups,
                          split_groups_by_unit, tied_weights)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {
        "resnet": timm.create_model("resnet18", num_classes=10),
        "vit": timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4),
        "efficientnet": timm.create_model("efficientnet_b0", num_classes=10),
    }


def _covers_each_trainable_param_once(model, units):
    seen = [n for u in units for n in u.param_names]
    assert sorted(seen) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert len(seen) == len(set(seen))
    assert sum(u.numel for u in units) == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["resnet", "vit", "efficientnet"])
@pytest.mark.parametrize("granularity", ["param", "module", "block"])
def test_every_granularity_covers_the_model(models, name, granularity):
    model = models[name]
    units = build_units(model, granularity)
    _covers_each_trainable_param_once(model, units)
    n_params = len(list(model.parameters()))
    if granularity == "param":
        assert len(units) == n_params
    else:
        assert 1 < len(units) < n_params
    # Input to output: the classifier comes last at every granularity.
    assert units[-1].param_names[-1] in ("fc.bias", "head.bias", "classifier.bias")


def test_resnet_module_units(models):
    units = build_units(models["resnet"], "module")
    assert [u.name for u in units[:3]] == ["conv1", "bn1", "layer1.0.conv1"]
    assert units[1].param_names == ("bn1.weight", "bn1.bias")  # a norm layer is one unit: weight and bias
    assert units[-1].name == "fc" and units[-1].param_names == ("fc.weight", "fc.bias")
    assert len(units) == 41  # 20 convs + 20 norms + fc


def test_resnet_blocks_follow_timm_group_matcher(models):
    units = build_units(models["resnet"], "block")
    assert units[0].param_names == ("conv1.weight", "bn1.weight", "bn1.bias")  # the stem
    assert all(n.startswith("layer1.0.") for n in units[1].param_names)
    assert len(units) == 10  # stem, 8 basic blocks, head


def test_timm_block_names_name_every_top_level_part(models):
    """timm's matchers group the final norm with the last block (ViT) and conv_head/bn2 with the
    last block (EfficientNet): the unit's name lists both, not only the first parameter's module
    ("block12:blocks.11.norm1" named the last ViT block together with the final norm)."""
    vit = [u.name for u in build_units(models["vit"], "block")]
    assert vit[0] == "block0:cls_token+pos_embed+patch_embed.proj"
    assert vit[1] == "block1:blocks.0"
    assert vit[-2:] == ["block12:blocks.11+norm", "block13:head"]
    eff = build_units(models["efficientnet"], "block")
    assert eff[0].name == "block0:conv_stem+bn1"
    assert eff[-2].name.endswith(":blocks.6.0+conv_head+bn2")
    assert {n.split(".")[0] for n in eff[-2].param_names} == {"blocks", "conv_head", "bn2"}


def test_vit_module_units_start_with_tokens(models):
    units = build_units(models["vit"], "module")
    assert units[0].name == "<root>" and set(units[0].param_names) == {"cls_token", "pos_embed"}
    assert units[1].name == "patch_embed.proj"
    assert units[-1].name == "head"


def test_parametrized_layers_are_one_module_unit():
    """weight_norm / spectral_norm keep a layer's weight in a ``parametrizations`` submodule: the
    layer still owns it, so weight and bias are one unit and keep_last keeps the whole last layer."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    model = torch.nn.Sequential(parametrizations.weight_norm(torch.nn.Linear(4, 4)), torch.nn.ReLU(),
                                torch.nn.Linear(4, 4), parametrizations.spectral_norm(torch.nn.Linear(4, 2)))
    units = build_units(model, "module")
    assert [u.name for u in units] == ["0", "2", "3"]
    assert sorted(units[0].param_names) == ["0.bias", "0.parametrizations.weight.original0",
                                            "0.parametrizations.weight.original1"]
    assert sorted(units[2].param_names) == ["3.bias", "3.parametrizations.weight.original"]
    root = parametrizations.weight_norm(torch.nn.Linear(3, 3))  # the model itself parametrized
    assert [u.name for u in build_units(root, "module")] == ["<root>"]


def test_block_needs_group_matcher():
    with pytest.raises(LDBConfigError, match="group_matcher"):
        build_units(torchvision.models.resnet18(num_classes=10), "block")


def test_frozen_parameters_belong_to_no_unit(models):
    model = timm.create_model("resnet18", num_classes=10)
    model.conv1.weight.requires_grad_(False)
    units = build_units(model, "module")
    assert all("conv1.weight" != n for u in units for n in u.param_names)


def test_nothing_to_sample_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    units = build_units(model, "module")
    with pytest.raises(LDBConfigError, match=r"none is left to drop.*keep_first \+ keep_last must be at most 1"):
        check_sampleable(units, LDBConfig(enabled=True, keep_first=1, keep_last=1), "Sequential")
    check_sampleable(units, LDBConfig(enabled=True, keep_first=1, keep_last=0))


def test_user_param_groups_are_split_by_unit_keeping_hyperparameters(models):
    model = models["resnet"]
    user_groups = normalise_param_groups(model, param_groups_weight_decay(model, weight_decay=0.05))
    units = build_units(model, "module")
    groups, unit_of_group = split_groups_by_unit(units, user_groups)
    assert len(groups) == len(unit_of_group)
    by_id = {id(p): g for g in groups for p in g["params"]}
    names = dict((id(p), n) for n, p in model.named_parameters())
    for pid, g in by_id.items():
        # timm: no weight decay for biases and 1-d (norm) parameters.
        expected = 0.0 if (names[pid].endswith(".bias") or model.get_parameter(names[pid]).ndim <= 1) else 0.05
        assert g["weight_decay"] == expected, names[pid]
    # Each group's params lie in one unit; the fc unit gets two groups (weight decays, bias doesn't).
    fc = len(units) - 1
    assert [len(groups[i]["params"]) for i, u in enumerate(unit_of_group) if u == fc] == [1, 1]
    assert sorted(unit_of_group) == unit_of_group


def test_model_parameters_forms():
    model = torch.nn.Linear(2, 2)
    assert len(normalise_param_groups(model, None)[0]["params"]) == 2
    assert len(normalise_param_groups(model, model.parameters())[0]["params"]) == 2
    with pytest.raises(ValueError, match="empty"):
        normalise_param_groups(model, [])
    with pytest.raises(ValueError, match="no 'params'"):
        normalise_param_groups(model, [{"lr": 1}])


class Layer(torch.nn.Module):  # stands for a transformer block class (e.g. BertLayer)
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.inner = Inner()


class Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ff = torch.nn.Linear(4, 4)


class Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.layer = torch.nn.ModuleList([Layer() for _ in range(3)])
        self.head = torch.nn.Linear(4, 2)


def test_block_classes_make_one_unit_per_block_and_modules_elsewhere():
    model = Encoder()
    # Nested classes: the outermost instance owns its parameters.
    units = build_units(model, "block", block_classes=["Layer", "Inner"])
    assert [u.name for u in units] == ["embed", "block:layer.0", "block:layer.1", "block:layer.2", "head"]
    assert units[1].param_names == ("layer.0.attn.weight", "layer.0.attn.bias", "layer.0.norm.weight",
                                    "layer.0.norm.bias", "layer.0.inner.ff.weight", "layer.0.inner.ff.bias")
    _covers_each_trainable_param_once(model, units)


def test_block_pattern_groups_by_matched_text():
    model = Encoder()
    units = build_units(model, "block", block_pattern=r"layer\.\d+\.")
    assert [u.name for u in units] == ["embed", "block:layer.0", "block:layer.1", "block:layer.2", "head"]
    # A pattern wins over group_matcher-less fallbacks and may span a block's sub-modules only.
    attn_only = build_units(model, "block", block_pattern=r"layer\.\d+\.attn")
    assert [u.name for u in attn_only][:4] == ["embed", "block:layer.0.attn", "layer.0.norm", "layer.0.inner.ff"]
    _covers_each_trainable_param_once(model, attn_only)


def test_block_sources_that_match_nothing_are_clear_errors():
    model = Encoder()
    with pytest.raises(LDBConfigError, match=r"block_classes = \['BertLayer'\]: no module of these classes.*Layer"):
        build_units(model, "block", block_classes=["BertLayer"])
    with pytest.raises(LDBConfigError, match=r"block_pattern = 'decoder' matches no trainable parameter"):
        build_units(model, "block", block_pattern="decoder")
    with pytest.raises(LDBConfigError, match="block_pattern, block_classes, a timm model"):
        build_units(model, "block")


def test_block_falls_back_to_hugging_face_no_split_modules():
    model = Encoder()
    model._no_split_modules = ["Layer"]  # what a transformers PreTrainedModel declares
    units = build_units(model, "block")
    assert [u.name for u in units] == ["embed", "block:layer.0", "block:layer.1", "block:layer.2", "head"]
    model._no_split_modules = ["DecoderLayer"]
    with pytest.raises(LDBConfigError, match=r"Encoder._no_split_modules = \['DecoderLayer'\]: no module"):
        build_units(model, "block")


class TiedLM(torch.nn.Module):  # a language model whose head shares the embedding's weight (GPT-2 style)
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.layer = torch.nn.ModuleList([Layer() for _ in range(3)])
        self.norm = torch.nn.LayerNorm(4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_tied_weight_is_one_unit_at_its_first_use_and_is_described():
    model = TiedLM()
    units = build_units(model, "module")
    assert units[0].param_names == ("embed.weight",) and units[-1].name == "norm"  # the head has no unit
    assert all("head.weight" not in u.param_names for u in units)
    tied = tied_weights(model, units)
    assert [(t.unit_index, t.names) for t in tied] == [(0, ("embed.weight", "head.weight"))]
    kept = describe_tied_weights(tied, units, LDBConfig(enabled=True, keep_first=1, keep_last=1))
    assert "'embed.weight' is also 'head.weight'" in kept and "it is never dropped" in kept
    assert "keep_last = 1 keeps 'norm'" in kept
    droppable = describe_tied_weights(tied, units, LDBConfig(enabled=True, keep_first=0, keep_last=1))
    assert "it can be dropped" in droppable and "set keep_first >= 1" in droppable
    assert tied_weights(Encoder(), build_units(Encoder(), "module")) == []
