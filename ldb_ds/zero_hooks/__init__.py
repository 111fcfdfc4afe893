"""The only place where ldb_ds reaches into DeepSpeed's internals (deepspeed==0.19.8).

A DeepSpeed upgrade should be a change to this package alone; tests/dist checks every function
here at ZeRO stages 0-3. Its modules (docs/design.md, sections 2 and 4):

* :mod:`.version` - the verified release range and the source hashes of mirrored functions;
* :mod:`.groups` - the basic optimizer, its wrapper, the group-order check;
* :mod:`.step_filter` - dropped groups hidden inside the basic optimizer's step, and left out
  of DeepSpeed's own post-step all-gather;
* :mod:`.refusals` - settings whose step would bypass the filter, refused before DeepSpeed;
* :mod:`.zero0_step` - the same for ZeRO-0's fp16/bf16 wrapper (``FP16_UnfusedOptimizer``), and the
  fp16 ZeRO-0 loss scaling DeepSpeed 0.19.8 leaves out;
* :mod:`.norms` - all groups' gradient-norm sums in a constant number of ops;
* :mod:`.zero12_step`, :mod:`.zero3_step` - ldb_ds's own versions of ZeRO's per-group step
  loops and gradient norms (one flatten, optimizer call, copy-back and collective for all kept
  groups), and ZeRO-3's stale-gradient clear after a skipped step;
* :mod:`.step_loops` - which of those run on an engine (installed only where checked).

Everything public is re-exported here: ``zero_hooks.X`` is the way the rest of ldb_ds uses it.

How a dropped unit is kept bitwise unchanged at each stage
----------------------------------------------------------
Every stage ends in the *basic* optimizer (the torch or DeepSpeed optimizer the
user configured) being stepped over param groups:

* stage 0, fp32: ``engine.optimizer`` *is* the basic optimizer, stepped once
  over all groups (``engine._take_model_step``);
* stage 0, bf16: ``FP16_UnfusedOptimizer`` keeps an fp32 copy of each parameter
  and steps the basic optimizer once over all groups;
* stage 1, bf16 with ``data_types.grad_accum_dtype: "fp32"`` (not DeepSpeed's default, which is
  the model dtype and gives ``DeepSpeedZeroOptimizer``): ``BF16_Optimizer``
  keeps one flat fp32 partition per param group and steps the basic optimizer
  once over all of them;
* stages 1/2: ``DeepSpeedZeroOptimizer._optimizer_step(i)`` swaps
  ``param_groups`` to ``[group i]`` (one flat fp32 partition) and steps
  (ldb_ds's own loop, :mod:`.zero12_step`: ``[kept groups]``, one call);
* stage 3: ``_optimizer_step(sub_group)`` puts the sub-group's flat partition
  into its group's ``params`` (all other groups empty) and steps (ldb_ds's own
  loop, :mod:`.zero3_step`: the kept sub-groups' groups only, one call).

In every case the group *dicts* are the ones ldb_ds created, in the same order
(DeepSpeed swaps their ``params`` for flat partitions but keeps the dicts).
So :func:`install_group_step_filter` wraps the basic optimizer's ``step`` and,
for the duration of one call, hides the dicts of dropped units from
``param_groups`` (it reads them from the run's :class:`ldb_ds.controller.StepState`). Hidden groups are not looked at at all: no momentum, no
weight decay, no Adam moment, no per-group ``step`` counter moves. Without it,
ZeRO would move dropped units: it turns missing gradients into zeros and steps
the whole flat group, and momentum and weight decay move parameters even with
a zero gradient (docs/design.md, section 4).

The same wrapper applies the DROP-epoch learning-rate factor, only inside the
step, and puts the scheduler's value back afterwards, so any LR scheduler
(DeepSpeed's or torch's) keeps owning ``lr``.

ZeRO-1/2 and BF16_Optimizer then all-gather every group's partition after the step.
Where ldb_ds's own ZeRO-1/2 loop runs it gathers the kept groups only, in one collective;
elsewhere :func:`install_allgather_skip` removes dropped groups from that all-gather: their
values did not change on any rank (every rank skipped the same groups), so each
rank's full copy is already current. That is pure saving, not a correctness need.

ZeRO-Offload (``offload_optimizer: {device: cpu}``, stages 1-3; ``offload_param`` at
stage 3) steps the same basic optimizer over the same group dicts, on fp32 masters in
CPU memory, so the step filter covers it too (docs/design.md, section 4). The offload
paths that step groups some other way are refused before ``deepspeed.initialize`` by
:func:`refuse_unverified_step_paths`.

With ``batch_scaling: "accumulation"`` a DROP epoch changes DeepSpeed's accumulation count;
:func:`set_accumulation_steps` (:mod:`.accumulation`) keeps the epoch's first micro step the
first of a window under DeepSpeed's run-long boundary rule.
"""

from __future__ import annotations

from .accumulation import check_accumulation_boundary, set_accumulation_steps
from .groups import NOT_A_GRADIENT, basic_optimizer, check_group_order, zero_stage
from .step_paths import refuse_unverified_step_paths
from .patches import Kind, Patch, PatchSet, fallback_warning, require_verified
from .step_filter import (FILTER_CALLERS, filter_callers, install_allgather_skip, install_group_step_filter,
                          install_nonfinite_skip, skipping)
from .step_loops import install as install_step_loops
from .step_loops import installed as installed_step_loops
from .version import (MIRRORED_SOURCES, VERIFIED_DEEPSPEED, check_deepspeed_version, deepspeed_version_verified,
                      mirrors_verified, source_digest)
from .zero0_step import fp16_unscaled_at_zero0, install_fp16_loss_scaling
from .zero3_step import clear_stale_gradient_partitions
from .zero12_step import allgather_partitions, install_batched_grad_norm

__all__ = ["VERIFIED_DEEPSPEED", "NOT_A_GRADIENT", "check_deepspeed_version", "deepspeed_version_verified",
           "zero_stage", "basic_optimizer", "check_group_order", "install_group_step_filter",
           "install_allgather_skip", "skipping", "FILTER_CALLERS", "filter_callers", "Kind", "Patch", "PatchSet",
           "require_verified", "fallback_warning", "install_batched_grad_norm", "refuse_unverified_step_paths",
           "clear_stale_gradient_partitions", "install_nonfinite_skip", "install_step_loops", "installed_step_loops",
           "allgather_partitions", "MIRRORED_SOURCES", "mirrors_verified", "source_digest", "fp16_unscaled_at_zero0",
           "install_fp16_loss_scaling", "check_accumulation_boundary", "set_accumulation_steps"]
