"""Print the program NVRTC compiles for one kernels_cuda source: its text (header pasted in) and the
extern "C" entry points generated from the kernel table. For reading the generated wrappers and
for compiling by hand, e.g.

    python -m rawpaged.backend.cuda paged_attention.cu > /tmp/pa.cu
    nvcc -arch=sm_90 -cubin -Xptxas -v /tmp/pa.cu -o /tmp/pa.cubin     # registers, spills per kernel

A dtype tag (f16, bf16, f32) after the source name gives the program the backend builds for that
dtype (paged_attention.cu is compiled per dtype); without one, every instantiation.
"""
from __future__ import annotations

import sys

from kernels_cuda import SOURCES
from rawpaged.backend.cuda.kernels import TAGS, program


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2 or argv[0] not in SOURCES or (len(argv) == 2 and argv[1] not in TAGS):
        print(f"usage: python -m rawpaged.backend.cuda {{{','.join(SOURCES)}}} [{'|'.join(TAGS)}]", file=sys.stderr)
        return 2
    print(program(argv[0], argv[1] if len(argv) == 2 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
