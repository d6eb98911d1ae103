"""Hugging Face models: built from a folder's config, tied weights, model cards.

transformers is imported only when one of these is called (the ``hf`` extra).

- :func:`build_hf_model`: the class named in ``config.json``'s ``architectures`` (or the one a
  ``task`` asks for), built from the config alone: the weights come from the candidates.
- :func:`tied_names`: which state-dict names are tied to another (GPT-2's ``lm_head.weight`` is
  ``transformer.wte.weight``). Merges gate each tied group once and keep it tied; checkpoints
  saved without the tied copy (``save_pretrained`` drops it) still fit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .errors import ConfigError

# task -> the Auto class that builds it
TASKS = {
    "causal_lm": "AutoModelForCausalLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
    "masked_lm": "AutoModelForMaskedLM",
    "seq2seq_lm": "AutoModelForSeq2SeqLM",
    "base": "AutoModel",
}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - the hf extra is not installed
        raise ConfigError("model.hf needs transformers: pip install 'softmerge[hf]'") from exc
    return transformers


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder}: no config.json: not a Hugging Face model folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return data


def build_hf_model(folder: Path, task: str | None = None) -> nn.Module:
    """The model of a Hugging Face folder, from its config (random weights, no download)."""
    transformers = _transformers()
    raw = read_config(folder)
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{folder}/config.json: transformers cannot read it: {exc}") from exc
    if task is not None:
        cls = getattr(transformers, TASKS[task])
        return cls.from_config(config)
    names = raw.get("architectures") or []
    if not names:
        raise ConfigError(
            f"{folder}/config.json: no 'architectures' entry; set model.task ({', '.join(TASKS)})"
        )
    cls = getattr(transformers, names[0], None)
    if cls is None:
        raise ConfigError(
            f"{folder}/config.json: architecture {names[0]!r} is not a transformers class; "
            f"set model.task ({', '.join(TASKS)})"
        )
    return cls._from_config(config)


def tied_names(model: nn.Module | None) -> dict[str, str]:
    """``{tied name: the name it is tied to}`` for parameters shared under several names; the
    name kept is the first one ``named_parameters()`` gives."""
    if model is None:
        return {}
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        key = id(param)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def missing_aliases(keys: Sequence[str], aliases: Mapping[str, str]) -> dict[str, str]:
    """Tied names a checkpoint lacks, mapped to the tied name it has (``lm_head.weight`` ->
    ``transformer.wte.weight`` for a GPT-2 saved by ``save_pretrained``)."""
    have = set(keys)
    out = {}
    for alias, canonical in aliases.items():
        if alias not in have and canonical in have:
            out[alias] = canonical
        elif canonical not in have and alias in have:
            out[canonical] = alias
    return out


def model_card(
    method: str,
    candidates: Mapping[str, str],
    *,
    base: str | None = None,
    params: Mapping[str, Any] | None = None,
    gates: Mapping[str, Mapping[str, Any]] | None = None,
    results: Sequence[Mapping[str, Any]] = (),
) -> str:
    """A README.md for a merged Hugging Face folder: method, candidates, gates, results."""
    from . import __version__
    from .report import format_markdown_table

    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, softmerge]",
        "---",
        "",
        f"# Merged with softmerge {__version__}: `{method}`",
        "",
        "## Candidates",
        "",
    ]
    lines += [f"- `{name}`: {source}" for name, source in candidates.items()]
    if base:
        lines += ["", f"Base (θ₀ of the task vectors): {base}"]
    if params:
        shown = ", ".join(f"{k}={v!r}" for k, v in params.items() if v is not None)
        lines += ["", f"Parameters: {shown}"]
    if gates:
        rows = [{"candidate": name, **row} for name, row in gates.items()]
        lines += ["", "## Gates per candidate", "", format_markdown_table(rows, floatfmt=".3f")]
    if results:
        lines += ["", "## Results", "", format_markdown_table(list(results), floatfmt=".3f")]
    lines.append("")
    return "\n".join(lines)
