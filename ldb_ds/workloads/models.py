"""Model factory of ldb-train and ldb-bench: any timm model by name, torchvision models as ``tv:<name>``.

``create_model("resnet50", num_classes=10, img_size=32)`` builds timm's ResNet-50 with a
10-way head and, because the input is small, a CIFAR-size stem.

Why a stem adaptation
---------------------
ImageNet models shrink a 224-pixel image by 4 in their stem (a stride-2 7x7 conv and a stride-2
max-pool, or a stride-2 3x3 conv) and by 32 in total. A 32-pixel CIFAR image would leave the stem
at 8x8 and the last stage at 1x1, which costs several points of accuracy. The usual CIFAR
versions of these networks (e.g. the ResNet of He et al. for CIFAR, kuangliu/pytorch-cifar) keep
full resolution in the stem instead. With ``stem="auto"`` (the default) the adaptation is applied
when ``img_size <= 64``; ``stem="cifar"`` forces it and ``stem="original"`` turns it off.

What is changed, per family (nothing else is touched; the head is sized by ``num_classes``):

=====================================  =======================================================  ==============
family                                 change                                                   total stride
=====================================  =======================================================  ==============
timm ResNet / ResNeXt / SE-ResNet      7x7 stride-2 ``conv1`` -> new 3x3 stride-1 conv (deep    32 -> 8
(``resnet50``, ``resnet10t``, ...)     stems: first conv's stride 2 -> 1); ``maxpool`` removed
timm DenseNet (``densenet121``)        ``features.conv0`` 7x7/2 -> new 3x3/1; ``features.pool0``  32 -> 8
                                       removed
timm EfficientNet / MobileNet          ``conv_stem`` stride 2 -> 1 (weights kept)               32 -> 16
(``efficientnet_b0``, ``mobilenetv2_100``)
timm DLA (``dla34``)                   ``level1`` conv stride 2 -> 1 (its stem is already       32 -> 16
                                       stride 1; weights kept)
timm ViT (``vit_base_patch16_224``)    built with ``img_size=img_size`` and ``patch_size=4``    8x8 tokens
                                       (timm resamples pretrained patch/position embeddings)     at 32 px
timm Swin (``swin_base_patch4_window7_224``) built with ``img_size``, ``patch_size=2``,          16x16 tokens
                                       ``window_size=4``                                         at 32 px
tv: ResNet / ResNeXt / Wide-ResNet     ``conv1`` -> new 3x3/1; ``maxpool`` removed              32 -> 8
tv: ShuffleNetV2 (``tv:shufflenet_v2_x1_0``)  ``conv1[0]`` stride 2 -> 1; ``maxpool`` removed   32 -> 8
tv: MobileNetV2/V3, EfficientNet       ``features[0][0]`` stride 2 -> 1                         32 -> 16
tv: DenseNet                           ``features.conv0`` -> new 3x3/1; ``features.pool0`` removed  32 -> 8
=====================================  =======================================================  ==============

Other models are built unchanged (a warning says so when the input is small). A replaced conv
is freshly initialised: with ``pretrained=True`` that one layer trains from scratch while the
rest loads the pretrained weights; stride-only changes keep the pretrained weights.

ShuffleNetV2 is not in timm; the paper's ShuffleNetV2 is ``tv:shufflenet_v2_x1_0``.

Pretrained weights come from the libraries' own loaders (timm: the Hugging Face hub cache or
``pretrained_path``; torchvision: ``weights="DEFAULT"`` from the torch hub cache). Nothing here
downloads on its own initiative; with no network and no cache the library's error is passed on.
"""

from __future__ import annotations

import difflib
import logging
import warnings
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

TV_PREFIX = "tv:"
STEMS = ("auto", "cifar", "original")
SMALL_INPUT_MAX = 64
"""``stem="auto"`` adapts the stem when ``img_size <= SMALL_INPUT_MAX``."""

PAPER_MODELS = {
    "ResNet-50": "resnet50",
    "MobileNetV2": "mobilenetv2_100",
    "EfficientNet-B0": "efficientnet_b0",
    "DenseNet-121": "densenet121",
    "DLA-34": "dla34",
    "ShuffleNetV2": "tv:shufflenet_v2_x1_0",
    "ViT-B/16": "vit_base_patch16_224",
    "Swin-B": "swin_base_patch4_window7_224",
}
"""The models of the paper's experiments and the names that build them here."""


class ModelError(ValueError):
    """An unknown model name or a model option that cannot be honoured."""


def create_model(
    name: str,
    num_classes: int,
    img_size: int = 32,
    in_chans: int = 3,
    pretrained: bool = False,
    pretrained_path: str | None = None,
    stem: str = "auto",
    grad_checkpointing: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build ``name`` (timm name, or ``tv:<torchvision name>``) for ``num_classes`` classes.

    Args:
        name: a timm model name (``timm.list_models()``) or ``tv:`` + a torchvision
            classification model name (``torchvision.models.list_models(torchvision.models)``).
        num_classes: size of the classifier head (the dataset's class count).
        img_size: input resolution; decides the stem adaptation (see the module docstring) and
            is passed to timm's transformers, whose position embeddings depend on it.
        in_chans: input channels (timm only; torchvision models take 3).
        pretrained: load the library's pretrained weights (head re-sized for ``num_classes``).
        pretrained_path: timm only: a local weights file to load instead of the hub
            (``timm.create_model(..., pretrained_cfg_overlay={"file": path})``).
        stem: ``auto`` (adapt when ``img_size <= 64``), ``cifar`` (always) or ``original``.
        grad_checkpointing: timm only: ``model.set_grad_checkpointing()``; a torchvision model or
            a timm model without it raises :class:`ModelError`. With LDB on, call
            :func:`check_grad_checkpointing` with ``ldb_enabled=True`` first (``ldb-train`` does).
        **kwargs: passed on to ``timm.create_model`` / the torchvision builder
            (e.g. ``drop_rate``, ``drop_path_rate``).
    """
    if stem not in STEMS:
        raise ModelError(f"stem={stem!r} is not allowed: expected one of {', '.join(STEMS)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive integer, got {num_classes!r}")
    small = stem == "cifar" or (stem == "auto" and img_size <= SMALL_INPUT_MAX)
    if name.startswith(TV_PREFIX):
        if pretrained_path:
            raise ModelError("pretrained_path is for timm models; torchvision loads its own "
                             "weights from the torch hub cache (TORCH_HOME)")
        if in_chans != 3:
            raise ModelError(f"torchvision models take 3 input channels, got in_chans={in_chans}")
        model = _create_torchvision(name[len(TV_PREFIX):], num_classes, img_size, pretrained,
                                    small, **kwargs)
    else:
        model = _create_timm(name, num_classes, img_size, in_chans, pretrained, pretrained_path,
                             small, **kwargs)
    if grad_checkpointing:
        check_grad_checkpointing(name, ldb_enabled=False)  # whether LDB is on is the caller's to check
        try:
            model.set_grad_checkpointing(True)
        except (AssertionError, NotImplementedError) as err:  # timm's way of saying "not supported"
            raise ModelError(f"{name} does not support gradient checkpointing in timm ({err or 'no reason given'}); "
                             "run without --grad-checkpointing") from None
    return model


def check_grad_checkpointing(name: str, ldb_enabled: bool = True) -> None:
    """Raise :class:`ModelError` where ``--grad-checkpointing`` cannot be exact with ``name``.

    timm recomputes each block's activations in the backward with torch's checkpoint. Its
    default, non-reentrant checkpointing, is exact with LDB: the same weights bit for bit as
    without it, because a dropped unit's ``requires_grad=False`` does not change what the
    recomputation gives the kept units. Reentrant checkpointing (``TIMM_REENTRANT_CKPT=1``)
    gives a block's weights no gradient when none of the block's inputs requires grad, which
    happens under LDB when every unit ahead of it is dropped: the kept units in it would then
    be stepped with no gradient (momentum and weight decay only), silently. It is refused with
    LDB on. torchvision's classification models have no checkpointing switch.
    """
    if name.startswith(TV_PREFIX):
        raise ModelError(f"--grad-checkpointing is for timm models: torchvision's {name[len(TV_PREFIX):]} "
                         "has no gradient-checkpointing switch")
    from timm.layers import use_reentrant_ckpt

    if ldb_enabled and use_reentrant_ckpt():
        raise ModelError("--grad-checkpointing with TIMM_REENTRANT_CKPT set: reentrant checkpointing gives a block "
                         "no weight gradient when LDB drops every unit ahead of it, so its kept units would be "
                         "stepped without one. Unset TIMM_REENTRANT_CKPT (timm's default, non-reentrant "
                         "checkpointing, is exact with LDB)")


def check_model_name(name: str) -> None:
    """Raise :class:`ModelError` (with close matches) if ``name`` names no timm/torchvision model."""
    if name.startswith(TV_PREFIX):
        import torchvision

        known = torchvision.models.list_models(module=torchvision.models)
        if name[len(TV_PREFIX):] not in known:
            raise ModelError(_unknown_message(name, [TV_PREFIX + k for k in known], "torchvision",
                                              "torchvision.models.list_models(torchvision.models)"))
        return
    import timm

    if not timm.models.is_model(name):
        raise ModelError(_unknown_message(name, timm.list_models(), "timm",
                                          "timm.list_models('*pattern*')"))


# --------------------------------------------------------------------------------------------
# timm

def _create_timm(name, num_classes, img_size, in_chans, pretrained, pretrained_path, small,
                 **kwargs) -> nn.Module:
    import timm
    from timm.models import is_model_in_modules

    check_model_name(name)
    if pretrained_path:
        kwargs["pretrained_cfg_overlay"] = dict(file=pretrained_path)
        pretrained = True
    # Transformers size their position embeddings from img_size at construction time.
    if is_model_in_modules(name, ["vision_transformer", "deit", "vision_transformer_hybrid"]):
        kwargs.setdefault("img_size", img_size)
        if small:
            kwargs.setdefault("patch_size", 4)
    elif is_model_in_modules(name, ["swin_transformer", "swin_transformer_v2"]):
        kwargs.setdefault("img_size", img_size)
        if small:
            kwargs.setdefault("patch_size", 2)
            kwargs.setdefault("window_size", 4)
    model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes,
                              in_chans=in_chans, **kwargs)
    if small:
        _adapt_timm_stem(name, model)
    return model


def _adapt_timm_stem(name: str, model: nn.Module) -> None:
    from timm.models.densenet import DenseNet
    from timm.models.dla import DLA
    from timm.models.efficientnet import EfficientNet
    from timm.models.resnet import ResNet

    if isinstance(model, ResNet):
        if isinstance(model.conv1, nn.Conv2d):
            model.conv1 = _small_conv(model.conv1)
        else:  # deep stem (e.g. resnet10t, resnet50d): a Sequential whose first conv has stride 2
            _set_stride(model.conv1[0], 1)
        model.maxpool = nn.Identity()
    elif isinstance(model, DenseNet):
        model.features.conv0 = _small_conv(model.features.conv0)
        if hasattr(model.features, "pool0"):
            model.features.pool0 = nn.Identity()
    elif isinstance(model, EfficientNet):  # also MobileNetV2 / MixNet / MnasNet in timm
        _set_stride(model.conv_stem, 1)
    elif isinstance(model, DLA):
        _set_stride(model.level1[0], 1)
    elif type(model).__name__ in ("VisionTransformer", "SwinTransformer", "SwinTransformerV2"):
        pass  # adapted at construction (img_size / patch_size / window_size)
    else:
        warnings.warn(f"no small-input stem adaptation is known for {name} "
                      f"({type(model).__name__}); it is built unchanged", stacklevel=3)


# --------------------------------------------------------------------------------------------
# torchvision

def _create_torchvision(name, num_classes, img_size, pretrained, small, **kwargs) -> nn.Module:
    import torchvision

    check_model_name(TV_PREFIX + name)
    if name.startswith("vit_"):
        kwargs.setdefault("image_size", img_size)
    if pretrained:
        # torchvision refuses num_classes != 1000 together with weights: load, then swap the head.
        model = torchvision.models.get_model(name, weights="DEFAULT", **kwargs)
        _replace_last_linear(model, num_classes)
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if small:
        _adapt_torchvision_stem(name, model)
    return model


def _adapt_torchvision_stem(name: str, model: nn.Module) -> None:
    from torchvision import models as tvm

    if isinstance(model, tvm.ResNet):
        model.conv1 = _small_conv(model.conv1)
        model.maxpool = nn.Identity()
    elif isinstance(model, tvm.ShuffleNetV2):
        _set_stride(model.conv1[0], 1)
        model.maxpool = nn.Identity()
    elif isinstance(model, (tvm.MobileNetV2, tvm.MobileNetV3, tvm.EfficientNet)):
        _set_stride(model.features[0][0], 1)
    elif isinstance(model, tvm.DenseNet):
        model.features.conv0 = _small_conv(model.features.conv0)
        model.features.pool0 = nn.Identity()
    else:
        warnings.warn(f"no small-input stem adaptation is known for tv:{name} "
                      f"({type(model).__name__}); it is built unchanged (for ViT/Swin at 32 px "
                      "prefer the timm models, whose patch size can be set)", stacklevel=3)


def _replace_last_linear(model: nn.Module, num_classes: int) -> None:
    """Swap the last ``nn.Linear`` (the classifier in every torchvision classifier) for a new one."""
    last = None
    for qualname, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = qualname
    if last is None:
        raise ModelError(f"cannot find a linear classifier to resize in {type(model).__name__}")
    parent_name, _, child = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    if old.out_features != num_classes:
        setattr(parent, child, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


# --------------------------------------------------------------------------------------------
# helpers

def _small_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A freshly initialised 3x3 stride-1 conv with ``conv``'s channels (replaces a 7x7/2 stem)."""
    return nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=3, stride=1, padding=1,
                     bias=conv.bias is not None)


def _set_stride(conv: nn.Module, stride: int) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise ModelError(f"expected a Conv2d for the stem adaptation, found {type(conv).__name__}")
    conv.stride = (stride, stride)
    # timm's "same"-padding convs compute their padding from the stride at forward time; plain
    # convs keep their symmetric padding, which is right for stride 1 and odd kernels.


def _unknown_message(name: str, known: list[str], library: str, how: str) -> str:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return (f"unknown model {name!r}: not a {library} model name.{hint} List the names with "
            f"{how}; torchvision models take the prefix '{TV_PREFIX}' (e.g. tv:resnet18).")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["create_model", "check_model_name", "check_grad_checkpointing", "ModelError", "PAPER_MODELS", "TV_PREFIX",
           "STEMS", "count_parameters"]
