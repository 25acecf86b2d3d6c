"""The ``Dockerfile``, checked without a Docker engine (issue #3, "Workers behind nginx"):
"slim Python base, non-root user, installs the package the same way the README does,
exposes the port, HEALTHCHECK on /healthz, runs proxy serve".

The file is parsed (instructions, with continuation lines joined and comments dropped)
and its claims are checked against the repository: what it copies exists and is what
setup.cfg needs to build the package; the port it exposes is the one it serves and
health-checks. Then its command and its HEALTHCHECK are run here, with the image's
environment (only the address moved to a free loopback port): the check passes while
the gateway runs and fails once it has stopped.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tests.procs import clean_env, free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    def words(self) -> list[str]:
        """Exec form (a JSON array) or shell form, as a list of words."""
        if self.args.startswith("["):
            words: list[str] = json.loads(self.args)
            return words
        return shlex.split(self.args)


def instructions() -> list[Instruction]:
    found: list[Instruction] = []
    current = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments may sit between continuation lines too
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        keyword, _, args = (current + stripped).partition(" ")
        found.append(Instruction(keyword.upper(), args.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return found


def all_of(keyword: str) -> list[Instruction]:
    return [i for i in instructions() if i.keyword == keyword]


def last(keyword: str) -> Instruction:
    matches = all_of(keyword)
    assert matches, f"the Dockerfile has no {keyword}"
    return matches[-1]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in all_of("ENV"):
        for word in instruction.words():
            name, _, value = word.partition("=")
            env[name] = value
    return env


def command() -> list[str]:
    return last("ENTRYPOINT").words() + last("CMD").words()


def healthcheck() -> list[str]:
    """The HEALTHCHECK's command as an argv (a shell form runs under ``/bin/sh -c``)."""
    _, _, check = last("HEALTHCHECK").args.partition(" CMD ")
    assert check, "HEALTHCHECK needs a CMD"
    if check.startswith("["):
        return Instruction("CMD", check).words()
    return ["/bin/sh", "-c", check.strip()]


def setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser


def test_slim_python_base_new_enough_for_the_package() -> None:
    base = instructions()[0]
    assert base.keyword == "FROM"
    match = re.fullmatch(r"python:(\d+)\.(\d+)(?:\.\d+)?-slim(?:-\w+)?", base.args)
    assert match, f"not a slim Python base: {base.args}"
    required = re.fullmatch(r">=\s*(\d+)\.(\d+)", setup_cfg()["options"]["python_requires"])
    assert required
    assert (int(match[1]), int(match[2])) >= (int(required[1]), int(required[2]))


def test_copies_exist_and_are_what_the_package_build_needs() -> None:
    copied: set[str] = set()
    for instruction in all_of("COPY") + all_of("ADD"):
        words = [w for w in instruction.words() if not w.startswith("--")]
        sources = words[:-1]
        assert sources, instruction
        for source in sources:
            assert (ROOT / source).exists(), f"COPY of {source}, which is not in the repo"
            copied.add(source.rstrip("/"))
    options = setup_cfg()
    assert options["options"]["packages"].strip() == "find:"
    include = options["options.packages.find"]["include"]
    packages = {p.strip().split(".")[0] for p in include.split(",")}
    long_description = options["metadata"]["long_description"].removeprefix("file:").strip()
    needed = {"setup.cfg", "pyproject.toml", long_description, *packages}
    assert needed == {"setup.cfg", "pyproject.toml", "README.md", "proxy"}
    assert needed <= copied, f"not copied: {needed - copied}"


def test_installs_into_a_venv_with_pip_as_the_readme_does() -> None:
    runs = " && ".join(i.args for i in all_of("RUN"))
    venv = re.search(r"python\S* -m venv (\S+)", runs)
    assert venv, "the README installs into a venv"
    assert image_env()["PATH"].startswith(f"{venv[1]}/bin:"), "the venv must come first"
    assert re.search(r"\bpip install '\.\[redis\]'(\s|$)", runs), runs
    assert "pip install -e" not in runs, "the image's source never changes"
    # The source tree is not the working directory: `python -m proxy` (every worker)
    # would import it instead of the installed package.
    workdir, source_root = PurePosixPath("/"), None
    for instruction in instructions():
        words = instruction.words() if instruction.keyword == "COPY" else []
        if instruction.keyword == "WORKDIR":
            workdir /= instruction.args
        elif "proxy" in [w.rstrip("/") for w in words[:-1]]:
            target = workdir / words[-1]
            source_root = target.parent if target.name == "proxy" else target
    assert source_root is not None and workdir != source_root, (workdir, source_root)


def test_runs_proxy_serve_as_a_non_root_user_on_the_exposed_port() -> None:
    user = last("USER").args.split(":")[0]
    assert user not in ("root", "0")
    assert re.search(rf"useradd\b.*\b{user}\b", " ".join(i.args for i in all_of("RUN")))
    keywords = [i.keyword for i in instructions()]
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    assert command()[:2] == ["proxy", "serve"], command()
    assert setup_cfg()["options.entry_points"]["console_scripts"].strip() == (
        "proxy = proxy.cli.main:main")
    env = image_env()
    assert env["PROXY_HOST"] == "0.0.0.0", "inside a container, loopback is unreachable"
    assert "--host" not in command() and "--port" not in command(), "flags beat the env"
    assert last("EXPOSE").args == env["PROXY_PORT"]


def test_healthcheck_hits_healthz_without_curl() -> None:
    check = " ".join(healthcheck())
    assert not re.search(r"\b(curl|wget)\b", check), "the slim image has neither"
    assert re.search(r"\bpython3?\b", check)
    assert "/healthz" in check
    assert "PROXY_PORT" in check, "the check must follow the served port"


def test_the_image_command_serves_and_its_healthcheck_follows(tmp_path: Path) -> None:
    """The image's command and HEALTHCHECK with the image's environment, except the
    address (a free loopback port: tests never listen on every interface)."""
    env = {**clean_env(), **{k: v for k, v in image_env().items() if k.startswith("PROXY_")},
           "PROXY_HOST": "127.0.0.1", "PROXY_PORT": str(free_port())}
    # `python` is this interpreter, `proxy` its console script; the address is the env's.
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    serve = [sys.executable, "-m", "proxy", *_without_address(command()[1:])]
    check = healthcheck()
    log = tmp_path / "proxy.log"
    with log.open("wb") as output:
        gateway = subprocess.Popen(serve, env=env, cwd=tmp_path, stdout=output,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while (result := _run(check, env)).returncode != 0:
            assert gateway.poll() is None, log.read_text()
            assert time.monotonic() < deadline, result.stderr[-300:] + log.read_text()
            time.sleep(0.1)
    finally:
        gateway.terminate()
        try:
            gateway.wait(10)
        except subprocess.TimeoutExpired:
            gateway.kill()
            gateway.wait(5)
    assert gateway.returncode == 0, log.read_text()  # SIGTERM: a clean stop
    stopped = _run(check, env)
    assert stopped.returncode == 1, stopped.stderr
    assert "Connection refused" in stopped.stderr


def _without_address(words: list[str]) -> list[str]:
    """``words`` without ``--host``/``--port`` and their values."""
    out: list[str] = []
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word in ("--host", "--port"):
            skip = True
        elif not word.startswith(("--host=", "--port=")):
            out.append(word)
    return out


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=10,
                          check=False)
