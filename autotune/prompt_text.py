"""Text in and out of ``autotune run``: the checkpoint's own tokenizer (its ``tokenizer.json``,
read by Hugging Face's ``tokenizers``) turns ``--prompt`` into token ids, special tokens added as
the tokenizer's post-processor says (Llama 3's begin-of-text, for one), and the generated ids
back into text, up to the first end-of-sequence token the checkpoint names (its
``generation_config.json`` and ``config.json``: ``eos_token_id``). The prompt is the model's
input as written, or with ``--chat`` a user message laid out by the checkpoint's chat template
(``chat_template.jinja`` beside the tokenizer.json, else ``tokenizer_config.json``'s
``chat_template``), rendered as transformers' ``apply_chat_template`` renders it: Jinja in a
sandbox (the template is the checkpoint's, not ours), the generation prompt added, the
tokenizer_config.json's special tokens as variables, and no special tokens added when encoding
(the template writes them)."""
from __future__ import annotations

import json
from pathlib import Path

from runtime.model_config import PRESETS

TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 4.43+ saves the template
TOKENIZER_CONFIG = "tokenizer_config.json"  # where older ones keep it, with the special tokens
SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")
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


def chat_prompt(tokenizer_path: Path, text: str, system: str | None = None) -> str:
    """``text`` as a user message (after ``system`` as a system message, when given) in the chat
    template of the checkpoint whose tokenizer.json is ``tokenizer_path``, with the assistant's
    turn opened; ValueError (one line) where there is no template or it cannot be rendered (a
    template that takes no system message says so)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    folder = tokenizer_path.parent
    settings = _json_object(folder / TOKENIZER_CONFIG)
    template = _chat_template(folder, settings)
    variables = {name: _token_text(settings.get(name)) for name in SPECIAL_TOKENS}

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, indent=None):
        return json.dumps(value, ensure_ascii=False, indent=indent)

    def strftime_now(layout):
        import datetime

        return datetime.datetime.now().strftime(layout)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = tojson
    environment.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return environment.from_string(template).render(
            messages=[*([{"role": "system", "content": system}] if system is not None else []),
                      {"role": "user", "content": text}], add_generation_prompt=True, tools=None, documents=None,
            **variables)
    except jinja2.exceptions.TemplateError as exc:
        where = folder / (CHAT_TEMPLATE_FILE if (folder / CHAT_TEMPLATE_FILE).is_file() else TOKENIZER_CONFIG)
        raise ValueError(f"--chat: the chat template of {where} fails: {exc}") from None


def _json_object(path: Path) -> dict:
    """A JSON file's object, or {} where the file is missing; ValueError for one that is no object."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ValueError(f"--chat: cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--chat: {path} is not a JSON object")
    return data


def _chat_template(folder: Path, settings: dict) -> str:
    """The template text: chat_template.jinja, else tokenizer_config.json's ``chat_template`` (a
    string, or a list of named ones: the one named default)."""
    path = folder / CHAT_TEMPLATE_FILE
    if path.is_file():
        return path.read_text()
    template = settings.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if not isinstance(template, str):
        raise ValueError(f"--chat: no chat template beside {folder / TOKENIZER_FILE} ({CHAT_TEMPLATE_FILE}, or "
                         f"chat_template in {TOKENIZER_CONFIG}): a base model has none; drop --chat")
    return template


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: its text, or an AddedToken's content."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def encode(tokenizer, text: str, vocab: int, path: Path, special: bool = True) -> list[int]:
    """``text`` as the model's token ids (``special``: with the special tokens the tokenizer's
    post-processor adds; a chat template writes its own); ValueError for an empty prompt or ids
    past the model's vocabulary (the tokenizer of another model)."""
    ids = tokenizer.encode(text, add_special_tokens=special).ids
    if not ids:
        raise ValueError(f"--prompt {text!r} encodes to no tokens")
    if max(ids) >= vocab:
        raise ValueError(f"--prompt: {path} gives token id {max(ids)}, past the model's vocabulary of {vocab}: "
                         "is it this model's tokenizer?")
    return ids


def end_of_sequence_ids(folders: list[Path]) -> list[int]:
    """The ``eos_token_id`` values (an id or a list of ids) of the checkpoint's files, in their
    order (transformers pads a finished sequence with the first); a file that is missing,
    unreadable or names none adds nothing (they only decide where a sequence ends)."""
    ids: list[int] = []
    for folder in folders:
        for name in END_FILES:
            try:
                value = json.loads((folder / name).read_text()).get("eos_token_id")
            except (OSError, ValueError, AttributeError):
                continue
            values = value if isinstance(value, list) else [value]
            ids += [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v not in ids]
    return ids


def until_end(ids, end_ids) -> tuple[list[int], int | None]:
    """The generated ``ids`` up to and including the first end-of-sequence id, and its index
    (None where the model did not end)."""
    ids = [int(i) for i in ids]
    at = next((i for i, token in enumerate(ids) if token in end_ids), None)
    return (ids if at is None else ids[:at + 1]), at


def decode(tokenizer, ids) -> str:
    """Token ids as text, special tokens kept (an end-of-text token shows where the model ended)."""
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
