"""``run --chat``: the checkpoint's chat template rendered as transformers' apply_chat_template
renders it (same text, same token ids), from either file transformers keeps it in, and what it
refuses said in one line."""
from __future__ import annotations

import json

import pytest

from autotune.prompt_text import chat_prompt, encode, load_tokenizer

transformers = pytest.importorskip("transformers")

# templates in the styles of popular instruct checkpoints (simplified): Gemma's (bos, turns, a
# system message folded into the first user turn), Llama 3's (header ids, strftime_now), ChatML's
# (Qwen, SmolLM) with a tojson of the tools when given
GEMMA_STYLE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
LLAMA3_STYLE = (
    "{{- bos_token }}{%- set date_string = strftime_now('%d %b %Y') %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\nToday Date: ' + date_string + '<|eot_id|>' }}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")
CHATML_STYLE = (
    "{%- if tools %}{{- '<|im_start|>system\n' + tools | tojson + '<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if loop.first and message.role != 'system' %}"
    "{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}")
SPECIALS = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|im_start|>", "<|im_end|>"]


def _checkpoint_tokenizer(folder, template: str, legacy: bool):
    """A byte-level BPE tokenizer saved by transformers with ``template``: in chat_template.jinja
    (as transformers 5 saves it) or, ``legacy``, inside tokenizer_config.json (older checkpoints)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {**{token: i for i, token in enumerate(SPECIALS)}, **{c: len(SPECIALS) + i for i, c in enumerate(alphabet)}}
    raw = Tokenizer(models.BPE(vocab, [], unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>",
                                                     additional_special_tokens=SPECIALS[2:])
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    if legacy:  # the template moved into tokenizer_config.json, as transformers < 4.43 wrote it
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["chat_template"] = (folder / "chat_template.jinja").read_text()
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        (folder / "chat_template.jinja").unlink()
    assert (folder / "tokenizer.json").is_file()
    return tokenizer


@pytest.mark.parametrize("template", [GEMMA_STYLE, LLAMA3_STYLE, CHATML_STYLE], ids=["gemma", "llama3", "chatml"])
@pytest.mark.parametrize("legacy", [False, True], ids=["jinja-file", "tokenizer-config"])
def test_the_chat_prompt_is_what_transformers_renders(template, legacy, tmp_path):
    theirs = _checkpoint_tokenizer(tmp_path, template, legacy)
    text = "Why is the sky blue?  "
    messages = [{"role": "user", "content": text}]
    want = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ours = chat_prompt(tmp_path / "tokenizer.json", text)
    assert ours == want and ours.count("Why is the sky blue?") == 1
    want_ids = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = encode(load_tokenizer(tmp_path / "tokenizer.json"), ours, 10 ** 6, tmp_path, special=False)
    assert ids == list(want_ids)
    if template != CHATML_STYLE:  # the template writes the begin-of-sequence token once, encoding adds none
        assert ids.count(0) == 1 and ids[0] == 0


@pytest.mark.parametrize("template", [LLAMA3_STYLE, CHATML_STYLE], ids=["llama3", "chatml"])
def test_a_system_message_goes_first_as_transformers_puts_it(template, tmp_path):
    theirs = _checkpoint_tokenizer(tmp_path, template, legacy=False)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Why?"}]
    want = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat_prompt(tmp_path / "tokenizer.json", "Why?", system="Answer briefly.") == want
    assert "Answer briefly." in want


def test_what_chat_refuses_is_one_line(tmp_path):
    _checkpoint_tokenizer(tmp_path, GEMMA_STYLE, legacy=False)
    with pytest.raises(ValueError, match=r"fails: no system role$"):  # Gemma's way: no system message
        chat_prompt(tmp_path / "tokenizer.json", "hi", system="Be brief.")
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('only user turns') }}")
    with pytest.raises(ValueError, match=r"^--chat: the chat template of .*chat_template.jinja fails: only user turns$"):
        chat_prompt(tmp_path / "tokenizer.json", "hi")
    (tmp_path / "chat_template.jinja").write_text("{% for %}")
    with pytest.raises(ValueError, match=r"chat_template.jinja fails: "):
        chat_prompt(tmp_path / "tokenizer.json", "hi")
    (tmp_path / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ValueError, match=r"fails: .*unsafe"):  # the sandbox: no way out to Python
        chat_prompt(tmp_path / "tokenizer.json", "hi")
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"^--chat: no chat template beside .*tokenizer.json .*a base model has none"):
        chat_prompt(tmp_path / "tokenizer.json", "hi")

