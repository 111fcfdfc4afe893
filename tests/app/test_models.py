"""The model factory: the paper's models at CIFAR size, the stem adaptation, clear errors."""

import pytest
import torch

from ldb_ds.workloads.models import PAPER_MODELS, ModelError, check_model_name, create_model


@pytest.mark.parametrize("label", sorted(PAPER_MODELS))
def test_paper_models_build_and_run_at_32px(label):
    torch.manual_seed(0)
    model = create_model(PAPER_MODELS[label], num_classes=10, img_size=32).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10), label
    assert torch.isfinite(out).all(), label


def _last_feature_size(model, img=32):
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, img, img))
    return feats.shape[-1]


@pytest.mark.parametrize("name,cifar,original", [
    ("resnet50", 4, 1),          # conv1 3x3/1 and no maxpool: total stride 8
    ("resnet10t", 4, 1),         # deep stem: first conv stride 1, no maxpool
    ("densenet121", 4, 1),
    ("efficientnet_b0", 2, 1),   # conv_stem stride 1: total stride 16
    ("mobilenetv2_100", 2, 1),
    ("dla34", 2, 1),             # level1 stride 1
])
def test_stem_adaptation_keeps_resolution(name, cifar, original):
    adapted = create_model(name, num_classes=10, img_size=32).eval()
    plain = create_model(name, num_classes=10, img_size=32, stem="original").eval()
    assert _last_feature_size(adapted) == cifar
    assert _last_feature_size(plain) == original
    # Large inputs keep the ImageNet stem under stem="auto".
    big = create_model(name, num_classes=10, img_size=224)
    assert type(big.get_submodule(big.pretrained_cfg["first_conv"])) is type(
        plain.get_submodule(plain.pretrained_cfg["first_conv"]))


def test_torchvision_models_with_prefix():
    m = create_model("tv:shufflenet_v2_x1_0", num_classes=7, img_size=32).eval()
    assert m.conv1[0].stride == (1, 1) and isinstance(m.maxpool, torch.nn.Identity)
    with torch.no_grad():
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    r = create_model("tv:resnet18", num_classes=3, img_size=32)
    assert r.conv1.kernel_size == (3, 3) and r.fc.out_features == 3
    r224 = create_model("tv:resnet18", num_classes=3, img_size=224)
    assert r224.conv1.kernel_size == (7, 7)


def test_transformers_take_img_size():
    vit = create_model("vit_base_patch16_224", num_classes=10, img_size=32)
    assert vit.patch_embed.patch_size == (4, 4) and vit.patch_embed.num_patches == 64
    swin = create_model("swin_base_patch4_window7_224", num_classes=10, img_size=32)
    assert swin.patch_embed.patch_size == (2, 2)


def test_num_classes_from_caller():
    m = create_model("resnet18", num_classes=100, img_size=32)
    assert m.get_classifier().out_features == 100


def test_unknown_model_names_are_clear():
    with pytest.raises(ModelError, match=r"unknown model 'resnet5O'.*Did you mean.*resnet50"):
        create_model("resnet5O", num_classes=10)
    with pytest.raises(ModelError, match=r"unknown model 'tv:resnet19'.*tv:resnet18"):
        check_model_name("tv:resnet19")
    with pytest.raises(ModelError, match="stem="):
        create_model("resnet18", num_classes=10, stem="tiny")
