"""The `mmalign` command, the ops demo, and CI running exactly the README's test command."""
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


def test_ci_runs_the_readme_test_command(tmp_path):
    """.ci/run runs exactly the block after the README's test-command marker (checked by running the script on a
    README whose block writes a file), fails on a README with two such blocks, and the real README's block installs
    the test extra and runs pytest."""
    import shutil

    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    marked = "<!-- test-command -->\n```bash\necho ran > {out}\n```\n"
    (tmp_path / "README.md").write_text("# x\n```bash\necho other > other.txt\n```\n" + marked.format(out="ran.txt"))
    subprocess.run(["bash", str(tmp_path / ".ci" / "run")], check=True, capture_output=True)
    assert (tmp_path / "ran.txt").read_text() == "ran\n" and not (tmp_path / "other.txt").exists()
    (tmp_path / "README.md").write_text(marked.format(out="a.txt") + marked.format(out="b.txt"))
    two = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], capture_output=True, text=True)
    assert two.returncode != 0 and "exactly one test command" in two.stderr and not (tmp_path / "a.txt").exists()
    block = re.findall(r"<!-- test-command -->\s*```(?:bash|sh)?\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(block) == 1 and '".[test]"' in block[0] and "python -m pytest" in block[0]
