"""Tokenize the corpus into the token streams that train_model.py samples from.

Writes to tools/shakespeare/data/ (uint16 .npy arrays):
  train_plain.npy  every training work as BOS + text + EOS, concatenated
  train_chat.npy   every two-speaker exchange of the training plays rendered through the chat template
                   (BOS + scene heading + alternating <｜User｜>/<｜Assistant｜> turns, assistant turns end in EOS)
  train_chat_starts.npy  offset of each conversation in train_chat (int64); training windows start there,
                   so the model never sees an EOS-terminated speech without the chat markers before it
  heldout.npy      Macbeth and The Tempest as BOS + text + EOS (held-out loss during training)

The chat stream is made exactly as an engine makes a prompt: render with the template, then tokenize the
string with no special tokens added. We check that the generation prompt of every exchange tokenizes to a
prefix of the full exchange, so a model trained on these streams sees at inference what it saw in training.

    python tools/shakespeare/prepare_data.py
"""

import json

import numpy as np
from scenes import conversations, parse_scenes
from train_tokenizer import ASSETS, DATA, load_works
from transformers import AutoTokenizer


def plain_stream(tokenizer, works: dict[str, str]) -> np.ndarray:
    ids = []
    for text in works.values():
        ids += [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return np.array(ids, dtype=np.uint16)


def chat_stream(tokenizer, works: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    ids, starts = [], []
    for text in works.values():
        for scene in parse_scenes(text):
            for messages in conversations(scene):
                full = tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False),
                                        add_special_tokens=False)
                prompt = tokenizer.encode(tokenizer.apply_chat_template(
                    messages[:-1], tokenize=False, add_generation_prompt=True, assistant_name=messages[-1]["name"]),
                    add_special_tokens=False)
                if full[: len(prompt)] != prompt or full[-1] != tokenizer.eos_token_id:
                    raise RuntimeError(f"generation prompt is not a prefix of the exchange: {messages[:2]}")
                starts.append(len(ids))
                ids += full
    return np.array(ids, dtype=np.uint16), np.array(starts, dtype=np.int64)


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(ASSETS)
    assert len(tokenizer) <= np.iinfo(np.uint16).max
    train = load_works("train")
    streams = {"train_plain": plain_stream(tokenizer, train), "heldout": plain_stream(tokenizer, load_works("heldout"))}
    streams["train_chat"], streams["train_chat_starts"] = chat_stream(tokenizer, train)
    for name, ids in streams.items():
        np.save(DATA / f"{name}.npy", ids)
    stats = {name: len(ids) for name, ids in streams.items()}
    (DATA / "streams.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(stats)


if __name__ == "__main__":
    main()
