"""Load test of the web service: batched decoding against the one-at-a-time queue, same machine, one command.

Usage:
  PYTHONPATH=. .venv/bin/python benchmarks/serve_load.py [--model_name_or_path ../shared/models/stories260K-hf]
      [--streams 1,8,50] [--repeats 3] [--max_tokens 256] [--max_batch_size 64] [--threads 1] [--out results.json]

It starts two servers, each the app of web.py on 127.0.0.1 in a process of its own: ``max_batch_size``
(batched) and 1 (the first-come-first-served queue), and warms them up. Then for each number of concurrent
streams, --repeats times, the two modes taking turns (so that both meet the same load on a shared
machine), it sends that many streaming chat completions at once through the official ``openai`` client (at
least --min_requests a run, never more than that many in flight; at one stream the two servers take turns
request by request, as the load of a shared machine swings within seconds) and reports, over all runs of a
mode at that level, aggregate generated tokens/s, p50/p99 time to first token and p50/p99 total latency,
with each run's tokens/s, ``uptime`` before and after and the load average after each run. Requests are
greedy (temperature 0) and their prompts distinct, so both modes must give the same answers: the script
checks that too.
Each server stops by itself; the whole run stops after --time_limit_s. The default --compute_dtype is
fp32: there greedy answers are the same batched or not; in bf16 rounding differs with the batch's
shape, and a few answers drift apart after some tokens.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Coroutine
from typing import Any

from alpaca_cot.cli import run_cli
from alpaca_cot.errors import UserError
from alpaca_cot.io import write_json_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_ID = "bench"
TOPICS = ["a cat", "the sea", "a dragon", "a red ball", "the moon", "a little girl", "a big tree", "a train",
          "a birthday", "the rain"]
VERBS = ["Tell me a story about", "Write a short poem about", "Describe", "Explain what you know about",
         "Give three facts about"]


def prompt(i: int) -> str:
    """The i-th request's message (50 distinct ones, then they repeat)."""
    return f"{VERBS[i // len(TOPICS) % len(VERBS)]} {TOPICS[i % len(TOPICS)]}."


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile (inclusive method); the value itself for a single sample."""
    return values[0] if len(values) == 1 else statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def serve(port: int, max_batch_size: int, model_name_or_path: str, model_type: str, lora_dir: str | None,
          compute_dtype: str, threads: int, max_tokens: int) -> None:
    """The server process: web.py's app over the model, on 127.0.0.1:``port``."""
    import torch
    import uvicorn

    from alpaca_cot.generation.generator import Generator
    from alpaca_cot.generation.sampling import SamplingParams
    from alpaca_cot.models.loading import load_for_inference
    from alpaca_cot.serving.webapp import create_app

    torch.set_num_threads(threads)
    generator = Generator(*load_for_inference(lora_dir, model_type=model_type, model_name_or_path=model_name_or_path,
                                              compute_dtype=compute_dtype))
    app = create_app(generator, SamplingParams(max_new_tokens=max_tokens), model_id=MODEL_ID, ui=False,
                     max_batch_size=max_batch_size)
    mode = "batched" if app.state.service.batched else "one at a time"
    print(f"serving on 127.0.0.1:{port}, {mode}, on {generator.device}", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


async def one_request(client: Any, i: int, max_tokens: int) -> dict:
    """One streamed greedy chat completion: its time to first token, latency, token count and text."""
    start = time.perf_counter()
    first, pieces, tokens = None, [], 0
    stream = await client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": prompt(i)}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - start
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {"i": i, "ttft": first if first is not None else time.perf_counter() - start,
            "latency": time.perf_counter() - start, "tokens": tokens, "text": "".join(pieces)}


async def load(url: str, streams: int, requests: int, max_tokens: int) -> dict:
    """``requests`` requests, ``streams`` in flight at a time; the aggregate figures."""
    import openai

    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600) as client:
        slots = asyncio.Semaphore(streams)

        async def limited(i: int) -> dict:
            async with slots:
                return await one_request(client, i, max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(i) for i in range(requests)))
        return summary(results, streams, time.perf_counter() - start)


async def turns(urls: dict[str, str], requests: int, max_tokens: int) -> dict[str, dict]:
    """One stream to each server, ``requests`` requests each, the servers taking turns request by request (the
    first one alternating): both meet the same moments of the machine's load. A server's wall time is the
    time its own requests took."""
    import openai

    clients = {name: openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
               for name, url in urls.items()}
    results: dict[str, list[dict]] = {name: [] for name in urls}
    try:
        for i in range(requests):
            for name in list(urls) if i % 2 == 0 else list(reversed(urls)):
                results[name].append(await one_request(clients[name], i, max_tokens))
    finally:
        for client in clients.values():
            await client.close()
    return {name: summary(runs, 1, sum(r["latency"] for r in runs)) for name, runs in results.items()}


def summary(results: list[dict], streams: int, wall: float) -> dict:
    """The figures of requests that took ``wall`` seconds in all (answers in request order)."""
    tokens = sum(r["tokens"] for r in results)
    ttft, latency = [r["ttft"] for r in results], [r["latency"] for r in results]
    return {"streams": streams, "requests": len(results), "tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1), "ttft": ttft, "latency": latency,
            "answers": [r["text"] for r in sorted(results, key=lambda r: r["i"])]}


def uptime() -> str:
    """The machine's load, as ``uptime`` prints it (the machine may be shared)."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(max_batch_size: int, deadline: float, server_args: list[str],
                 threads: int) -> tuple[subprocess.Popen, str, str]:
    """A server with ``max_batch_size`` in a process of its own, warmed up: (process, URL, banner)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve_port", str(port),
                             "--max_batch_size", str(max_batch_size), *server_args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    banner = ""
    while proc.poll() is None and not banner.startswith("serving on"):
        banner = proc.stdout.readline().strip()
    while True:
        if proc.poll() is not None:
            raise UserError(f"the server exited ({proc.returncode}): {banner} {proc.stdout.read()[-2000:]}")
        try:
            urllib.request.urlopen(f"{url}/v1/models", timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise UserError("the server did not start before --time_limit_s") from None
            time.sleep(0.3)
    asyncio.run(load(url, 1, 1, 8))  # warm-up
    return proc, url, banner


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def pooled(runs: list[dict]) -> dict:
    """The runs of one mode at one level as one: tokens/s over their total wall time, percentiles over all their
    requests; each run's tokens/s and the load after it."""
    tokens, wall = sum(r["tokens"] for r in runs), sum(r["wall_s"] for r in runs)
    ttft, latency = [t for r in runs for t in r["ttft"]], [t for r in runs for t in r["latency"]]
    return {"streams": runs[0]["streams"], "requests": sum(r["requests"] for r in runs), "tokens": tokens,
            "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_s": round(percentile(ttft, 50), 3), "ttft_p99_s": round(percentile(ttft, 99), 3),
            "latency_p50_s": round(percentile(latency, 50), 3), "latency_p99_s": round(percentile(latency, 99), 3),
            "runs_tokens_per_s": [r["tokens_per_s"] for r in runs], "runs_load": [r["load"] for r in runs],
            "ttft_s": [round(t, 3) for t in ttft], "latency_s": [round(t, 3) for t in latency],
            "answers": runs[0]["answers"]}


def measure(modes: dict[str, str], levels: list[int], repeats: int, min_requests: int, max_tokens: int,
            deadline: float) -> dict[str, list[dict]]:
    """Every level ``repeats`` times against every server, the modes taking turns (the first one alternating),
    so that both meet the same machine load: at one stream request by request (see ``turns``), else run by run;
    per mode and level, all its runs pooled."""
    results: dict[str, list[dict]] = {name: [] for name in modes}
    for streams in levels:
        runs: dict[str, list[dict]] = {name: [] for name in modes}
        requests = max(streams, min_requests)
        for repeat in range(repeats):
            order = list(modes) if repeat % 2 == 0 else list(reversed(modes))
            if streams == 1:
                done = within(deadline, turns({name: modes[name] for name in order}, requests, max_tokens))
            else:
                done = {name: within(deadline, load(modes[name], streams, requests, max_tokens)) for name in order}
            for name, run in done.items():
                runs[name].append({**run, "load": round(os.getloadavg()[0], 2)})
        for name in modes:
            results[name].append(pooled(runs[name]))
    return results


def within(deadline: float, job: Coroutine) -> Any:
    """The result of ``job``, which must end by ``deadline``."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        job.close()
        raise UserError("--time_limit_s ran out; lower --max_tokens, --repeats or --streams")
    return asyncio.run(asyncio.wait_for(job, remaining))


def main(model_name_or_path: str = os.path.join(os.path.dirname(ROOT), "shared", "models", "stories260K-hf"),
         model_type: str = "llama", lora_dir: str | None = None, compute_dtype: str = "fp32",
         streams: str = "1,8,50", max_tokens: int = 256, max_batch_size: int = 64, min_requests: int = 16,
         threads: int = 1, repeats: int = 3, time_limit_s: float = 1800, out: str | None = None,
         serve_port: int | None = None) -> None:
    """Measure the server batched (--max_batch_size) and one request at a time, and print both tables.

    --streams: the numbers of concurrent streams; --min_requests: requests per run at least (a level
    of 1 stream sends them one after the other); --repeats: runs per mode and level (pooled);
    --threads: torch threads of each server; --out: the figures as JSON too. (--serve_port runs the server
    process itself.)
    """
    server_args = ["--model_name_or_path", model_name_or_path, "--model_type", model_type, "--compute_dtype",
                   compute_dtype, "--threads", str(threads), "--max_tokens", str(max_tokens),
                   *(["--lora_dir", lora_dir] if lora_dir else [])]
    if serve_port is not None:
        return serve(int(serve_port), int(max_batch_size), model_name_or_path, model_type, lora_dir, compute_dtype,
                     int(threads), int(max_tokens))
    levels = [int(s) for s in str(streams).strip("()[]").split(",") if s.strip()]
    if not levels or min(levels) < 1 or int(max_batch_size) < 2:
        raise UserError("--streams takes positive numbers (e.g. 1,8,50) and --max_batch_size must be 2 or more")
    deadline = time.monotonic() + float(time_limit_s)
    report: dict[str, Any] = {"model": lora_dir or model_name_or_path, "max_tokens": max_tokens,
                              "repeats": int(repeats), "cpus": os.cpu_count(), "uptime_start": uptime()}
    servers = {name: start_server(size, deadline, server_args, int(threads))
               for name, size in (("batched", int(max_batch_size)), ("one_at_a_time", 1))}
    try:
        for name, (_, _, banner) in servers.items():
            print(f"{name}: {banner}", flush=True)
        report.update(measure({name: url for name, (_, url, _) in servers.items()}, levels, int(repeats),
                              int(min_requests), int(max_tokens), deadline))
    finally:
        for proc, _, _ in servers.values():
            stop(proc)
    report["uptime_end"] = uptime()
    print(f"\nmodel {report['model']}, max_tokens {max_tokens}, greedy, {report['cpus']} CPUs, {repeats} runs "
          f"pooled per row, the modes taking turns\nuptime at start: {report['uptime_start']}\nuptime at end:   "
          f"{report['uptime_end']}\n")
    print("| mode | streams | requests | tokens | tokens/s | each run's tokens/s | load (1 min) per run | "
          "TTFT p50 s | TTFT p99 s | latency p50 s | latency p99 s |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for name in ("batched", "one_at_a_time"):
        for r in report[name]:
            print(f"| {name.replace('_', ' ')} | {r['streams']} | {r['requests']} | {r['tokens']} | "
                  f"{r['tokens_per_s']} | {r['runs_tokens_per_s']} | {r['runs_load']} | {r['ttft_p50_s']} | "
                  f"{r['ttft_p99_s']} | {r['latency_p50_s']} | {r['latency_p99_s']} |")
    for batched, single in zip(report["batched"], report["one_at_a_time"], strict=True):
        same = sum(a == b for a, b in zip(batched["answers"], single["answers"], strict=True))
        print(f"{batched['streams']} streams: batched {batched['tokens_per_s'] / single['tokens_per_s']:.2f}x the "
              f"tokens/s of one at a time, TTFT p50 {batched['ttft_p50_s'] / single['ttft_p50_s']:.2f}x; greedy "
              f"answers identical in {same}/{len(batched['answers'])}")
        if batched["streams"] == 1:  # request k of both modes: the same answer, asked one after the other
            speed = statistics.median(a / b for a, b in zip(single["latency_s"], batched["latency_s"], strict=True))
            ttft = statistics.median(b / a for a, b in zip(single["ttft_s"], batched["ttft_s"], strict=True))
            print(f"  per request pair (medians): batched {speed:.2f}x the tokens/s of one at a time, TTFT {ttft:.2f}x")
    if out:
        write_json_atomic(out, report)
        print(f"figures written to {out}")


if __name__ == "__main__":
    run_cli(main)
