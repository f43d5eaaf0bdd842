"""Train the tiny DeepSeek-V3 (MLA + sigmoid/noaux_tc MoE + YaRN) on the Shakespeare token streams.

Runs on one GPU: HF `DeepseekV3ForCausalLM`, fp32 master weights under bf16 autocast, AdamW with linear
warmup and cosine decay, residual dropout (forward hooks; HF's V3 has none of its own), and DeepSeek's
auxiliary-loss-free load balancing: after every step each MoE gate's `e_score_correction_bias` moves by
`gamma * sign(mean_load - load)`, from the experts its router chose during that step. The held-out loss
(Macbeth + The Tempest) is measured every `--eval-every` steps and the best weights are the ones saved.

Output (in --out): config.json, generation_config.json, model-*.safetensors + index (bf16, gate biases
fp32), train_log.csv, train_summary.json.

    python tools/shakespeare/train_model.py --out /tmp/shakespeare-v3
"""

import argparse
import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, GenerationConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

DATA = Path(__file__).resolve().parent / "data"


def model_config() -> DeepseekV3Config:
    """Every V3 feature at toy size: ~9M parameters, 18 MB in bf16."""
    return DeepseekV3Config(
        vocab_size=8192,
        hidden_size=256,
        num_hidden_layers=5,               # 1 dense + 4 MoE
        first_k_dense_replace=1,
        intermediate_size=768,             # dense MLP width
        # MLA
        num_attention_heads=8,
        num_key_value_heads=8,             # MLA is not GQA; kept equal to the heads as in V3
        q_lora_rank=96,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        # MoE: 16 routed experts in 4 groups, top-2 groups, top-4 experts, 1 shared expert
        n_routed_experts=16,
        n_shared_experts=1,
        moe_intermediate_size=64,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        moe_layer_freq=1,
        # positions: YaRN x4 over an original 256-token window
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        rope_interleave=True,
        num_nextn_predict_layers=0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )


class Batches:
    """Random windows of context + 1 tokens; a `chat_fraction` of the rows come from the chat stream.

    Plain windows start anywhere; chat windows start at the BOS of a conversation (and run on into the
    next ones), so every EOS the model sees in a chat window follows an <｜Assistant｜> marker in context.
    """

    def __init__(self, batch_size: int, context: int, chat_fraction: float, device: str, seed: int):
        load = lambda name: torch.from_numpy(np.load(DATA / f"{name}.npy").astype(np.int64)).to(device)
        self.plain, self.chat = load("train_plain"), load("train_chat")
        starts = load("train_chat_starts")
        self.chat_starts = starts[starts < len(self.chat) - context - 1]
        self.batch_size, self.context, self.chat_fraction = batch_size, context, chat_fraction
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.span = torch.arange(context + 1, device=device)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, g = self.batch_size, self.context, self.generator
        is_chat = torch.rand(B, generator=g, device=g.device) < self.chat_fraction
        u = torch.rand(B, generator=g, device=g.device)
        start_plain = (u * (len(self.plain) - T - 1)).long()
        start_chat = self.chat_starts[(u * len(self.chat_starts)).long()]
        rows = torch.where(is_chat[:, None], self.chat[start_chat[:, None] + self.span],
                           self.plain[start_plain[:, None] + self.span])  # (B, T + 1)
        return rows[:, :-1], rows[:, 1:]


def add_dropout(model: DeepseekV3ForCausalLM, p: float) -> None:
    """Dropout on the embedding output and on every attention / MLP output before the residual add."""
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, module.training),) + output[1:]
        return F.dropout(output, p, module.training)

    model.model.embed_tokens.register_forward_hook(hook)
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


class LoadBalancer:
    """Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2): count each router's picks, nudge its bias."""

    def __init__(self, model: DeepseekV3ForCausalLM, gamma: float):
        self.gamma = gamma
        self.routers = [m for m in model.modules() if isinstance(m, DeepseekV3TopkRouter)]
        self.counts = [torch.zeros(r.num_experts, device=model.device) for r in self.routers]
        for router, count in zip(self.routers, self.counts):
            router.register_forward_hook(self._counter(count))

    @staticmethod
    def _counter(count):
        def hook(router, args, output):
            if router.training:
                _, _, topk_indices = output  # (tokens, top_k)
                count.add_(torch.bincount(topk_indices.flatten(), minlength=count.numel()))
        return hook

    @torch.no_grad()
    def step(self) -> float:
        """Update the biases from this step's loads; return the worst max/mean load over the layers."""
        worst = torch.zeros((), device=self.counts[0].device)
        for router, count in zip(self.routers, self.counts):
            mean = count.mean()
            router.e_score_correction_bias += self.gamma * torch.sign(mean - count)
            worst = torch.maximum(worst, count.max() / mean)
            count.zero_()
        return worst


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def heldout_loss(model, heldout: torch.Tensor, context: int, batch_size: int) -> float:
    """Mean next-token loss over non-overlapping windows of the held-out stream."""
    model.eval()
    n = (len(heldout) - 1) // context
    x = heldout[: n * context].view(n, context)
    y = heldout[1: n * context + 1].view(n, context)
    total = 0.0
    for i in range(0, n, batch_size):
        with torch.autocast(heldout.device.type, dtype=torch.bfloat16):
            logits = model(input_ids=x[i:i + batch_size]).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), y[i:i + batch_size].flatten(), reduction="sum").item()
    model.train()
    return total / y.numel()


def save(model: DeepseekV3ForCausalLM, state: dict, out: Path) -> None:
    """bf16 safetensors in ~12 MB shards, with every gate's e_score_correction_bias kept in fp32."""
    model.load_state_dict(state)
    model.to("cpu", torch.bfloat16)
    for name, module in model.named_modules():
        if isinstance(module, DeepseekV3TopkRouter):
            module.e_score_correction_bias = state[f"{name}.e_score_correction_bias"].float()
    model.save_pretrained(out, max_shard_size="12MB")
    GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2).save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--min-lr", type=float, default=2e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--chat-fraction", type=float, default=0.2)
    parser.add_argument("--bias-gamma", type=float, default=1e-3, help="load-balancing bias update speed")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--time-limit", type=float, default=math.inf, help="stop training after this many seconds")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: only for a smoke test of the script
    model = DeepseekV3ForCausalLM(model_config()).to(device)
    model.train()
    add_dropout(model, args.dropout)
    balancer = LoadBalancer(model, args.bias_gamma)
    num_params = sum(p.numel() for p in model.parameters())

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    batches = Batches(args.batch_size, args.context, args.chat_fraction, device, args.seed)
    heldout = torch.from_numpy(np.load(DATA / "heldout.npy").astype(np.int64)).to(device)

    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "train_log.csv"
    fields = ["step", "tokens", "lr", "train_loss", "heldout_loss", "max_load_ratio", "elapsed_s", "tokens_per_s"]
    log = csv.DictWriter(log_path.open("w", newline=""), fieldnames=fields)
    log.writeheader()

    best = (float("inf"), -1, None)
    losses, ratios = [], []
    start = time.time()
    step = 0
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step - 1, args)
        x, y = batches.next()
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ratios.append(balancer.step())
        losses.append(loss.detach())

        elapsed = time.time() - start
        last = step == args.steps or elapsed > args.time_limit
        if step % args.eval_every == 0 or last:
            held = heldout_loss(model, heldout, args.context, batch_size=64)
            tokens = step * args.batch_size * args.context
            row = {"step": step, "tokens": tokens, "lr": f"{lr_at(step - 1, args):.3e}",
                   "train_loss": f"{torch.stack(losses).mean().item():.4f}", "heldout_loss": f"{held:.4f}",
                   "max_load_ratio": f"{torch.stack(ratios).mean().item():.3f}",
                   "elapsed_s": f"{time.time() - start:.1f}", "tokens_per_s": f"{tokens / (time.time() - start):.0f}"}
            log.writerow(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            losses, ratios = [], []
            if held < best[0]:
                best = (held, step, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        if last:
            break
    train_seconds = time.time() - start

    held, best_step, state = best
    save(model, state, args.out)
    biases = torch.stack([v for k, v in state.items() if k.endswith("e_score_correction_bias")])
    summary = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
        "parameters": num_params, "steps_run": step, "best_step": best_step, "best_heldout_loss": round(held, 4),
        "train_seconds": round(train_seconds, 1), "tokens_seen": step * args.batch_size * args.context,
        "tokens_per_s": round(step * args.batch_size * args.context / train_seconds),
        "bias_abs_max": biases.abs().max().item(), "bias_abs_mean": biases.abs().mean().item(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    (args.out / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
