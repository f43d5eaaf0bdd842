"""Load test for a running `dsinfer serve` (this script starts nothing).

    python benchmarks/load_server.py --url http://127.0.0.1:8000 --clients 1 16 64 --requests 64 --max-tokens 16

For each client count C: C concurrent clients send streaming /v1/completions requests (httpx, asyncio) until
--requests have been sent or --duration seconds have passed. Prints requests/s, output tokens/s, and time to
first token and inter-token latency at p50/p90/p99. Loopback only: other hosts are refused.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx

PROMPTS = ["ROMEO:", "JULIET:", "Enter HAMLET.", "KING LEAR:", "To be, or not to be", "Now is the winter of",
           "First Citizen:", "MACBETH:"]


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    requests: int = 0
    errors: int = 0


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except (ValueError, TypeError):
        pass
    raise SystemExit(f"load_server: refusing non-loopback host {host!r}; point --url at 127.0.0.1 or localhost")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


async def one_request(client: httpx.AsyncClient, url: str, body: dict, result: Result) -> None:
    start = time.perf_counter()
    last = None
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            result.errors += 1
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if not chunk.get("choices"):
                if chunk.get("usage"):
                    result.tokens += chunk["usage"]["completion_tokens"]
                continue
            now = time.perf_counter()
            if last is None:
                result.ttft.append(now - start)
            else:
                result.itl.append(now - last)
            last = now
    result.requests += 1


async def run_level(url: str, clients: int, args, headers: dict) -> tuple[Result, float]:
    result, sent = Result(), 0
    deadline = time.perf_counter() + args.duration
    limits = httpx.Limits(max_connections=clients + 4)

    async def client_loop(client: httpx.AsyncClient, k: int):
        nonlocal sent
        while sent < args.requests and time.perf_counter() < deadline:
            i = sent
            sent += 1
            body = {"prompt": PROMPTS[i % len(PROMPTS)] + f" ({i})", "max_tokens": args.max_tokens,
                    "temperature": args.temperature, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            try:
                await one_request(client, url, body, result)
            except httpx.HTTPError:
                result.errors += 1

    async with httpx.AsyncClient(timeout=args.timeout, limits=limits, headers=headers) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client, k) for k in range(clients)))
        return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="server root, e.g. http://127.0.0.1:8000 (loopback only)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64], help="concurrency levels (default 1 16 64)")
    p.add_argument("--requests", type=int, default=64, help="requests per level, at most (default 64)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per level, at most (default 60)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per request (EOS ignored; default 16)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, seconds")
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    args = p.parse_args(argv)
    url = args.url.rstrip("/")
    check_loopback(url)
    if min(args.clients) < 1 or args.requests < 1 or args.max_tokens < 1 or args.duration <= 0:
        raise SystemExit("load_server: --clients, --requests, --max-tokens and --duration must be positive")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    print(f"{'clients':>7} {'reqs':>5} {'err':>4} {'req/s':>7} {'out tok/s':>9} "
          f"{'TTFT p50/p90/p99 (ms)':>24} {'ITL p50/p90/p99 (ms)':>22}")
    for clients in args.clients:
        r, elapsed = asyncio.run(run_level(url, clients, args, headers))
        ms = lambda xs: "/".join(f"{1000 * pct(xs, q):.0f}" for q in (50, 90, 99))  # noqa: E731
        print(f"{clients:>7} {r.requests:>5} {r.errors:>4} {r.requests / elapsed:>7.2f} {r.tokens / elapsed:>9.1f} "
              f"{ms(r.ttft):>24} {ms(r.itl):>22}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
