"""The files beside a checkpoint's weights that travel with it: tokenizer, generation config, chat
templates, remote modeling code, processor configs.  An HF directory has them at its top (the extra
named chat templates in its ``additional_chat_templates/`` folder); a Megatron checkpoint written by
ckpt-ir keeps them (and the HF config) in its ``hf/`` folder, laid out the same way."""

from __future__ import annotations

import fnmatch
import os

# side files copied next to HF output (tokenizer, generation settings, chat template, processor
# configs, ModelScope's configuration.json, remote code); transformers 5.25's processors save
# processor_config.json and read the legacy preprocessor_config.json and
# video_preprocessor_config.json (utils/__init__.py PROCESSOR_NAME, IMAGE_PROCESSOR_NAME,
# VIDEO_PROCESSOR_NAME, AUDIO_TOKENIZER_NAME)
AUX_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "*.model",
    "*.tiktoken",
    "chat_template.*",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "audio_tokenizer_config.json",
    "configuration.json",
    "*.py",
)
# an HF model's weights and their index
WEIGHT_FILES = (
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
)
# transformers' folder of extra named chat templates (utils/hub.py CHAT_TEMPLATE_DIR): a tokenizer's
# or processor's save_pretrained writes each template but the default as <name>.jinja there
CHAT_TEMPLATES_DIR = "additional_chat_templates"
CHAT_TEMPLATES = "*.jinja"
# that folder as an entry of a checkpoint directory (name, its entries; None: a file), for --overwrite
CHAT_TEMPLATES_ENTRY: tuple = (CHAT_TEMPLATES_DIR, ((CHAT_TEMPLATES, None),))


TOKENIZER_PATTERNS = ("tokenizer*", "*.model", "*.tiktoken", "vocab.json", "vocab.txt")
# every file a tokenizer's save_pretrained writes (what Megatron-LM keeps in iter_N/tokenizer/)
TOKENIZER_FILES = (
    *TOKENIZER_PATTERNS,
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
    "chat_template.*",
)


def side_file_name(path: str) -> str:
    """The name of side file ``path`` in the directory it belongs to: its base name, or
    ``additional_chat_templates/<name>.jinja`` for an extra chat template."""
    folder, name = os.path.split(path)
    return f"{CHAT_TEMPLATES_DIR}/{name}" if os.path.basename(folder) == CHAT_TEMPLATES_DIR else name


def is_tokenizer_file(path: str) -> bool:
    """Whether a tokenizer's save_pretrained writes ``path`` (its extra chat templates included)."""
    name = side_file_name(path)
    return name.startswith(CHAT_TEMPLATES_DIR + "/") or any(fnmatch.fnmatch(name, p) for p in TOKENIZER_FILES)


def side_files(path: str, config: bool = False, patterns: tuple[str, ...] = AUX_PATTERNS) -> tuple[str, ...]:
    """The HF side files in directory ``path`` (those matching ``patterns``, with ``config.json``
    when ``config``) and the extra chat templates in its ``additional_chat_templates/``, sorted by
    :func:`side_file_name`."""
    pats = patterns + (("config.json",) if config else ())
    templates = os.path.join(path, CHAT_TEMPLATES_DIR)
    return tuple(
        sorted(
            (*_files(path, pats), *_files(templates, (CHAT_TEMPLATES,))),
            key=side_file_name,
        )
    )


def _files(path: str, patterns: tuple[str, ...]) -> list[str]:
    if not os.path.isdir(path):
        return []
    return [
        e.path for e in os.scandir(path) if e.is_file() and any(fnmatch.fnmatch(e.name, p) for p in patterns)
    ]


def left_behind(path: str) -> list[str]:
    """The entries of HF directory ``path`` that no conversion carries: neither weights, nor
    ``config.json``, nor side files (e.g. a model card, a licence, a Trainer's ``training_args.bin``,
    other folders), by name (a folder with a trailing ``/``)."""
    kept = {side_file_name(f) for f in side_files(path, config=True)}
    left = []
    for e in sorted(os.scandir(path), key=lambda e: e.name):
        if e.is_dir():
            inner = sorted(f"{e.name}/{n}" for n in os.listdir(e.path))
            left += [n for n in inner if n not in kept] if e.name == CHAT_TEMPLATES_DIR else [e.name + "/"]
        elif e.name not in kept and not any(fnmatch.fnmatch(e.name, p) for p in WEIGHT_FILES):
            left.append(e.name)
    return left


# the files of an HF model or a PEFT adapter: weights and their index, configs, the tokenizer,
# processor, chat-template and remote-code side files, what a Hub snapshot adds (model card, licence,
# git attributes)
HF_FILES = (
    *WEIGHT_FILES,
    "config.json",
    *AUX_PATTERNS,
    "adapter_config.json",
    "adapter_model.bin",
    "README.md",
    "LICENSE*",
    "NOTICE*",
    "USE_POLICY.md",
    ".gitattributes",
)

# written beside an output when the user chose something on purpose (the notes printed as "note:")
NOTES_FILE = "ckpt-ir-notes.txt"
