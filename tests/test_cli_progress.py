"""Progress and colour of ``proxy check`` and ``proxy models`` (issue 10, CLI), the real
commands in subprocesses against two upstreams on loopback, one answering ~1 s late:

* on a terminal (a pseudo-terminal the test reads): the fast provider's line comes while
  the slow one is still waited for, a spinner names the slow one, results are coloured;
* with ``NO_COLOR`` set, the same terminal gets no colour codes at all;
* not a terminal (pipes): plain lines, one per provider, and no control characters.

``on_terminal`` (a child on a pseudo-terminal, read without blocking the loop) is in
tests/cli_helpers.py.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.cli_helpers import WAIT, cli_env, models_upstream, on_terminal
from tests.conftest import StartUpstream

SLOW = 1.0  # seconds the slow upstream takes to list its models
COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # an SGR sequence: colour, bold, reset
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but \t and \n


async def _two_upstreams(start_upstream: StartUpstream, tmp_path: Path) -> str:
    fast = models_upstream(models=("quick-1",))
    slow = models_upstream(models=("late-1", "late-2"), latency=SLOW)
    providers = [{"name": name, "type": "openai_compat",
                  "base_url": f"{await start_upstream(upstream.app())}/v1"}
                 for name, upstream in (("slow", slow), ("fast", fast))]
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump({"providers": providers, "timeouts": {"discovery": 15}}))
    return str(path)


async def test_check_on_a_terminal_shows_each_provider_as_it_answers(
    start_upstream: StartUpstream, tmp_path: Path,
) -> None:
    config = await _two_upstreams(start_upstream, tmp_path)
    async with on_terminal("check", "--config", config, env=cli_env(TERM="xterm")) as term:
        await term.expect("fast: ")
        # The fast provider is reported while the slow one is still being waited for.
        assert term.process.poll() is None, term.text()
        await term.expect("slow: ")
        assert await term.finish() == 0, term.text()
    out = term.text()
    assert "waiting for slow" in out  # the spinner line, naming what is still silent
    assert "\x1b[K" in out  # redrawn in place
    assert "\x1b[32mok\x1b[0m" in out  # coloured results, in the lines and the table
    table = COLOUR.sub("", out[out.index("PROVIDER"):])
    assert [line.split()[:3] for line in table.splitlines()[1:3]] == [
        ["slow", "openai_compat", "ok"], ["fast", "openai_compat", "ok"]]


async def test_models_on_a_terminal_with_no_color_has_no_colour(
    start_upstream: StartUpstream, tmp_path: Path,
) -> None:
    config = await _two_upstreams(start_upstream, tmp_path)
    env = cli_env(TERM="xterm", NO_COLOR="1")
    async with on_terminal("models", "--config", config, env=env) as term:
        await term.expect("fast: ")
        await term.expect("slow: ")
        assert await term.finish() == 0, term.text()
    out = term.text()
    assert not COLOUR.search(out), repr(out)
    assert "waiting for slow" in out  # progress is still shown: only colour is off
    assert "late-2" in out and "quick-1" in out


async def test_models_on_a_terminal_is_coloured_without_no_color(
    start_upstream: StartUpstream, tmp_path: Path,
) -> None:
    config = await _two_upstreams(start_upstream, tmp_path)
    async with on_terminal("models", "--config", config, env=cli_env(TERM="xterm")) as term:
        assert await term.finish() == 0, term.text()
    assert "\x1b[32mok\x1b[0m" in term.text() and "\x1b[1mPROVIDER" in term.text()


async def test_not_a_terminal_gets_plain_lines_only(
    start_upstream: StartUpstream, tmp_path: Path,
) -> None:
    config = await _two_upstreams(start_upstream, tmp_path)
    for command in ("check", "models"):
        # TERM=xterm: only the streams decide, not what the terminal type would allow.
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "proxy", command, "--config", config],
            env=cli_env(TERM="xterm"), stdin=subprocess.DEVNULL, capture_output=True,
            timeout=WAIT, check=False)
        out, err = result.stdout.decode(), result.stderr.decode()
        assert result.returncode == 0, (out, err)
        assert not CONTROL.search(out) and not CONTROL.search(err), (out, err)
        lines = err.splitlines()
        # One line per provider, in the order they answered: the fast one first.
        assert [line.split(":")[0] for line in lines] == ["fast", "slow"], err
        assert lines[0].startswith("fast: ok 1 models (")
        assert lines[1].startswith("slow: ok 2 models (")
        assert "waiting" not in err
