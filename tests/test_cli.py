"""The `mmalign` command, the demo, and the promise that CI runs exactly the README's test command."""
import json
import pathlib
import re
import subprocess
import sys

from mmalign import cli, ops_demo as demo

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_env_lists_every_op_and_backend(capsys):
    assert cli.main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    probe = info["backends"]["cpu float32"]
    assert set(probe) >= {"sequence_logps", "fused_linear_sequence_logps"}
    assert set(probe["sequence_logps"]) == {"triton", "cuda", "cpp", "reference"}
    assert info["packages"]["torch"] != "not installed"


def test_python_dash_m_env():
    out = subprocess.run([sys.executable, "-m", "mmalign", "env"], capture_output=True, text=True, check=True).stdout
    assert "backends on cpu float32" in out and "sequence_logps" in out


def test_demo_agrees_with_eager():
    text = demo.run("cpu", sizes=(2, 16, 500, 32))
    diffs = [float(x) for x in re.findall(r"max\|diff\|\s+(\S+)", text)]
    assert len(diffs) == 4 and max(diffs) < 1e-3


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- test-command -->\s*```(?:bash|sh)?\n(.*?)```", readme, re.S)
    assert len(blocks) == 1, "README must mark exactly one test command"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in ci  # .ci/run extracts and runs that block, no copy of it
