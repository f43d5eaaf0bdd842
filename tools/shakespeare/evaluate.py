"""Evaluate the shipped checkpoint with HF transformers on CPU and write eval.json beside it.

- Checks that it loads with no missing/unexpected keys, that the safetensors hold bf16 weights with fp32
  `e_score_correction_bias` tensors, and their total size.
- Perplexity on dsinfer/assets/eval/hamlet.txt with the sliding-window algorithm that `dsinfer perplexity`
  implements (see `perplexity` below), in float32 and in bfloat16; the same in float32 on the held-out
  Macbeth and The Tempest; the add-one unigram perplexity of the tokenizer on Hamlet for scale.
- Samples: greedy and seeded sampling from speaker lines, a chat prompt, and how often a chat answer to
  a held-out (Macbeth, Tempest) exchange ends with EOS.

    python tools/shakespeare/evaluate.py
"""

import argparse
import json
import math
import struct
from collections import Counter
from pathlib import Path

import torch
import transformers
from scenes import conversations, parse_scenes
from train_tokenizer import ASSETS, load_works
from transformers import AutoTokenizer, DeepseekV3ForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

EVAL_TEXT = ASSETS.parent / "eval" / "hamlet.txt"


def load_model(path: Path, dtype: torch.dtype) -> DeepseekV3ForCausalLM:
    model, info = DeepseekV3ForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise RuntimeError(f"checkpoint does not match the model: {problems}")
    for router in model.modules():  # the routing bias stays fp32 whatever the model dtype
        if isinstance(router, DeepseekV3TopkRouter):
            router.e_score_correction_bias.data = router.e_score_correction_bias.data.float()
    return model.eval()


def safetensors_dtypes(path: Path) -> tuple[Counter, dict, int]:
    """(count of tensors per dtype, {bias name: dtype}, total bytes) read from the safetensors headers."""
    dtypes, biases, size = Counter(), {}, 0
    for file in sorted(path.glob("*.safetensors")):
        size += file.stat().st_size
        with file.open("rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for name, entry in header.items():
            if name != "__metadata__":
                dtypes[entry["dtype"]] += 1
                if name.endswith("e_score_correction_bias"):
                    biases[name] = entry["dtype"]
    return dtypes, biases, size


@torch.no_grad()
def perplexity(model, ids: list[int], window: int) -> tuple[float, int]:
    """Sliding-window perplexity, stride window // 2; every window is a fresh sequence from position 0.

    Token j (j >= 1) is scored once, from the logits of the first window that contains it and token
    j - 1 and that has not scored it yet; log-softmax in fp32. Returns (exp(mean NLL), tokens scored).
    """
    n, stride = len(ids), window // 2
    nll, count, prev_end, begin = 0.0, 0, 0, 0
    while True:
        end = min(begin + window, n)
        x = torch.tensor([ids[begin:end]])
        logits = model(input_ids=x, use_cache=False).logits[0].float()  # (end - begin, V)
        first = max(prev_end, begin + 1)
        logp = torch.log_softmax(logits[first - 1 - begin: end - 1 - begin], dim=-1)
        targets = torch.tensor(ids[first:end])
        nll -= logp.gather(1, targets[:, None]).sum().item()
        count += end - first
        prev_end = end
        if end == n:
            break
        begin += stride
    assert count == n - 1
    return math.exp(nll / count), count


def unigram_perplexity(tokenizer, train_texts: list[str], ids: list[int]) -> float:
    """Add-one smoothed unigram model over the whole vocabulary, fitted on the training works."""
    counts = Counter()
    for text in train_texts:
        counts.update(tokenizer.encode(text, add_special_tokens=False))
    total, vocab = sum(counts.values()), len(tokenizer)
    nll = -sum(math.log((counts[i] + 1) / (total + vocab)) for i in ids)
    return math.exp(nll / len(ids))


def generate(model, tokenizer, ids: list[int], max_new_tokens: int, seed: int | None) -> tuple[str, bool]:
    """Greedy when seed is None, else temperature 0.8 / top-k 40 sampling; (text, ended with EOS)."""
    if seed is not None:
        torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": 0.8, "top_k": 40} if seed is not None else {"do_sample": False}
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **sampling)[0, len(ids):].tolist()
    ended = tokenizer.eos_token_id in out
    return tokenizer.decode(out, skip_special_tokens=True), ended


def samples(model, tokenizer) -> dict:
    bos = [tokenizer.bos_token_id]
    plain = lambda text: bos + tokenizer.encode(text, add_special_tokens=False)
    result = {
        "greedy 'KING.\\n'": generate(model, tokenizer, plain("KING.\n"), 80, None)[0],
        "sampled 'CLEOPATRA.\\n' seed 0": generate(model, tokenizer, plain("CLEOPATRA.\n"), 100, 0)[0],
        "sampled scene opening seed 1": generate(model, tokenizer, plain("ACT I.\n\nSCENE I. Verona. A public place.\n\n"), 100, 1)[0],
    }
    chat = [{"role": "system", "content": "SCENE I. A street in London."},
            {"role": "user", "content": "What news, my lord? They say the king is sick and will not eat."}]
    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    for label, seed in (("greedy", None), ("sampled seed 0", 0)):
        text, ended = generate(model, tokenizer, ids, 150, seed)
        result[f"chat {label}"] = {"prompt": prompt, "answer": text, "ended_with_eos": ended}
    return result


def heldout_chat_eos_rate(model, tokenizer, max_conversations: int, max_new_tokens: int) -> dict:
    """Answer the first user turn of held-out two-speaker exchanges; how often does the answer end in EOS?"""
    exchanges = [c for text in load_works("heldout").values() for s in parse_scenes(text) for c in conversations(s)]
    exchanges = exchanges[:: max(1, len(exchanges) // max_conversations)][:max_conversations]
    ended = {"greedy": 0, "sampled": 0}
    for i, messages in enumerate(exchanges):
        prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True,
                                               assistant_name=messages[2]["name"])
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        ended["greedy"] += generate(model, tokenizer, ids, max_new_tokens, None)[1]
        ended["sampled"] += generate(model, tokenizer, ids, max_new_tokens, i)[1]
    return {"conversations": len(exchanges), "max_new_tokens": max_new_tokens,
            "ended_with_eos_greedy": ended["greedy"], "ended_with_eos_sampled": ended["sampled"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ASSETS)
    parser.add_argument("--window", type=int, default=512, help="= the training context")
    parser.add_argument("--chat-conversations", type=int, default=24)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    bos = tokenizer.bos_token_id
    encode = lambda text: [bos] + tokenizer.encode(text, add_special_tokens=False)
    hamlet = encode(EVAL_TEXT.read_text())
    heldout = {name: encode(text) for name, text in load_works("heldout").items()}

    dtypes, biases, size = safetensors_dtypes(args.model)
    if set(biases.values()) != {"F32"} or set(dtypes) != {"BF16", "F32"}:
        raise RuntimeError(f"expected bf16 weights and fp32 gate biases, got {dtypes}, {biases}")

    results = {"transformers_version": transformers.__version__, "torch_version": torch.__version__,
               "safetensors_bytes": size, "safetensors_dtypes": dict(dtypes),
               "window": args.window, "stride": args.window // 2}
    model = load_model(args.model, torch.float32)
    results["parameters"] = sum(p.numel() for p in model.parameters())
    ppl, count = perplexity(model, hamlet, args.window)
    results |= {"hamlet_ppl_hf_fp32": round(ppl, 4), "tokens_evaluated": count}
    for name, ids in heldout.items():
        results[f"{name}_ppl_hf_fp32"] = round(perplexity(model, ids, args.window)[0], 4)
    results["hamlet_unigram_ppl"] = round(unigram_perplexity(tokenizer, list(load_works("train").values()), hamlet[1:]), 4)
    print(json.dumps(results, indent=1), flush=True)

    results["samples"] = samples(model, tokenizer)
    results["heldout_chat"] = heldout_chat_eos_rate(model, tokenizer, args.chat_conversations, 200)
    print(json.dumps(results["samples"], indent=1), json.dumps(results["heldout_chat"]), flush=True)

    model = load_model(args.model, torch.bfloat16)
    results["hamlet_ppl_hf_bf16"] = round(perplexity(model, hamlet, args.window)[0], 4)
    print("hamlet_ppl_hf_bf16", results["hamlet_ppl_hf_bf16"])

    (args.model / "eval.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
