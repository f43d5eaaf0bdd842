"""Train the byte-level BPE tokenizer on the training works (Hamlet, Macbeth and The Tempest excluded).

Writes `tokenizer.json` and `tokenizer_config.json` (with the chat template from `chat_template.jinja`)
into `dsinfer/assets/shakespeare-v3/`. The special tokens take ids 0-4 in DeepSeek-V3's spelling. The
tokenizer adds no BOS itself (no post-processor): chat templates write BOS, and engines prepend it to
plain prompts.

    python tools/shakespeare/train_tokenizer.py
"""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TOOLS = Path(__file__).resolve().parent
DATA = TOOLS / "data"
ASSETS = TOOLS.parents[1] / "dsinfer" / "assets" / "shakespeare-v3"

VOCAB_SIZE = 8192
MAX_LENGTH = 1024  # = max_position_embeddings of the model
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT]  # ids 0, 1, 2, 3, 4


def load_works(split: str) -> dict[str, str]:
    """Cleaned texts of one split ("train", "heldout" or "eval"), by work name, in manifest order."""
    manifest = json.loads((DATA / "manifest.json").read_text())
    return {m["work"]: (DATA / "works" / f"{m['work']}.txt").read_text() for m in manifest if m["split"] == split}


def train(texts: list[str]) -> Tokenizer:
    """GPT-2 style byte-level BPE: regex pre-split, bytes mapped to printable characters, no normalizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def tokenizer_config() -> dict:
    """The transformers-side settings, in the shape DeepSeek-V3's tokenizer_config.json has them."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_LENGTH,
        "chat_template": (TOOLS / "chat_template.jinja").read_text(),
    }


def main() -> None:
    works = load_works("train")
    tokenizer = train(list(works.values()))
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == token_id, token
    assert tokenizer.get_vocab_size() == VOCAB_SIZE

    # Exact round trip on every work, held-out ones included.
    num_tokens = {}
    for split in ("train", "heldout", "eval"):
        for name, text in load_works(split).items():
            ids = tokenizer.encode(text, add_special_tokens=False).ids
            if tokenizer.decode(ids, skip_special_tokens=False) != text:
                raise RuntimeError(f"decode(encode(text)) differs from the text of {name}")
            num_tokens[split] = num_tokens.get(split, 0) + len(ids)

    ASSETS.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(ASSETS / "tokenizer.json"))
    (ASSETS / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n")
    print(f"vocab {tokenizer.get_vocab_size()}; round trip exact; tokens per split: {num_tokens}")


if __name__ == "__main__":
    main()
