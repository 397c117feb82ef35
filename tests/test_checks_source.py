"""No C++ error message under csrc/ is formatted through an iostream.

On the first GPU machine (2026-11-26: H200, torch 2.11, the extension built there with a newer
GCC than torch's), every bad-input case whose message streamed an integer into a std::ostream
(checks.h's `fail`, then an ostringstream; the CPU token kernels' `TORCH_CHECK(..., n)`, which
c10::str streams the same way) died with a segmentation fault instead of raising, in the CPU
kernel libraries and in the CUDA library alike, while the messages made only of strings raised
as they should. The cause (the toolchain and the runtime libstdc++ disagreeing about the locale's
num_put facet is the likeliest) could not be reproduced, so the whole class is kept out by this
source check, which runs anywhere:

- no stream anywhere in csrc/: no <sstream>/<iostream>/<ostream>, no (o)stringstream, no
  std::cout/cerr/clog, no std::ostream or operator<<, no c10::str; checks.h's `fail` appends
  its parts to a std::string (std::to_string for integers), and its overloads reject any other
  type at compile time;
- no STD_TORCH_CHECK, TORCH_INTERNAL_ASSERT, TORCH_WARN or AT_ERROR (they format with streams),
  nor TORCH_ERROR_CODE_CHECK (its failure streams the line number; stable_common.h's shim_check
  raises through `fail`);
- TORCH_CHECK (and TORCH_CHECK_TYPE, ...) only in csrc/ops.cpp, the ATen-and-Python unit, and
  there with exactly one message argument that is a C string: string literals, or one
  `....c_str()` (ops.cpp's raise_error, for a message with a number in it, built with
  std::to_string). TORCH_CHECK hands a lone C string on as it is
  (c10/util/Exception.h, torchCheckMsgImpl); anything else, a lone std::string included
  (CanonicalizeStrTypes makes it `const std::string&`, which misses _str_wrapper's
  std::string specialization), c10::str formats with an ostringstream.

The checks themselves (csrc/checks.cpp) are shared by every library; their messages are
compared CPU against CUDA by tests/test_stable_cuda_lib.py and tests/test_tokens_cuda_checks.py.
"""

from __future__ import annotations

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CHECKS_ALLOWED_IN = "ops.cpp"

FORBIDDEN = {
    "an iostream header": re.compile(r"#\s*include\s*<(sstream|iostream|ostream|strstream)>"),
    "a string stream": re.compile(r"\b\w*stringstream\b"),
    "a standard stream": re.compile(r"\bstd::(cout|cerr|clog|ostream)\b"),
    "operator<<": re.compile(r"\boperator\s*<<"),
    "c10::str": re.compile(r"\bc10::str\s*\("),
    "a streaming torch macro": re.compile(
        r"\b(STD_TORCH_CHECK\w*|TORCH_INTERNAL_ASSERT\w*|TORCH_WARN\w*|AT_ERROR|AT_ASSERT\w*"
        r"|TORCH_ERROR_CODE_CHECK)\b"
    ),
}
TORCH_CHECK = re.compile(r"\bTORCH_CHECK\w*\s*\(")
STRING_LITERAL = re.compile(r'"(?:[^"\\\n]|\\.)*"')


def _sources() -> list[str]:
    paths = []
    for ext in ("h", "cpp", "cu", "cuh"):
        paths += glob.glob(os.path.join(CSRC, "**", f"*.{ext}"), recursive=True)
    return sorted(paths)


def _strip_comments(text: str) -> str:
    """The code with // and /* */ comments blanked (newlines kept, so line numbers hold); string
    and character literals are kept as they are."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("".join(ch if ch == "\n" else " " for ch in text[i:j]))
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _call_arguments(code: str, open_paren: int) -> list[str]:
    """The top-level arguments of the call whose '(' is at open_paren."""
    args, depth, start, i = [], 0, open_paren + 1, open_paren
    while i < len(code):
        c = code[i]
        if c in "\"'":
            j = i + 1
            while code[j] != c:
                j += 2 if code[j] == "\\" else 1
            i = j
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                args.append(code[start:i])
                return [a.strip() for a in args]
        elif c == "," and depth == 1:
            args.append(code[start:i])
            start = i + 1
        i += 1
    raise AssertionError(f"unbalanced call at offset {open_paren}")


def message_is_one_string(arguments: list[str]) -> bool:
    """Whether a TORCH_CHECK's arguments are (condition, message) with the message one C string:
    string literals (adjacent ones are one literal), or one call of c_str()."""
    if len(arguments) != 2:
        return False
    message = arguments[1]
    if re.fullmatch(r"(?:[\w.:]+|\(.*\))\s*\.\s*c_str\s*\(\s*\)", message, re.S):
        return True
    return (
        STRING_LITERAL.sub("", message).strip() == "" and STRING_LITERAL.search(message) is not None
    )


def _line(code: str, offset: int) -> int:
    return code.count("\n", 0, offset) + 1


def _torch_checks(code: str):
    for m in TORCH_CHECK.finditer(code):
        yield m, _call_arguments(code, m.end() - 1)


def test_sources_found():
    names = {os.path.relpath(p, CSRC) for p in _sources()}
    assert {"checks.h", "checks.cpp", "ops.cpp", "cpu/token_cpu.cpp"} <= names


def test_no_stream_formatting():
    found = []
    for path in _sources():
        code = _strip_comments(open(path, encoding="utf-8").read())
        for what, pattern in FORBIDDEN.items():
            for m in pattern.finditer(code):
                found.append(f"{os.path.relpath(path, ROOT)}:{_line(code, m.start())}: {what}")
    assert not found, "stream formatting in csrc/ (see this file's docstring):\n" + "\n".join(found)


def test_torch_check_only_in_ops_cpp():
    found = []
    for path in _sources():
        if os.path.relpath(path, CSRC) == CHECKS_ALLOWED_IN:
            continue
        code = _strip_comments(open(path, encoding="utf-8").read())
        for m, _ in _torch_checks(code):
            found.append(f"{os.path.relpath(path, ROOT)}:{_line(code, m.start())}")
    assert not found, (
        "TORCH_CHECK outside csrc/ops.cpp (use checks.h's fail(...) or checks.cpp's checks):\n"
        + "\n".join(found)
    )


def test_ops_cpp_checks_take_one_string():
    path = os.path.join(CSRC, CHECKS_ALLOWED_IN)
    code = _strip_comments(open(path, encoding="utf-8").read())
    calls = list(_torch_checks(code))
    assert calls, "the scan found no TORCH_CHECK in csrc/ops.cpp"
    bad = [
        f"ops.cpp:{_line(code, m.start())}" for m, args in calls if not message_is_one_string(args)
    ]
    assert not bad, (
        "TORCH_CHECK whose message is not one C string (literals, or raise_error's c_str()):\n"
        + "\n".join(bad)
    )


@pytest.mark.parametrize(
    ("call", "ok"),
    [
        ('TORCH_CHECK(n == 7, "takes 7 arguments");', True),
        ('TORCH_CHECK(n == 7, "takes 7 " "arguments, (a, b)");', True),
        ("TORCH_CHECK(false, message.c_str());", True),
        ('TORCH_CHECK(false, ("got " + std::to_string(f(n, 1))).c_str());', True),
        ('TORCH_CHECK(n == 7, "takes 7 arguments, got ", n);', False),
        ('TORCH_CHECK(n == 7, "got " + std::to_string(n));', False),
        ('TORCH_CHECK(n == 7, "got " + name);', False),
        ("TORCH_CHECK(n == 7, message);", False),
        ("TORCH_CHECK(n == 7);", False),
    ],
)
def test_message_rule(call, ok):
    """The rule itself: the streamed forms are caught, the single-string forms pass."""
    code = _strip_comments(call)
    [(_, args)] = list(_torch_checks(code))
    assert message_is_one_string(args) is ok


def test_comments_are_not_code():
    code = _strip_comments('a = "// x"; // std::cout\n/* ostringstream */ b = \'"\';')
    assert '"// x"' in code and "cout" not in code and "ostringstream" not in code
    assert code.count("\n") == 1 and "'\"'" in code
