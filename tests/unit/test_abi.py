"""The C header and its Python mirror agree: sizes, offsets, enums, constants.

A probe generated from agent/abi.py is compiled with gcc against
bpf/include/pe_abi.h and prints what C thinks; a field or constant that
Python has and C lacks fails to compile, one that C has and Python lacks
changes a struct size.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
from pathlib import Path

import pytest

from agent import abi

ROOT = Path(__file__).resolve().parents[2]


def _probe_items() -> list[tuple[str, str]]:
    """(key, C expression) for everything the mirror claims."""
    items: list[tuple[str, str]] = []
    for st in abi.STRUCTS:
        c = f"struct {st._c_name_}"
        items.append((f"sizeof {st._c_name_}", f"sizeof({c})"))
        items += [(f"offsetof {st._c_name_}.{name}", f"offsetof({c}, {name})")
                  for name, *_ in st._fields_]
    for enum, prefix in abi.ENUM_PREFIXES.items():
        items += [(prefix + m.name, prefix + m.name) for m in enum]
    items += [(name, name) for name in abi.C_CONSTANTS]
    items.append(("PE_DROP_REASONS", "PE_DROP_REASONS"))
    items.append(("PE_REDIRECT_REASONS", "PE_REDIRECT_REASONS"))
    return items


def _probe_source() -> str:
    body = []
    for i, (key, expr) in enumerate(_probe_items()):
        sep = "" if i == 0 else ","
        body.append(f'  printf("{sep}\\"{key}\\": %llu", (unsigned long long)({expr}));')
    return "\n".join(["#include <stdio.h>", "#include <stddef.h>", '#include "pe_abi.h"',
                      "int main(void) {", '  printf("{");', *body,
                      '  printf("}\\n");', "  return 0;", "}"])


@pytest.fixture(scope="module")
def c_view(tmp_path_factory) -> dict[str, int]:
    d = tmp_path_factory.mktemp("abi")
    (d / "probe.c").write_text(_probe_source())
    subprocess.run(["gcc", "-std=c11", "-Wall", "-Werror", "-I", str(ROOT / "bpf/include"),
                    "-o", str(d / "probe"), str(d / "probe.c")], check=True)
    out = subprocess.run([str(d / "probe")], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


@pytest.mark.parametrize("st", abi.STRUCTS, ids=lambda s: s._c_name_)
def test_struct_layout(c_view, st):
    assert c_view[f"sizeof {st._c_name_}"] == ctypes.sizeof(st), f"size of {st._c_name_}"
    for name, *_ in st._fields_:
        assert c_view[f"offsetof {st._c_name_}.{name}"] == getattr(st, name).offset, \
            f"{st._c_name_}.{name}"


@pytest.mark.parametrize("enum", list(abi.ENUM_PREFIXES), ids=lambda e: e.__name__)
def test_enum_values(c_view, enum):
    prefix = abi.ENUM_PREFIXES[enum]
    for m in enum:
        assert c_view[f"{prefix}{m.name}"] == m.value, f"{prefix}{m.name}"


def test_constants(c_view):
    for name, value in abi.C_CONSTANTS.items():
        assert c_view[name] == value, name


def test_drop_mask_matches_reason_names(c_view):
    assert c_view["PE_DROP_REASONS"] == abi.DROP_REASONS_MASK
    assert c_view["PE_REDIRECT_REASONS"] == abi.REDIRECT_REASONS_MASK
    assert len(abi.Reason) <= abi.REASON_MAX


@pytest.mark.parametrize("st", list(abi.NUMPY_VIEWS), ids=lambda s: s._c_name_)
def test_numpy_views_match(st):
    dt = abi.NUMPY_VIEWS[st]
    assert dt.itemsize == ctypes.sizeof(st)
    # The first field starts where the struct's does; the rest are packed.
    assert dt.fields[dt.names[0]][1] == getattr(st, st._fields_[0][0]).offset
