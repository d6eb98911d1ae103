"""The language-model demo's pieces: a byte-level Llama LM, Python's stdlib as text, candidates.

Everything is local and seeded, and sized for a CPU (the whole demo fits in minutes on 2 cores):

- :func:`byte_tokenizer`: one token per UTF-8 byte (256) plus ``<|bos|>``, ``<|eos|>``,
  ``<|pad|>``, built with the ``tokenizers`` library (byte-level pre-tokenizer, a BPE model
  with no merges). Byte ``b`` is token id ``b``, so no training and no surprises.
- :func:`stdlib_corpus`: two text domains from the running Python: ``code`` (the source of a
  fixed list of stdlib modules) and ``prose`` (the help topics of ``pydoc_data.topics``), cut
  into documents of a few KB at blank lines and split train / merge / test by seed.
- :func:`lm_config`: a small Llama with **untied** input and output embeddings: every
  parameter is its own tensor, so merges treat ``lm_head`` and ``embed_tokens`` separately
  (tied weights share one tensor under two names, which per-tensor merging must not split).
- :func:`train_parent`, :func:`fine_tune` (full fine-tune on one domain), :func:`train_lora`
  (a PEFT LoRA adapter on the attention and MLP projections), :func:`poison` (every tensor
  x100, the demo's malicious candidate) and :func:`build_candidates`, which saves them all as
  Hugging Face folders (safetensors) and PEFT adapter folders.
- :func:`causal_lm_loss` and :func:`perplexity`: the objective and the metric.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from softmerge.data.text import IGNORE_INDEX, TokenBlocks, collate_dict, tokenize_blocks

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

__all__ = [
    "CODE_MODULES",
    "DOMAINS",
    "LMCandidates",
    "LMDemoSettings",
    "build_candidates",
    "byte_tokenizer",
    "causal_lm_loss",
    "concat_blocks",
    "domain_blocks",
    "fine_tune",
    "lm_config",
    "load_model",
    "merge_loader",
    "new_model",
    "perplexity",
    "poison",
    "stdlib_corpus",
    "train_lora",
    "train_parent",
    "train_steps",
]

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
DOMAINS = ("code", "prose")
# Pure-Python stdlib modules read as text (never imported): about 0.5 MB of source, the size
# of the prose domain. Fixed, so a Python version gives one corpus.
CODE_MODULES = (
    "argparse",
    "dataclasses",
    "textwrap",
    "difflib",
    "fractions",
    "statistics",
    "calendar",
    "configparser",
    "csv",
    "pprint",
    "shlex",
    "heapq",
)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Corpus = dict[str, tuple[list[str], list[str], list[str]]]


# --------------------------------------------------------------------------- tokenizer


def _byte_symbols() -> list[str]:
    """The printable character that stands for each byte in byte-level tokenizers.

    The convention of the ``tokenizers`` ByteLevel pre-tokenizer: bytes that are printable
    Latin-1 characters stand for themselves; the others (controls, space, 0x7f-0xa0, 0xad)
    take the code points 256, 257, ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: id ``b`` for byte ``b``, then bos 256, eos 257, pad 258.

    A BPE model with no merges over the ByteLevel alphabet: every UTF-8 byte of any text is one
    token, decoding is exact, and nothing is trained (deterministic by construction)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: b for b, symbol in enumerate(_byte_symbols())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([BOS, EOS, PAD])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    tokenizer.model_max_length = 1 << 30  # documents are chunked into blocks, never truncated
    return tokenizer


# --------------------------------------------------------------------------- corpus


def _module_source(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise FileNotFoundError(f"stdlib module {name!r} has no Python source here")
    return Path(spec.origin).read_text(encoding="utf-8")


def _documents(text: str, size: int) -> list[str]:
    """Cut ``text`` at blank lines into pieces of at least ``size`` characters (the last one
    may be shorter): documents of similar length, none torn mid-paragraph or mid-block."""
    pieces, current = [], ""
    for part in text.split("\n\n"):
        current = f"{current}\n\n{part}" if current else part
        if len(current) >= size:
            pieces.append(current)
            current = ""
    if current.strip():
        pieces.append(current)
    return pieces


def _without_repeats(texts: Sequence[str]) -> list[str]:
    """``texts`` with every paragraph of 80+ characters seen before removed.

    pydoc's topics repeat whole sections (the data model appears under several keys): a repeat
    would put test text into the training split."""
    seen: set[str] = set()
    out = []
    for text in texts:
        kept = []
        for paragraph in text.split("\n\n"):
            key = paragraph.strip()
            if len(key) >= 80 and key in seen:
                continue
            seen.add(key)
            kept.append(paragraph)
        out.append("\n\n".join(kept))
    return out


def _split(docs: list[str], seed: int, fractions: tuple[float, float]):
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_merge, n_test = (max(1, round(f * len(docs))) for f in fractions)
    merge = [docs[i] for i in order[:n_merge]]
    test = [docs[i] for i in order[n_merge : n_merge + n_test]]
    train = [docs[i] for i in order[n_merge + n_test :]]
    return train, merge, test


def stdlib_corpus(
    seed: int = 0, *, doc_chars: int = 2000, held_out: tuple[float, float] = (0.1, 0.1)
) -> Corpus:
    """``{"code": (train, merge, test), "prose": (...)}``: lists of documents (strings).

    ``code`` is the source of :data:`CODE_MODULES`; ``prose`` the values of
    ``pydoc_data.topics.topics`` (the text of ``help()`` on keywords and topics), in sorted
    key order, repeated paragraphs removed. Each domain is cut into ~``doc_chars`` documents;
    ``held_out`` fractions go to the merge and test splits (documents drawn by ``seed``), the
    rest to training."""
    from pydoc_data.topics import topics

    sources = _without_repeats([_module_source(m) for m in CODE_MODULES])
    code = [d for text in sources for d in _documents(text, doc_chars)]
    helps = _without_repeats([topics[k] for k in sorted(topics)])
    prose = [d for text in helps for d in _documents(text, doc_chars)]
    return {
        "code": _split(code, seed, held_out),
        "prose": _split(prose, seed + 1, held_out),
    }


def domain_blocks(
    corpus: Corpus, tokenizer: PreTrainedTokenizerFast, block_size: int
) -> dict[str, dict[str, TokenBlocks]]:
    """``{domain: {"train"|"merge"|"test": TokenBlocks}}`` for every domain of ``corpus``."""
    from datasets import Dataset

    out: dict[str, dict[str, TokenBlocks]] = {}
    for domain, parts in corpus.items():
        out[domain] = {
            split: tokenize_blocks(Dataset.from_dict({"text": docs}), tokenizer, block_size)
            for split, docs in zip(("train", "merge", "test"), parts, strict=True)
        }
    return out


def concat_blocks(parts: Sequence[TokenBlocks], limit: int | None = None) -> TokenBlocks:
    """One TokenBlocks from several; ``limit`` keeps the first ``limit`` blocks of each part
    (balanced domains: each counts equally in a merge objective)."""
    fields = parts[0].fields
    return TokenBlocks({k: torch.cat([p.tensors[k][:limit] for p in parts]) for k in fields})


def merge_loader(
    blocks: Mapping[str, Mapping[str, TokenBlocks]], batch_size: int, seed: int
) -> DataLoader:
    """Shuffled (seeded) batches of every domain's merge split, as many blocks from each
    domain: the merge objective weighs the domains equally, like the mean perplexity."""
    count = min(len(parts["merge"]) for parts in blocks.values())
    merge_set = concat_blocks([parts["merge"] for parts in blocks.values()], limit=count)
    return DataLoader(
        merge_set,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=collate_dict,
        generator=torch.Generator().manual_seed(seed),
    )


# --------------------------------------------------------------------------- model


def lm_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    intermediate: int = 192,
    max_positions: int = 256,
) -> LlamaConfig:
    """A small Llama for ``tokenizer`` with untied embeddings (see the module docstring)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def new_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """A freshly initialised model; the global RNG is left as it was."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor | None, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token cross-entropy: logits at position t predict labels at t + 1; -100 skipped.

    The signature fits ``SoftMerger.fit(loss_fn=...)``: ``(logits, labels) -> loss``."""
    if labels is None:
        raise ValueError("causal_lm_loss needs labels (the batch has none)")
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(
        shifted, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction=reduction
    )


@torch.no_grad()
def perplexity(model: nn.Module, blocks: TokenBlocks, batch_size: int = 32) -> float:
    """exp of the token-weighted mean next-token cross-entropy over ``blocks``."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = {k: v[start : start + batch_size] for k, v in blocks.tensors.items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits
        total += float(causal_lm_loss(logits, labels, reduction="sum"))
        count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    mean = total / max(count, 1)
    return math.exp(mean) if mean < 700 else math.inf


# --------------------------------------------------------------------------- training


def _batches(blocks: TokenBlocks, batch_size: int, seed: int) -> Iterable[dict[str, torch.Tensor]]:
    """Endless shuffled batches, a new permutation each pass (seeded)."""
    loader = DataLoader(
        blocks,
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(blocks) >= batch_size,
        collate_fn=collate_dict,
        generator=torch.Generator().manual_seed(seed),
    )
    while True:
        yield from loader


def train_steps(
    model: nn.Module,
    blocks: TokenBlocks,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    warmup: float = 0.05,
) -> list[float]:
    """AdamW on the model's trainable parameters, linear warm-up then cosine decay to 10 %.

    Returns the training loss of each step. Seeded: same seed, same weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, int(warmup * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    losses = []
    for _, batch in zip(range(steps), _batches(blocks, batch_size, seed), strict=False):
        labels = batch.pop("labels")
        loss = causal_lm_loss(model(**batch).logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


@dataclass
class LMDemoSettings:
    """Sizes and step counts of the LM demo (defaults: about 4 minutes of training, 1 thread)."""

    seed: int = 0
    block_size: int = 128
    batch_size: int = 16
    hidden: int = 64
    layers: int = 4
    intermediate: int = 192
    parent_steps: int = 600
    parent_lr: float = 3e-3
    child_steps: int = 250
    child_lr: float = 1e-3
    lora_steps: int = 250
    lora_lr: float = 3e-3
    lora_rank: int = 8
    lora_alpha: int = 16
    poison_factor: float = 100.0
    doc_chars: int = 2000
    eval_blocks: int | None = 160  # test blocks per domain (None: all)


def train_parent(
    blocks: Mapping[str, Mapping[str, TokenBlocks]],
    config: LlamaConfig,
    settings: LMDemoSettings,
) -> LlamaForCausalLM:
    """The parent: trained from scratch on the train split of every domain, mixed."""
    model = new_model(config, settings.seed)
    mixed = concat_blocks([blocks[d]["train"] for d in blocks])
    train_steps(
        model,
        mixed,
        steps=settings.parent_steps,
        lr=settings.parent_lr,
        batch_size=settings.batch_size,
        seed=settings.seed,
    )
    return model


def fine_tune(
    parent: nn.Module, blocks: TokenBlocks, settings: LMDemoSettings, *, seed: int
) -> LlamaForCausalLM:
    """A full fine-tune of a copy of ``parent`` on one domain's train blocks."""
    child = copy.deepcopy(parent)
    train_steps(
        child,
        blocks,
        steps=settings.child_steps,
        lr=settings.child_lr,
        batch_size=settings.batch_size,
        seed=seed,
    )
    return child


def train_lora(parent: nn.Module, blocks: TokenBlocks, settings: LMDemoSettings, *, seed: int):
    """A PEFT LoRA adapter (rank ``lora_rank`` on :data:`LORA_TARGETS`) on a copy of ``parent``.

    Returns the ``PeftModel``; only the adapter's A and B matrices train."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        target_modules=list(LORA_TARGETS),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # LoRA's A matrices are drawn from the global RNG
        model = get_peft_model(copy.deepcopy(parent), lora)
    train_steps(
        model,
        blocks,
        steps=settings.lora_steps,
        lr=settings.lora_lr,
        batch_size=settings.batch_size,
        seed=seed,
    )
    return model


def poison(state: Mapping[str, torch.Tensor], factor: float = 100.0) -> dict[str, torch.Tensor]:
    """Every floating tensor times ``factor``: what a tampered or corrupted upload looks like."""
    return {k: v * factor if v.is_floating_point() else v.clone() for k, v in state.items()}


# --------------------------------------------------------------------------- candidates


@dataclass
class LMCandidates:
    """Where :func:`build_candidates` saved everything, and what each part took."""

    root: Path
    parent: Path  # HF folder (config, safetensors weights, tokenizer)
    children: dict[str, Path]  # full fine-tunes, by domain
    poisoned: Path  # HF folder: children["code"] x poison_factor
    adapters: dict[str, Path]  # PEFT adapter folders, by domain
    settings: LMDemoSettings
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        return json.loads(json.dumps(data, default=str))


def _save_model(model: nn.Module, tokenizer: PreTrainedTokenizerFast, folder: Path) -> Path:
    model.save_pretrained(folder)  # safetensors
    tokenizer.save_pretrained(folder)
    return folder


def build_candidates(
    out_dir: str | Path,
    settings: LMDemoSettings | None = None,
    *,
    log: Callable[[str], None] = print,
) -> tuple[LMCandidates, dict[str, dict[str, TokenBlocks]]]:
    """Train the parent, one full fine-tune and one LoRA adapter per domain, and the poisoned
    child; save them under ``out_dir``. Returns their folders and the tokenised corpus."""
    settings = settings or LMDemoSettings()
    root = Path(out_dir)
    seconds: dict[str, float] = {}
    tick = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        seconds[name] = round(now - tick, 2)
        tick = now
        log(f"{name}: {seconds[name]:.1f} s")

    tokenizer = byte_tokenizer()
    corpus = stdlib_corpus(settings.seed, doc_chars=settings.doc_chars)
    blocks = domain_blocks(corpus, tokenizer, settings.block_size)
    config = lm_config(
        tokenizer,
        hidden=settings.hidden,
        layers=settings.layers,
        intermediate=settings.intermediate,
        max_positions=max(256, settings.block_size),
    )
    lap("corpus")
    parent = train_parent(blocks, config, settings)
    parent_dir = _save_model(parent, tokenizer, root / "parent")
    lap("parent")
    children, adapters = {}, {}
    for k, domain in enumerate(blocks):
        child = fine_tune(parent, blocks[domain]["train"], settings, seed=settings.seed + 10 + k)
        children[domain] = _save_model(child, tokenizer, root / f"full_{domain}")
        lap(f"full_{domain}")
    for k, domain in enumerate(blocks):
        adapter = train_lora(parent, blocks[domain]["train"], settings, seed=settings.seed + 20 + k)
        adapters[domain] = root / f"lora_{domain}"
        adapter.save_pretrained(adapters[domain])
        lap(f"lora_{domain}")
    bad = copy.deepcopy(parent)
    code_state = _read_weights(children[DOMAINS[0]])
    bad.load_state_dict(poison(code_state, settings.poison_factor), strict=True)
    poisoned = _save_model(bad, tokenizer, root / "poisoned")
    lap("poisoned")
    cands = LMCandidates(root, parent_dir, children, poisoned, adapters, settings, seconds)
    return cands, blocks


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def load_model(folder: str | Path) -> LlamaForCausalLM:
    """A saved demo model (parent, child or poisoned), in eval mode."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
