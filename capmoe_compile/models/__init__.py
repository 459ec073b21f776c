"""Models shipped with capmoe-compile.

``tiny_moe``: a 4-layer Mixtral-style causal LM (8 experts, top-2, 1.8 M parameters, fp16
safetensors, about 3.6 MB) trained by ``benchmarks/train_tiny_moe.py`` on the Python standard
library's own source (PSF license) with **no** auxiliary load-balancing loss, so its routing is
skewed the way real MoE models' routing is. Byte-level: token id = byte + 3 (ByT5's scheme;
0 = pad, 1 = eos, 2 = unk). Everything loads offline from the package directory::

    from capmoe_compile.models import load_tiny_moe

    model, tok = load_tiny_moe()
    ids = encode("def __init__(self", tok)       # [1, S] int64
    logits = model(ids).logits

The corpus helpers (:func:`stdlib_corpus`) rebuild the training / validation split the model
was trained on from the running interpreter's standard library, so held-out figures
(``benchmarks/quality.py``) are on text the model has not seen.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "BALANCED_MOE_DIR",
    "TINY_MOE_DIR",
    "Corpus",
    "decode",
    "encode",
    "load_balanced_moe",
    "load_tiny_moe",
    "load_tokenizer",
    "split_validation",
    "stdlib_corpus",
    "tiny_moe_card",
    "validation_windows",
]

#: Where the shipped model's files live (package data).
TINY_MOE_DIR = Path(__file__).resolve().parent / "tiny_moe"
#: The second shipped model: Qwen2-MoE family, 32 experts, top-4, a shared expert, trained with
#: a load-balancing loss by ``benchmarks/train_balanced_moe.py`` (see its README.md).
BALANCED_MOE_DIR = Path(__file__).resolve().parent / "balanced_moe"

#: Byte-level vocabulary: ids 0, 1, 2 are pad, eos, unk; byte ``b`` is id ``b + 3``.
BYTE_OFFSET = 3
PAD_ID, EOS_ID = 0, 1
VOCAB_SIZE = 256 + BYTE_OFFSET


def load_tokenizer(path: str | Path | None = None):
    """The shipped byte-level tokenizer (a ``transformers`` ``ByT5Tokenizer`` without extra ids),
    read from the model directory with no network access.

    (``AutoTokenizer`` would pick Mixtral's registered tokenizer class for this directory, so
    the class is named here.)"""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer.from_pretrained(str(path or TINY_MOE_DIR), local_files_only=True)


def load_tiny_moe(
    path: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    experts_implementation: str = "grouped_mm",
):
    """The shipped tiny MoE LM and its tokenizer: ``(model, tokenizer)``, model in eval mode.

    Weights are stored in fp16 and upcast to ``dtype`` (fp32 by default, what the shipped
    figures were measured with). ``experts_implementation`` is transformers' experts kernel
    (``grouped_mm`` by default: one graph under Dynamo, the form the capmoe passes match).
    """
    from transformers import AutoModelForCausalLM

    path = str(path or TINY_MOE_DIR)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        local_files_only=True,
        experts_implementation=experts_implementation,
    )
    model.eval()
    return model, load_tokenizer(path)


def load_balanced_moe(path: str | Path | None = None, **kwargs):
    """The shipped balanced MoE LM (``balanced_moe``) and its tokenizer, loaded exactly as
    :func:`load_tiny_moe` loads the tiny one (same keywords)."""
    return load_tiny_moe(path or BALANCED_MOE_DIR, **kwargs)


def encode(text: str | bytes, tokenizer=None) -> torch.Tensor:
    """Token ids ``[1, S]`` (int64) of ``text``, no special tokens. Without ``tokenizer`` uses the
    byte rule directly (identical to the shipped tokenizer, and faster on long text)."""
    if tokenizer is not None and isinstance(text, str):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor([ids], dtype=torch.long)
    data = text.encode("utf-8") if isinstance(text, str) else text
    return (torch.frombuffer(bytearray(data), dtype=torch.uint8).long() + BYTE_OFFSET)[None]


def decode(ids: torch.Tensor | list[int]) -> str:
    """Text of byte-level ids (special ids are skipped)."""
    flat = ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else list(ids)
    data = bytes(i - BYTE_OFFSET for i in flat if BYTE_OFFSET <= i < VOCAB_SIZE)
    return data.decode("utf-8", errors="replace")


def tiny_moe_card() -> dict:
    """What ``benchmarks/train_tiny_moe.py`` recorded: corpus version, seed, steps, final
    validation loss, per-layer expert loads."""
    return json.loads((TINY_MOE_DIR / "training.json").read_text())


# --------------------------------------------------------------------------------------------
# corpus: the Python standard library's own source (PSF license)
# --------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """Byte-level token ids of the training and validation files, and what identifies them."""

    train: torch.Tensor
    val: torch.Tensor
    version: dict = field(default_factory=dict)


def _is_validation(name: str) -> bool:
    # one file in ten, chosen by a hash of its name: stable when files come and go
    return hashlib.sha256(name.encode()).digest()[0] % 10 == 0


def stdlib_corpus(stdlib: str | Path | None = None) -> Corpus:
    """The top-level ``*.py`` modules of the Python standard library (``Lib/*.py`` of the
    running interpreter unless ``stdlib`` is given), split by file: about one file in ten
    (by a hash of its name) is validation. Files are joined with the eos id between them.

    ``version`` records the Python version, the directory, file counts, bytes, and a sha256
    over every (name, content) pair, so a run can tell whether it saw the same text.
    """
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no *.py files under {root}")
    digest = hashlib.sha256()
    parts: dict[bool, list[torch.Tensor]] = {False: [], True: []}
    eos = torch.tensor([EOS_ID])
    val_names = []
    for f in files:
        data = f.read_bytes()
        digest.update(f.name.encode() + b"\0" + data + b"\0")
        is_val = _is_validation(f.name)
        if is_val:
            val_names.append(f.name)
        parts[is_val] += [encode(data)[0], eos]
    train, val = torch.cat(parts[False]), torch.cat(parts[True])
    version = {
        "corpus": "python-stdlib-toplevel-py",
        "license": "PSF-2.0 (Python Software Foundation License)",
        "python": sys.version.split()[0],
        "stdlib_dir": str(root),
        "files": len(files),
        "val_files": val_names,
        "sha256": digest.hexdigest(),
        "train_tokens": int(train.numel()),
        "val_tokens": int(val.numel()),
    }
    return Corpus(train=train, val=val, version=version)


def validation_windows(corpus: Corpus, seq: int, count: int) -> torch.Tensor:
    """``count`` non-overlapping windows ``[count, seq]`` of validation ids, evenly spread
    over the validation text (deterministic)."""
    n = corpus.val.numel() // seq
    if count > n:
        raise ValueError(f"validation text holds {n} windows of {seq}, asked for {count}")
    starts = torch.linspace(0, n - 1, count).long() * seq
    return torch.stack([corpus.val[s : s + seq] for s in starts.tolist()])


def split_validation(corpus: Corpus, share: float = 0.3) -> tuple[Corpus, Corpus]:
    """The validation files split in two at a file boundary: the files making up the first
    ``share`` of the validation bytes, and the rest. Each part is a :class:`Corpus` whose
    ``val`` is that part (so :func:`validation_windows` applies): calibrate capacity on the
    first (``capmoe calibrate``), measure on the second, which neither the model nor the
    calibration saw."""
    if not 0 < share < 1:
        raise ValueError(f"share must be in (0, 1), got {share}")
    ends = (corpus.val == EOS_ID).nonzero().flatten()
    cut = int(ends[ends >= int(share * corpus.val.numel())][0]) + 1
    first, rest = corpus.val[:cut], corpus.val[cut:]
    return (
        Corpus(train=corpus.train, val=first, version={**corpus.version, "val_part": "first"}),
        Corpus(train=corpus.train, val=rest, version={**corpus.version, "val_part": "rest"}),
    )
