"""The sizes and codes of mmalign/ops/limits.py are the compiled kernels' too: the C++ and CUDA sources cannot
import them, so this reads their copies in the headers (no compiler needed) and fails when one side changes alone;
and no Python module writes one of the values out again."""
import re
from pathlib import Path

from mmalign.ops import limits

CSRC = Path(__file__).resolve().parents[2] / "csrc"
PACKAGE = Path(__file__).resolve().parents[2] / "mmalign"


def _constexpr(text: str, name: str) -> int:
    m = re.search(rf"constexpr\s+\w+\s+{name}\s*=\s*(\d+)\s*;", text)
    assert m, f"{name} not found"
    return int(m.group(1))


def test_one_block_limit_is_the_cuda_kernels():
    """kMaxN = kThreads * kItems, the pairs one CUDA thread block holds, is DAMO_ONE_PROGRAM_MAX_N."""
    text = (CSRC / "cuda" / "damo_step_kernel.cuh").read_text()
    assert re.search(r"constexpr int64_t kMaxN = int64_t\(kThreads\) \* kItems;", text)
    assert _constexpr(text, "kThreads") * _constexpr(text, "kItems") == limits.DAMO_ONE_PROGRAM_MAX_N


def test_select_codes_are_the_cpp_enum():
    text = (CSRC / "damo_step_math.h").read_text()
    body = re.search(r"enum DamoSelect : int64_t \{([^}]*)\}", text).group(1)
    enum = {name: int(value) for name, value in re.findall(r"(\w+)\s*=\s*(\d+)", body)}
    assert enum == {"kSelectAll": limits.SELECT_ALL, "kSelectClosest": limits.SELECT_CLOSEST,
                    "kSelectClosestSample": limits.SELECT_CLOSEST_SAMPLE, "kSelectBottom": limits.SELECT_BOTTOM,
                    "kSelectTop": limits.SELECT_TOP}


def test_loss_kinds_are_the_cpp_ones():
    """ops.cpp accepts the codes 0 .. len(LOSS_TYPES) - 1; the C++ kernels take 0 as sigmoid and 1 as ipo."""
    checks = re.search(r"a\.loss_kind >= 0 && a\.loss_kind <= (\d+)", (CSRC / "ops.cpp").read_text())
    assert int(checks.group(1)) == len(limits.LOSS_TYPES) - 1
    assert limits.LOSS_TYPES[:2] == ("sigmoid", "ipo")
    assert "if (a.loss_kind == 0) {" in (CSRC / "cpu" / "damo_step.cpp").read_text()


def test_no_module_writes_a_limit_out_again():
    """The one-program limit appears as a number in limits.py only (comments and docstrings may cite it)."""
    value = str(limits.DAMO_ONE_PROGRAM_MAX_N)
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "limits.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(rf"(?<![\w.]){value}(?![\w.])", code) and not code.strip().startswith(('"', "'")):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{i}: {line.strip()}")
    assert not offenders, offenders
