"""The files beside a checkpoint's weights that travel with it: tokenizer, generation config, chat
template, remote modeling code, processor configs.  An HF directory has them at its top; a Megatron
checkpoint written by ckpt-ir keeps them (and the HF config) in its ``hf/`` folder."""

from __future__ import annotations

import fnmatch
import os

# side files copied next to HF output (tokenizer, generation settings, chat template, remote code)
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
    "preprocessor_config.json",
    "*.py",
)


TOKENIZER_PATTERNS = ("tokenizer*", "*.model", "*.tiktoken", "vocab.json", "vocab.txt")
# every file a tokenizer's save_pretrained writes (what Megatron-LM keeps in iter_N/tokenizer/)
TOKENIZER_FILES = (
    *TOKENIZER_PATTERNS,
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
    "chat_template.*",
)


def is_tokenizer_file(path: str) -> bool:
    return any(fnmatch.fnmatch(os.path.basename(path), p) for p in TOKENIZER_FILES)


def side_files(path: str, config: bool = False) -> tuple[str, ...]:
    """The HF side files in directory ``path`` (with ``config.json`` when ``config``), sorted."""
    if not os.path.isdir(path):
        return ()
    pats = AUX_PATTERNS + (("config.json",) if config else ())
    return tuple(
        sorted(
            os.path.join(path, n)
            for n in os.listdir(path)
            if any(fnmatch.fnmatch(n, p) for p in pats) and os.path.isfile(os.path.join(path, n))
        )
    )


# the files of an HF model or a PEFT adapter: weights and their index, configs, the tokenizer,
# processor, chat-template and remote-code side files, what a Hub snapshot adds (model card, licence,
# git attributes)
HF_FILES = (
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "config.json",
    "generation_config.json",
    "processor_config.json",
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
