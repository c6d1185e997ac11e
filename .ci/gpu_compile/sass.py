"""Reads cubins with the CUDA binary tools: per-function resources (`cuobjdump -res-usage`) and SASS
statistics (128-bit global loads / stores, asynchronous copies).

nvdisasm (which `cuobjdump -sass` runs once per cubin) spends ~0.3 s starting up, more than
Triton takes to compile a small kernel; so for Triton's one-kernel cubins the code sections are cut
out of the ELF files, concatenated and disassembled in one raw (`nvdisasm -b SMxx`) run, and the
instructions are attributed back by offset. Stdlib only.
"""

from __future__ import annotations

import bisect
import re
import struct
import subprocess

# An SASS global load / store with its modifiers, e.g. LDG.E.128.CONSTANT, @!P0 STG.E.64.
_GLOBAL_ACCESS = re.compile(r"\b(LDG|STG)((?:\.[A-Z0-9_]+)+)")
# Asynchronous copies: cp.async (LDGSTS, sm_80+) and TMA loads (UTMALDG, sm_90): a software
# pipelined main loop issues them ahead of the loop body that consumes them.
_ASYNC_COPY = re.compile(r"\b(LDGSTS|UTMALDG)\b")
_RESOURCE = re.compile(r"([A-Z_]+(?:\[\d+\])?):(\d+)")
_INSTRUCTION = re.compile(r"/\*([0-9a-f]+)\*/\s+([^;]*);")


def empty_stats() -> dict:
    return dict(ldg=0, stg=0, ldg128=0, stg128=0, async_copies=0)


def count(instruction: str, stats: dict) -> None:
    for op, modifiers in _GLOBAL_ACCESS.findall(instruction):
        key = op.lower()
        stats[key] += 1
        if "128" in modifiers.split("."):
            stats[key + "128"] += 1
    if _ASYNC_COPY.search(instruction):
        stats["async_copies"] += 1


def resources(cuobjdump: str, cubin_path: str, with_sass: bool = False) -> dict[str, dict]:
    """{mangled function name: {regs, stack, static_shared, local} (+ SASS stats if with_sass)}."""
    flags = ["-res-usage", "-sass"] if with_sass else ["-res-usage"]
    text = subprocess.run([cuobjdump, *flags, cubin_path], capture_output=True, text=True, check=True).stdout
    functions: dict[str, dict] = {}
    current = None
    lines = iter(text.splitlines())
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("Function ") and stripped.endswith(":") and " : " not in stripped:
            # " Function NAME:" followed by "  REG:.. STACK:.. SHARED:.. LOCAL:.."
            fields = dict(_RESOURCE.findall(next(lines, "")))
            entry = functions.setdefault(stripped[len("Function ") : -1], empty_stats())
            entry.update(
                regs=int(fields.get("REG", 0)),
                stack=int(fields.get("STACK", 0)),
                static_shared=int(fields.get("SHARED", 0)),
                local=int(fields.get("LOCAL", 0)),
            )
        elif stripped.startswith("Function : "):
            current = functions.setdefault(stripped[len("Function : ") :], empty_stats())
        elif current is not None and (m := _INSTRUCTION.search(stripped)):
            count(m.group(2), current)
    return functions


def code_sections(cubin: bytes) -> dict[str, bytes]:
    """{function name: its machine code} from the `.text.<name>` sections of an ELF64 cubin."""
    if cubin[:4] != b"\x7fELF" or cubin[4] != 2:
        raise ValueError("not an ELF64 cubin")
    (section_headers,) = struct.unpack_from("<Q", cubin, 0x28)
    entry_size, count_, names_index = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", cubin, section_headers + i * entry_size) for i in range(count_)]
    names_offset = sections[names_index][4]

    def name(offset: int) -> str:
        start = names_offset + offset
        return cubin[start : cubin.index(b"\0", start)].decode()

    code = {}
    for name_offset, _type, _flags, _addr, offset, size in sections:
        section = name(name_offset)
        if section.startswith(".text."):
            code[section[len(".text.") :]] = cubin[offset : offset + size]
    return code


def disassemble_many(nvdisasm: str, arch: int, codes: list[bytes]) -> list[dict]:
    """SASS statistics of each machine-code blob (all for the same arch), one nvdisasm run."""
    starts, blob = [], bytearray()
    for code in codes:
        starts.append(len(blob))
        blob += code
    stats = [empty_stats() for _ in codes]
    if not blob:
        return stats
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(blob)
        f.flush()
        name = f"SM{arch}a" if arch >= 90 else f"SM{arch}"
        text = subprocess.run(
            [nvdisasm, "-b", name, f.name], capture_output=True, text=True, check=True
        ).stdout
    for m in _INSTRUCTION.finditer(text):
        index = bisect.bisect_right(starts, int(m.group(1), 16)) - 1
        count(m.group(2), stats[index])
    return stats
