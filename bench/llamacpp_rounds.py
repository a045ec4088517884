"""The served half of ``bench/llamacpp.py``: parity checks, interleaved loads, the table.

Knows how to ask a moeserve and a llama-server for the same tokenisation and greedy tokens,
how to run ``devtools/loadgen.py``'s loads on several servers in turn (the order rotating
every round, each server's idle CPU recorded while another is measured), and how to turn the
reports into medians and a Markdown table with ratios against llama.cpp. It knows nothing of
building, converting or starting the servers (``bench/llamacpp.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
from pathlib import Path

import httpx

from bench.serverproc import ServerProcess
from moeserve.devtools.loadgen import build_prompt, run_load
from moeserve.server.text.tokenizer import Tokenizer


def check_parity(moe: ServerProcess, llama: ServerProcess, tok: Tokenizer, steps: int) -> dict:
    """Same tokenisation of the bench prompts, and how many greedy steps agree.

    Args:
        moe: The moeserve server.
        llama: The llama-server.
        tok: The checkpoint's tokenizer (to name llama's token ids).
        steps: Greedy steps compared.

    Returns:
        ``{"tokenization_equal", "prompts_checked", "greedy_agree", "greedy_steps", ...}``.
    """
    root_m, root_l = moe.base_url.removesuffix("/v1"), llama.base_url.removesuffix("/v1")
    texts = [build_prompt(i, 150, seed=3) for i in range(4)]
    texts.append("Numbers 1, 22, 333 and code: def f(x): return {'k': x}  \n\n  tabs\tend")
    equal = 0
    with httpx.Client(timeout=600) as client:
        for text in texts:
            a = client.post(f"{root_m}/tokenize", json={"prompt": text}).json()["tokens"]
            b = client.post(f"{root_l}/tokenize", json={"content": text}).json()["tokens"]
            equal += a == b
        messages = [{"role": "user", "content": texts[0]}]
        ids = client.post(f"{root_m}/tokenize", json={"messages": messages}).json()["tokens"]
        body = {"prompt": ids, "max_tokens": steps, "temperature": 0.0, "ignore_eos": True}
        model = client.get(f"{moe.base_url}/models").json()["data"][0]["id"]
        out = client.post(
            f"{moe.base_url}/completions", json={**body, "model": model, "logprobs": 1}
        )
        ours = out.json()["choices"][0]["logprobs"]["tokens"]
        req = {"prompt": ids, "n_predict": steps, "temperature": 0.0, "top_k": 1}
        req.update(ignore_eos=True, return_tokens=True, cache_prompt=False)
        theirs = [
            tok.decode([t]) for t in client.post(f"{root_l}/completion", json=req).json()["tokens"]
        ]
    agree = next(
        (i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs))
    )
    return {
        "tokenization_equal": equal,
        "prompts_checked": len(texts),
        "prompt_ids": len(ids),
        "greedy_agree": agree,
        "greedy_steps": steps,
        "moeserve_tokens": ours,
        "llama_tokens": theirs,
    }


FIGURES = (  # (label, concurrency, loadgen report key)
    ("C=1 output tok/s", 1, "output_throughput"),
    ("C=1 ITL p50 ms", 1, "median_itl_ms"),
    ("C=1 TTFT p50 ms", 1, "median_ttft_ms"),
    ("C=16 output tok/s", 16, "output_throughput"),
    ("C=16 ITL p50 ms", 16, "median_itl_ms"),
    ("C=16 ITL p99 ms", 16, "p99_itl_ms"),
    ("C=16 TTFT p50 ms", 16, "median_ttft_ms"),
)


def cpu_seconds(server: ServerProcess) -> float:
    """CPU time (user + system, all threads) the server process has used so far (Linux).

    Args:
        server: The server.

    Returns:
        Seconds, or 0.0 where ``/proc`` is not there.
    """
    stat = Path(f"/proc/{server.process.pid}/stat")
    if not stat.exists():
        return 0.0
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_rounds(
    servers: dict[str, tuple[ServerProcess, str | None]], args: argparse.Namespace
) -> dict:
    """Every load on every server, interleaved: per round and C, each server in turn.

    Args:
        servers: Name -> (server, model name or None); ``moeserve`` first calibrates prompts.
        args: The parsed flags.

    Returns:
        Name -> C -> the list of loadgen reports, one per round.
    """
    load = {"prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens}
    for server, model in servers.values():  # warm-up
        asyncio.run(
            run_load(
                server.base_url,
                model,
                concurrency=1,
                num_requests=1,
                **{**load, "output_tokens": 8},
                prompt_words=40,
            )
        )
    words = None
    reports: dict[str, dict[int, list]] = {name: {1: [], 16: []} for name in servers}
    names = list(servers)
    for r in range(args.rounds):
        for c, n in ((1, args.n1), (16, args.n16)):
            order = names[r % len(names) :] + names[: r % len(names)]
            if words is None:  # moeserve calibrates the prompt length with its /tokenize
                order = ["moeserve"] + [x for x in order if x != "moeserve"]
            for name in order:
                server, model = servers[name]
                idle = {x: cpu_seconds(servers[x][0]) for x in servers if x != name}
                report = asyncio.run(
                    run_load(
                        server.base_url,
                        model,
                        concurrency=c,
                        num_requests=n,
                        prompt_words=words,
                        seed=1000 * r + c,
                        stagger=args.stagger,
                        **load,
                    )
                )
                words = words or report["prompt_words"]
                # CPU the servers not under load used meanwhile: they all stay up, so an idle
                # one that polls would take cores from the measured one.
                report["idle_cpu_s"] = {x: cpu_seconds(servers[x][0]) - t for x, t in idle.items()}
                reports[name][c].append(report)
                print(
                    f"round {r} {name:>9} C={c:<2} {report['output_throughput']:7.1f} tok/s "
                    f"ITL p50 {report['median_itl_ms']:6.1f} p99 {report['p99_itl_ms']:6.1f} "
                    f"TTFT p50 {report['median_ttft_ms']:6.0f} ms, failed {report['failed']}, "
                    f"in {report['total_input_tokens']} out {report['total_output_tokens']}, "
                    f"idle servers' CPU s {report['idle_cpu_s']}",
                    flush=True,
                )
    return reports


def summarize(reports: dict) -> dict[str, dict[str, float]]:
    """The median over rounds of every figure, per server.

    Args:
        reports: ``run_rounds``' result.

    Returns:
        Name -> label -> value.
    """
    return {
        name: {label: statistics.median(x[key] for x in by_c[c]) for label, c, key in FIGURES}
        for name, by_c in reports.items()
    }


def markdown(figures: dict[str, dict[str, float]]) -> str:
    """The comparison as a Markdown table, ratios against llama.cpp.

    Args:
        figures: ``summarize``' result.

    Returns:
        The table.
    """
    others = [n for n in figures if n != "llama.cpp"]
    head = ["", "llama.cpp", *others, *(f"{n} / llama.cpp" for n in others)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, _, _ in FIGURES:
        base = figures["llama.cpp"][label]
        cells = [label, *(f"{figures[n][label]:.1f}" for n in ["llama.cpp", *others])]
        cells += [f"{figures[n][label] / base:.2f}x" if base else "-" for n in others]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
