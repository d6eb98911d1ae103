"""A Hugging Face model folder for a merge: the inputs' config and tokenizer files beside the
merged weights, so ``from_pretrained`` loads the result."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..io import atomic_write

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
SKIPPED = ("README.md",)  # the merge writes its own model card


def copy_hf_files(src: Path, dest: Path) -> list[Path]:
    """Every file of ``src`` but its weights and shard indexes (config, tokenizer, generation
    config...), copied into ``dest`` atomically."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for item in sorted(src.iterdir()):
        if (
            not item.is_file()
            or item.suffix in WEIGHT_SUFFIXES
            or item.name.endswith(".index.json")
            or item.name in SKIPPED
        ):
            continue
        atomic_write(dest / item.name, lambda tmp, item=item: shutil.copyfile(item, tmp))
        copied.append(dest / item.name)
    return copied
