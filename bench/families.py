"""Decode tok/s per model family, moeserve against mlx_lm.server (issue 15).

For each family a small bench-shaped checkpoint is built once under
``bench/checkpoints/<family>/`` (gitignored): the family's committed parity-fixture config
(``tests/fixtures/models/<family>_a/hf/config.json``) scaled up (hidden 256, 4 layers, 16
experts top-4, expert width 256, vocab 4096), with mlx-lm's own random initialisation, saved
float32 in the MLX layout by ``mlx_lm.utils.save_model`` / ``save_config``, plus the tokenizer
of the qwen2_moe bench checkpoint (``bench/make_checkpoint.py``). Both servers load the same
files. The weights are random: the text is noise, only the speed means anything.

Each server is started alone (``bench/compare.py``'s ``start_server``), warmed up, and given
the same loads from ``devtools/loadgen.py``: ~64-token prompts, 64 output tokens, at C=1 (4
requests) and C=16 (32 requests); output tok/s and median ITL are reported, and the ratio
moeserve / mlx_lm. ``--repeats 2`` runs every load twice and keeps the median (of two: the
mean).

What it does not know or do:

* mlx_lm.server runs on MLX's bundled BLAS unless ``LD_PRELOAD`` of a system OpenBLAS is
  possible (``--mlx-lm-blas same``, as in ``bench/compare.py``); with only the
  scipy-openblas32 wheel (prefixed symbols) it cannot be, so the comparison is then moeserve
  with OpenBLAS and its gemv shim against mlx-lm as installed.
* mlx_lm.server ignores ``ignore_eos``/``min_tokens``: a response may stop early at EOS; the
  token counts come from ``usage`` either way.
* A family that mlx-lm cannot load is measured in moeserve only (its mlx-lm cells are the
  error). Checkpoints are built by mlx-lm, so a family it has no model class for cannot be
  built here at all.
* kimi_k25 is skipped: its text model is deepseek_v3's.
* No prefill figures (``bench/compare.py`` has those for qwen2_moe).

Usage: python -m bench.families [--families F ...] [--repeats N] [--skip-mlx-lm] [--json OUT]
       python -m bench.families --merge RUN1.json RUN2.json   (median of separate runs)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.compare import MLX_LM_BLAS, MLX_LM_MODEL, _load, check_serve_command, start_server
from bench.make_checkpoint import DEFAULT_DIR as QWEN2_DIR
from bench.make_checkpoint import ensure_checkpoint
from moeserve.models.backend.blas import blas_path, preloadable

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "models"
CHECKPOINTS = Path(__file__).parent / "checkpoints"
FAMILIES = (
    "qwen3_moe",
    "mixtral",
    "gpt_oss",
    "deepseek_v3",
    "glm4_moe_lite",
    "minimax_m2",
    "qwen3_next",
    "qwen3_5_moe",
)
KIND = {
    "deepseek_v3": "MLA",
    "glm4_moe_lite": "MLA",
    "qwen3_next": "hybrid",
    "qwen3_5_moe": "hybrid",
}

# Keys scaled wherever a (text) config has them.
_SCALE: dict[str, Any] = {
    "hidden_size": 256,
    "vocab_size": 4096,
    "num_experts": 16,
    "num_local_experts": 16,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "experts_per_token": 4,
    "moe_intermediate_size": 256,
    "intermediate_size": 256,
    "shared_expert_intermediate_size": 256,
    "max_position_embeddings": 4096,
    "torch_dtype": "float32",
}
_LAYERS = 4


def scaled_config(family: str) -> dict[str, Any]:
    """The family's fixture config, scaled to bench size.

    Args:
        family: A model family with a ``tests/fixtures/models/<family>_a`` fixture.

    Returns:
        The config dict (HF layout; for qwen3_5_moe the text part is ``text_config``).
    """
    config = json.loads((FIXTURES / f"{family}_a" / "hf" / "config.json").read_text())
    text = config.get("text_config", config)
    for key, value in _SCALE.items():
        if key in text:
            text[key] = value
    layers = text["num_hidden_layers"]
    text["num_hidden_layers"] = _LAYERS
    for key in ("layer_types", "attn_type_list"):  # periodic patterns: repeat them
        if isinstance(text.get(key), list) and len(text[key]) == layers:
            pattern = text[key]
            text[key] = [pattern[i % len(pattern)] for i in range(_LAYERS)]
    if isinstance(text.get("mlp_layer_types"), list):  # dense first (first_k_dense_replace)
        k = text.get("first_k_dense_replace", 0)
        text["mlp_layer_types"] = ["dense"] * k + ["sparse"] * (_LAYERS - k)
    if text.get("sliding_window"):
        text["sliding_window"] = 128
    if family == "deepseek_v3":  # keep the fixture's grouped routing valid with 16 experts
        text["n_group"], text["topk_group"] = 4, 2
    if "text_config" in config:
        config["torch_dtype"] = "float32"
    config["tie_word_embeddings"] = False
    config["bos_token_id"], config["eos_token_id"] = 0, [2, 0]
    return config


def ensure_family_checkpoint(family: str, seed: int = 0) -> Path:
    """Build ``bench/checkpoints/<family>/`` with mlx-lm unless it is already there.

    Args:
        family: The family.
        seed: MLX random seed for the initial weights.

    Returns:
        The checkpoint directory.
    """
    out = CHECKPOINTS / family
    if (out / "config.json").exists():
        return out
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.utils import _get_classes, save_config, save_model

    config = scaled_config(family)
    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    model.update(tree_map(lambda v: v.astype(mx.float32), model.parameters()))
    mx.eval(model.parameters())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(tmp, model)
    save_config(dict(config), config_path=tmp / "config.json")
    qwen2 = ensure_checkpoint(QWEN2_DIR)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(qwen2 / name, tmp / name)
    tmp.rename(out)
    return out


def bench_family(
    name: str, model_dir: Path, args: argparse.Namespace, words: dict[str, int], log_dir: Path
) -> dict[str, Any]:
    """Start one server on one checkpoint and run the C=1 and C=16 decode loads.

    Args:
        name: ``moeserve`` or ``mlx_lm``.
        model_dir: The checkpoint.
        args: The parsed flags.
        words: Prompt word count (``chat``), set by moeserve's first run and reused.
        log_dir: Where server logs go.

    Returns:
        ``{"startup_s", "runs": {C: {"tok_s", "itl_ms", "failed", "out_tokens", ...}}}``.
    """
    started = time.perf_counter()
    server = start_server(name, model_dir, log_dir, args.startup_timeout)
    result: dict[str, Any] = {"startup_s": time.perf_counter() - started, "runs": {}}
    model = MLX_LM_MODEL if name == "mlx_lm" else None
    load = {"prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens}
    try:
        _load(server, model, concurrency=1, num_requests=1, **{**load, "output_tokens": 8})
        for c, n in ((1, args.n1), (16, args.n16)):
            reports = []
            for r in range(args.repeats):
                report = _load(
                    server,
                    model,
                    concurrency=c,
                    num_requests=n,
                    prompt_words=words.get("chat"),
                    seed=100 * r + c,
                    stagger=args.stagger,
                    **load,
                )
                words.setdefault("chat", report["prompt_words"])
                reports.append(report)
            result["runs"][c] = {
                "tok_s": statistics.median(x["output_throughput"] for x in reports),
                "itl_ms": statistics.median(x["median_itl_ms"] for x in reports),
                "tok_s_each": [x["output_throughput"] for x in reports],
                "failed": sum(x["failed"] for x in reports),
                "out_tokens": [x["total_output_tokens"] for x in reports],
                "errors": [x["errors"] for x in reports if x["failed"]],
            }
    finally:
        server.stop()
    return result


def markdown(results: dict[str, dict[str, Any]]) -> str:
    """The results as a Markdown table.

    Args:
        results: By family: ``{"moeserve": ..., "mlx_lm": ...}`` (``bench_family`` results or
            ``{"error": str}``).

    Returns:
        The table.
    """
    head = (
        "| family | kind | moeserve C=1 tok/s | mlx-lm C=1 | ratio | moeserve C=16 tok/s "
        "| mlx-lm C=16 | ratio | ITL p50 ms C=16 (moeserve / mlx-lm) |"
    )
    lines = [head, "|" + "---|" * 9]

    def cell(res: dict[str, Any], c: int, key: str) -> float | None:
        return res.get("runs", {}).get(c, {}).get(key)

    for family, res in results.items():
        moe, mlx = res.get("moeserve", {}), res.get("mlx_lm", {})
        cells = [family, KIND.get(family, "attention")]
        for c in (1, 16):
            a, b = cell(moe, c, "tok_s"), cell(mlx, c, "tok_s")
            cells += [
                f"{a:.1f}" if a else "error" if "error" in moe else "-",
                f"{b:.1f}" if b else "error" if "error" in mlx else "-",
                f"{a / b:.2f}x" if a and b else "-",
            ]
        ia, ib = cell(moe, 16, "itl_ms"), cell(mlx, 16, "itl_ms")
        cells.append(f"{ia:.1f} / {ib:.1f}" if ia and ib else f"{ia or '-'} / {ib or '-'}")
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    return "\n".join(lines)


def merge(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """Several runs' JSON results as one, each figure the median over the runs.

    Args:
        paths: ``--json`` outputs of earlier runs.

    Returns:
        Results by family, as ``main`` collects them.
    """
    runs = [json.loads(p.read_text()) for p in paths]
    merged: dict[str, dict[str, Any]] = {}
    for family in runs[0]:
        merged[family] = {}
        for name in runs[0][family]:
            each = [r[family][name] for r in runs if "runs" in r.get(family, {}).get(name, {})]
            if not each:
                merged[family][name] = runs[0][family][name]
                continue
            merged[family][name] = {
                "runs": {
                    int(c): {
                        key: statistics.median(e["runs"][c][key] for e in each)
                        for key in ("tok_s", "itl_ms")
                    }
                    for c in each[0]["runs"]
                }
            }
    return merged


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The namespace.
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--n1", type=int, default=4, help="requests at C=1")
    p.add_argument("--n16", type=int, default=32, help="requests at C=16")
    p.add_argument("--repeats", type=int, default=1, help="runs per load (median kept)")
    p.add_argument("--stagger", type=float, default=0.05, help="s between first-wave starts")
    p.add_argument("--skip-mlx-lm", action="store_true", help="run moeserve only")
    p.add_argument("--mlx-lm-blas", choices=["auto", "same", "bundled"], default="auto")
    p.add_argument("--build-only", action="store_true", help="build the checkpoints and stop")
    p.add_argument("--startup-timeout", type=float, default=300)
    p.add_argument("--log-dir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None, metavar="OUT")
    p.add_argument("--merge", type=Path, nargs="+", default=None, help="print JSONs' medians")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build the checkpoints, run both servers on each, print the table.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        0 when every load of every server completed, else 1.
    """
    args = parse_args(argv)
    if args.merge:
        print(markdown(merge(args.merge)))
        return 0
    mode = args.mlx_lm_blas
    if mode == "auto":
        mode = "same" if blas_path() is not None and preloadable() else "bundled"
    MLX_LM_BLAS["mode"] = mode
    results: dict[str, dict[str, Any]] = {}
    for family in args.families:
        try:
            ensure_family_checkpoint(family)
        except Exception as exc:  # reported; the other families still run
            results[family] = {"moeserve": {"error": f"build: {exc!r}"}}
            print(f"{family}: build failed: {exc!r}", flush=True)
    if args.build_only:
        return 0
    check_serve_command()
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="moeserve-families-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    failed = False
    for family in args.families:
        if family in results:
            continue
        results[family] = {}
        words: dict[str, int] = {}
        for name in ["moeserve"] + ([] if args.skip_mlx_lm else ["mlx_lm"]):
            try:
                res = bench_family(name, CHECKPOINTS / family, args, words, log_dir)
                failed |= any(r["failed"] for r in res["runs"].values())
            except Exception as exc:  # reported in the table
                res = {"error": repr(exc)[-2000:]}
                failed = True
            results[family][name] = res
            print(f"{family} {name}: {json.dumps(res)[:600]}", flush=True)
    print(f"mlx_lm.server BLAS: {mode}; moeserve BLAS: {blas_path()}; logs: {log_dir}")
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
