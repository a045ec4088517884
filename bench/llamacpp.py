"""moeserve against llama.cpp's ``llama-server`` on the bench checkpoint's own weights: one command.

``python -m bench.llamacpp`` does, reusing whatever an earlier run left in the cache
(``$MOESERVE_BENCH_CACHE``, default ``~/.cache/moeserve-bench``; nothing under the repo):

1. **Build** ``llama-server`` from the llama.cpp that the ``llama-cpp-python`` sdist vendors
   (``pip download --no-binary :all: --no-deps llama-cpp-python``), with CMake:
   ``-DGGML_NATIVE=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF`` (the default UI
   fetch needs the network) ``-DLLAMA_OPENSSL=OFF``, under ``nice -n 10`` with ``--jobs``
   (default 2) parallel compiles. 93 min on the shared 2-core machine under load; done once.
2. **Convert** the bench checkpoint (``bench/make_checkpoint.py``: Qwen2-MoE, MLX layout) to
   the publisher layout (one tensor per expert) with ``norm_topk_prob: false`` in
   ``bench/checkpoints/qwen2_moe_publisher`` (stock llama.cpp qwen2moe does not renormalise
   the top-k router weights, so both servers serve this copy), then to GGUF float32 with the
   vendored ``convert_hf_to_gguf.py --outtype f32``. Our trained tokenizer's pre-tokenizer
   hash is unknown to it; the conversion runs in a child process that replaces
   ``get_vocab_base_pre`` with one answering ``"gpt-2"`` (the GPT-2 split pattern our
   byte-level BPE uses) before calling the script's ``main``; the vendored tree is untouched.
3. **Check** that both servers tokenise the bench prompts identically (moeserve ``/tokenize``
   against llama-server ``/tokenize``) and that their greedy tokens agree for ``--check-steps``
   (32) steps from the same chat-rendered prompt ids (moeserve ``/v1/completions`` with
   logprobs, llama-server ``/completion`` with ``return_tokens``; llama's ids are compared as
   the token strings our tokenizer gives them, which is how moeserve reports tokens).
4. **Serve** both at once on loopback ports: ``llama-server --parallel 16 --cont-batching
   --no-kv-unified -t 2 -tb 2 -fa off -ctk f32 -ctv f32 -c 16384`` (1,024 tokens per slot)
   and ``moeserve serve --dtype float32`` with its defaults (optionally ``mlx_lm.server``
   too, ``--mlx-lm``, as ``bench/compare.py`` starts it), warm each up, and run the loads of
   ``devtools/loadgen.py`` (streaming chat completions, greedy, ``ignore_eos``): C=1 (4
   requests) and C=16 (32 requests), ~190-token prompts, 128 output tokens, the servers
   interleaved within every round (the order rotates), the same prompts for all in a round
   and new prompts each round. Figures are the median over ``--rounds`` rounds; ratios are
   moeserve / llama.cpp (above 1: moeserve higher: better for tok/s, worse for ms).

What it does not do: prefill-speed runs (``bench/compare.py`` has those for moeserve and
mlx-lm), quantized GGUFs, or any check that llama-server honours every request field; the
``usage`` prompt-token totals of both servers are printed so that a template mismatch shows.

``--moeserve-env K=V[,K=V]`` serves one more moeserve with that environment in the same
rounds (``OPENBLAS_NUM_THREADS=1``, say); the flag repeats, one server each. The parity
checks and the interleaved loads are in ``bench/llamacpp_rounds.py``.

Usage: python -m bench.llamacpp [--rounds 2] [--mlx-lm] [--moeserve-env K=V] [--jobs 2]
       [--build-only] [--llama-server PATH] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import mlx.core as mx

from bench.compare import MLX_LM_BLAS, MLX_LM_MODEL, start_server
from bench.llamacpp_rounds import check_parity, markdown, run_rounds, summarize
from bench.make_checkpoint import DEFAULT_DIR, ensure_checkpoint
from bench.serverproc import ServerProcess, free_port, moeserve_command
from moeserve.models.backend.blas import preloadable
from moeserve.server.text.tokenizer import Tokenizer

CACHE = Path(os.environ.get("MOESERVE_BENCH_CACHE", Path.home() / ".cache" / "moeserve-bench"))
PUBLISHER_DIR = Path(__file__).parent / "checkpoints" / "qwen2_moe_publisher"
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
)
LLAMA_FLAGS = (
    "--parallel",
    "16",
    "--cont-batching",
    "--no-kv-unified",
    "-t",
    "2",
    "-tb",
    "2",
    "-fa",
    "off",
    "-ctk",
    "f32",
    "-ctv",
    "f32",
    "-c",
    "16384",
)
# The converter child: the GPT-2 pre-tokenizer for our tokenizer, then the script's main.
_CONVERT = """
import runpy, sys
sys.path.insert(0, sys.argv[1])
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
script = sys.argv[1] + "/convert_hf_to_gguf.py"
sys.argv = [script, *sys.argv[2:]]
runpy.run_path(script, run_name="__main__")
"""


def vendored_tree(cache: Path = CACHE) -> Path:
    """The llama.cpp tree the ``llama-cpp-python`` sdist vendors, downloading it if needed.

    Args:
        cache: The bench cache directory.

    Returns:
        The ``vendor/llama.cpp`` directory.
    """
    found = sorted(cache.glob("llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt"))
    if found:
        return found[-1].parent
    sdists = cache / "sdist"
    if not list(sdists.glob("llama_cpp_python-*.tar.gz")):
        pip = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
        subprocess.run([*pip, "llama-cpp-python", "-d", str(sdists)], check=True)
    archive = sorted(sdists.glob("llama_cpp_python-*.tar.gz"))[-1]
    with tarfile.open(archive) as tar:
        tar.extractall(cache, filter="data")
    return vendored_tree(cache)


def ensure_llama_server(cache: Path = CACHE, jobs: int = 2) -> Path:
    """Build ``llama-server`` once (niced) under ``cache/llama.cpp-build``.

    Args:
        cache: The bench cache directory.
        jobs: Parallel compile jobs.

    Returns:
        The binary.
    """
    build = cache / "llama.cpp-build"
    binary = build / "bin" / "llama-server"
    if binary.exists():
        return binary
    src = vendored_tree(cache)
    nice = ["nice", "-n", "10"]
    subprocess.run([*nice, "cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS], check=True)
    target = ["--build", str(build), "--target", "llama-server", "-j", str(jobs)]
    subprocess.run([*nice, "cmake", *target], check=True)
    return binary


def publisher_checkpoint(src: Path, dst: Path = PUBLISHER_DIR) -> Path:
    """Write ``src`` (MLX layout) in the publisher layout with ``norm_topk_prob: false``.

    Args:
        src: The bench checkpoint.
        dst: Output directory (reused when complete).

    Returns:
        ``dst``.
    """
    if (dst / ".complete").exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    weights: dict[str, mx.array] = {}
    for shard in sorted(src.glob("*.safetensors")):
        for name, value in mx.load(str(shard)).items():
            if ".mlp.switch_mlp." in name:  # [E, out, in] -> one tensor per expert
                for e in range(value.shape[0]):
                    weights[name.replace(".switch_mlp.", f".experts.{e}.")] = value[e]
            else:
                weights[name] = value
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["norm_topk_prob"] = False
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    (dst / ".complete").write_text("ok\n")
    return dst


def convert_gguf(model_dir: Path, cache: Path = CACHE) -> Path:
    """Convert the publisher-layout checkpoint to a float32 GGUF (once).

    Args:
        model_dir: The publisher-layout checkpoint.
        cache: The bench cache directory.

    Returns:
        The GGUF file.
    """
    out = cache / f"{model_dir.name}-f32.gguf"
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        args = [str(model_dir), "--outtype", "f32", "--outfile", str(tmp)]
        cmd = [sys.executable, "-c", _CONVERT, str(vendored_tree(cache)), *args]
        subprocess.run(cmd, check=True)
        tmp.rename(out)
    return out


def start_llama(binary: Path, gguf: Path, log_dir: Path, timeout: float) -> ServerProcess:
    """Start ``llama-server`` on a free port with the comparison's settings.

    Args:
        binary: The ``llama-server`` binary.
        gguf: The model.
        log_dir: Where its log goes.
        timeout: Seconds to wait for ``/health``.

    Returns:
        The server.
    """
    port = free_port()
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), *LLAMA_FLAGS]
    return ServerProcess.start(cmd, port, "/health", log_dir / f"llama-{port}.log", timeout=timeout)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        The namespace.
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_DIR, help="MLX-layout bench checkpoint")
    p.add_argument("--llama-server", type=Path, default=None, help="use this binary (no build)")
    p.add_argument("--jobs", type=int, default=2, help="parallel compiles when building")
    p.add_argument("--build-only", action="store_true", help="build, convert, and stop")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--n1", type=int, default=4, help="requests at C=1")
    p.add_argument("--n16", type=int, default=32, help="requests at C=16")
    p.add_argument("--prompt-tokens", type=int, default=190)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--check-steps", type=int, default=32)
    p.add_argument("--stagger", type=float, default=0.05, help="s between first-wave starts")
    p.add_argument("--mlx-lm", action="store_true", help="also serve with mlx_lm.server")
    p.add_argument(
        "--moeserve-env",
        action="append",
        default=[],
        metavar="K=V[,K=V]",
        help="also serve a moeserve with this environment, measured in the same rounds "
        "(repeatable: one server per flag; e.g. OPENBLAS_NUM_THREADS=1)",
    )
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--json", type=Path, default=None, metavar="OUT")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build, convert, check, serve, load, compare; print the tables.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        0 when the checks passed and every request completed, else 1.
    """
    args = parse_args(argv)
    binary = args.llama_server or ensure_llama_server(CACHE, args.jobs)
    model_dir = publisher_checkpoint(ensure_checkpoint(args.model))
    gguf = convert_gguf(model_dir)
    print(f"llama-server {binary}\nmodel {model_dir}\ngguf {gguf}", flush=True)
    if args.build_only:
        return 0
    log_dir = Path(tempfile.mkdtemp(prefix="moeserve-llamacpp-"))
    servers: dict[str, tuple[ServerProcess, str | None]] = {}
    try:
        servers["llama.cpp"] = (start_llama(binary, gguf, log_dir, args.startup_timeout), None)
        moe = ServerProcess.start(
            moeserve_command(model_dir, port := free_port()),
            port,
            "/health",
            log_dir / f"moeserve-{port}.log",
            timeout=args.startup_timeout,
        )
        servers["moeserve"] = (moe, None)
        parity = check_parity(
            moe, servers["llama.cpp"][0], Tokenizer.from_dir(model_dir), args.check_steps
        )
        tok_ok = f"{parity['tokenization_equal']}/{parity['prompts_checked']}"
        agree = f"{parity['greedy_agree']}/{parity['greedy_steps']}"
        print(
            f"tokenisation identical on {tok_ok} prompts; greedy tokens agree for {agree} "
            f"steps ({parity['prompt_ids']}-token prompt)",
            flush=True,
        )
        for variant in args.moeserve_env:  # one more moeserve per flag
            env = dict(item.split("=", 1) for item in variant.split(","))
            servers[f"moeserve {variant}"] = (
                ServerProcess.start(
                    moeserve_command(model_dir, port := free_port()),
                    port,
                    "/health",
                    log_dir / f"moeserve-env-{port}.log",
                    env=env,
                    timeout=args.startup_timeout,
                ),
                None,
            )
        if args.mlx_lm:
            # Like with like where possible; the scipy-openblas32 wheel's prefixed symbols
            # cannot be preloaded, and then mlx_lm.server runs on MLX's bundled BLAS.
            MLX_LM_BLAS["mode"] = "same" if preloadable() else "bundled"
            print(f"mlx_lm.server BLAS: {MLX_LM_BLAS['mode']}", flush=True)
            servers["mlx_lm"] = (
                start_server("mlx_lm", model_dir, log_dir, args.startup_timeout),
                MLX_LM_MODEL,
            )
        reports = run_rounds(servers, args)
    finally:
        for server, _ in servers.values():
            server.stop()
    figures = summarize(reports)
    print(markdown(figures))
    failed = sum(x["failed"] for by_c in reports.values() for runs in by_c.values() for x in runs)
    out = {
        "binary": str(binary),
        "gguf": str(gguf),
        "log_dir": str(log_dir),
        "parity": parity,
        "figures": figures,
        "reports": reports,
        "failed": failed,
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    ok = parity["tokenization_equal"] == parity["prompts_checked"] and not failed
    return 0 if ok and parity["greedy_agree"] == parity["greedy_steps"] else 1


if __name__ == "__main__":
    sys.exit(main())
