"""Repair the signatures of the generated `tensorrt-stubs` that are not valid Python, so mypy can read the stubs.

The stubs are generated from TensorRT's pybind11 module, whose signatures Python itself would refuse in two ways:
a parameter named after a keyword (`in`, in four plugin methods) and a required parameter after parameters with
defaults (`INetworkDefinition.add_scale_nd(..., power=None, channel_axis)`). mypy stops at the first syntax error
before it checks anything, so each `.pyi` under the folder given is parsed with `ast`; every `def` line that does not
parse is rewritten, printed, and the file parsed again, until it parses:

- a parameter named after a keyword gets a trailing underscore (`in` → `in_`), a valid name for the same position;
- parameters with a default that precede a required one lose their default (the stricter reading: a call that
  leaves them out is flagged, a call that passes them is accepted).

Nothing else is touched; a syntax error that is not one of these stops the script, naming it.
Usage: python scripts/repair_trt_stubs.py STUBS_DIR
"""

from __future__ import annotations

import ast
import keyword
import re
import sys
from pathlib import Path

DEF = re.compile(r"^(?P<head>\s*(?:async\s+)?def\s+\w+\()(?P<params>.*)(?P<tail>\)\s*(?:->.*)?:.*)$")


def split_top_level(text: str) -> list[str]:
    """Split a parameter list at the commas outside brackets and strings."""
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()]


def parse_param(part: str) -> ast.arguments:
    """One parameter (`name: annotation = default`) as `ast.arguments`."""
    function = ast.parse(f"def _({part}): ...").body[0]
    assert isinstance(function, ast.FunctionDef)
    return function.args


def repair_params(params: str) -> str:
    """The parameter list made valid: keyword names renamed, defaults before a required parameter dropped."""
    fixed = []
    for part in split_top_level(params):
        name = re.match(r"\**(\w+)", part)
        if name and keyword.iskeyword(name.group(1)):
            part = part.replace(name.group(1), name.group(1) + "_", 1)
        fixed.append(part)
    positional = []  # the parameters that may be passed by position, up to `*` or `*args`
    for i, part in enumerate(fixed):
        if part.startswith("*"):
            break
        if part != "/":
            positional.append(i)
    required = [i for i in positional if not parse_param(fixed[i]).defaults]
    for i in positional:
        if required and i < required[-1]:
            defaults = parse_param(fixed[i]).defaults
            if defaults:  # cut at the `=` before the default
                fixed[i] = fixed[i][: defaults[0].col_offset - len("def _(")].rstrip().rstrip("=").rstrip()
    return ", ".join(fixed)


def repair_file(path: Path) -> list[str]:
    """Rewrite the signatures of `path` that do not parse; returns a line per rewrite."""
    lines = path.read_bytes().decode().splitlines(keepends=True)  # keeps the stubs' CRLF line ends
    done: list[str] = []
    while True:
        try:
            ast.parse("".join(lines), filename=str(path))
            break
        except SyntaxError as error:
            number = error.lineno or 0
            line = lines[number - 1] if 0 < number <= len(lines) else ""
            text = line.rstrip("\r\n")
            match = DEF.match(text)
            repaired = match and match["head"] + repair_params(match["params"]) + match["tail"] + line[len(text):]
            if not repaired or repaired == line:
                raise SystemExit(f"{path}:{number}: {error.msg}; not a signature this script knows how to repair")
            lines[number - 1] = repaired
            done.append(f"{path}:{number}: {error.msg}\n  - {line.strip()}\n  + {repaired.strip()}")
    if done:
        path.write_bytes("".join(lines).encode())
    return done


def main(root: str) -> None:
    files = sorted(Path(root).rglob("*.pyi"))
    if not files:
        raise SystemExit(f"no .pyi files under {root}")
    rewrites = [line for path in files for line in repair_file(path)]
    for line in rewrites:
        print(f"repaired {line}")
    print(f"{len(rewrites)} signature(s) repaired in {len(files)} stub file(s) under {root}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
