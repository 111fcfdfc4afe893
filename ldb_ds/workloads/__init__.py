"""What ldb-train and ldb-bench both run: datasets, models and their evaluation.

:mod:`.data` builds the datasets (the bundled digits, CIFAR, ImageFolder, synthetic) and the
per-rank evaluation shards; :mod:`.models` creates timm and torchvision models with the small-input
stem; :mod:`.batches` reads a loader so that every rank learns of a batch that failed on another;
:mod:`.evaluation` measures top-1/top-5 and loss over all ranks. The two applications import
this package and the core, never each other; this package imports the core only (docs/design.md,
section 2). Needs the ``train`` extra (torchvision, timm). Importing the package itself loads
nothing: each module is imported where it is used.
"""
