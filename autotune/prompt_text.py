"""Text in and out of ``autotune run``: the checkpoint's own tokenizer (its ``tokenizer.json``,
read by Hugging Face's ``tokenizers``) turns ``--prompt`` into token ids, special tokens added as
the tokenizer's post-processor says (Llama 3's begin-of-text, for one), and the generated ids
back into text, up to the first end-of-sequence token the checkpoint names (its
``generation_config.json`` and ``config.json``: ``eos_token_id``). No chat template is applied:
the prompt is the model's input as written."""
from __future__ import annotations

import json
from pathlib import Path

from runtime.model_config import PRESETS

TOKENIZER_FILE = "tokenizer.json"
END_FILES = ("generation_config.json", "config.json")  # where a checkpoint names its end-of-sequence ids


def checkpoint_folders(weights_dir: str | None, model: str) -> list[Path]:
    """The folders a run's checkpoint files may lie in: the weights', then the model config's."""
    folders = [Path(weights_dir)] if weights_dir else []
    model_path = Path(model)
    if model not in PRESETS and model_path.exists():
        folders.append(model_path if model_path.is_dir() else model_path.parent)
    return folders


def find_tokenizer(tokenizer: str | None, weights_dir: str | None, model: str) -> Path:
    """The tokenizer.json to use: ``tokenizer`` (the file or its folder) when given, else the one
    beside the weights, else the one beside the model's config.json; ValueError naming where it
    looked when there is none."""
    if tokenizer is not None:
        path = Path(tokenizer)
        path = path / TOKENIZER_FILE if path.is_dir() else path
        if not path.is_file():
            what = "not a regular file" if path.exists() else "no such file"
            where = " in that folder" if Path(tokenizer).is_dir() else ""
            raise ValueError(f"--tokenizer {tokenizer}: {what}{where} ({TOKENIZER_FILE} of a Hugging Face "
                             "checkpoint)")
        return path
    folders = checkpoint_folders(weights_dir, model)
    for folder in folders:
        if (folder / TOKENIZER_FILE).is_file():
            return folder / TOKENIZER_FILE
    where = (f"none in {' or '.join(str(f) for f in folders)}" if folders else
             f"--model {model} is a preset and no --weights were given")
    raise ValueError(f"--prompt needs the checkpoint's {TOKENIZER_FILE}: {where}; give --tokenizer PATH "
                     "(or --prompt-ids)")


def load_tokenizer(path: Path):
    """The ``tokenizers.Tokenizer`` of a tokenizer.json; ValueError for a file it cannot read."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises plain Exceptions for malformed files
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path} is not a tokenizer.json the tokenizers library reads: {message}") from None


def encode(tokenizer, text: str, vocab: int, path: Path) -> list[int]:
    """``text`` as the model's token ids; ValueError for an empty prompt or ids past the model's
    vocabulary (the tokenizer of another model)."""
    ids = tokenizer.encode(text).ids
    if not ids:
        raise ValueError(f"--prompt {text!r} encodes to no tokens")
    if max(ids) >= vocab:
        raise ValueError(f"--prompt: {path} gives token id {max(ids)}, past the model's vocabulary of {vocab}: "
                         "is it this model's tokenizer?")
    return ids


def end_of_sequence_ids(folders: list[Path]) -> set[int]:
    """The ``eos_token_id`` values (an id or a list of ids) of the checkpoint's files; a file that
    is missing, unreadable or names none adds nothing (they only decide where the text ends)."""
    ids: set[int] = set()
    for folder in folders:
        for name in END_FILES:
            try:
                value = json.loads((folder / name).read_text()).get("eos_token_id")
            except (OSError, ValueError, AttributeError):
                continue
            values = value if isinstance(value, list) else [value]
            ids.update(v for v in values if isinstance(v, int) and not isinstance(v, bool))
    return ids


def until_end(ids, end_ids: set[int]) -> tuple[list[int], int | None]:
    """The generated ``ids`` up to and including the first end-of-sequence id, and its index
    (None where the model did not end)."""
    ids = [int(i) for i in ids]
    at = next((i for i, token in enumerate(ids) if token in end_ids), None)
    return (ids if at is None else ids[:at + 1]), at


def decode(tokenizer, ids) -> str:
    """Token ids as text, special tokens kept (an end-of-text token shows where the model ended)."""
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
