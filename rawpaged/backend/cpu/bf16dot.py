"""The AVX-512 BF16 dot product (vdpbf16ps) for Numba kernels, where the CPU has it.

vdpbf16ps takes 32 bfloat16 of a and of b and adds a[2i] * b[2i] + a[2i+1] * b[2i+1] to float32
lane i of an accumulator: 32 multiply-adds per instruction, twice the float32 FMA rate, the
products exact (8-bit x 8-bit mantissas fit a float32) and summed in float32.

`dot_tile(RT, RO)` makes a Numba intrinsic

    dot_RTxRO(x, t, w, o, n32, out)     x [T, K], w [O, K]: uint16 arrays of bfloat16 bits
        out[r * RO + c] = sum over k < 32 * n32 of x[t + r, k] * w[o + c, k]     (float32)
    dot_tile(4, 4, into=True): the same sums stored at out[t + r, o + c] of a [T, O] float32 out
    dot_tile(1, 1, chains=4): each sum split over 4 accumulators (a batch-1 GEMV's row)

whose loop over k is written here in LLVM IR: RT x RO vector accumulators stay in registers, each
loaded vector of x is used RO times and each of w RT times. Numba has no vector types, and LLVM
does not turn a scalar loop into vdpbf16ps, hence the hand-written IR. HAS_BF16_DOT says whether
this CPU (the one Numba compiles for) has the instruction; without it nothing here is used.
"""
from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from rawpaged.backend.cpu.simd import reduce16


def _host_has_bf16_dot() -> bool:
    try:
        return llvm.get_host_cpu_features().get("avx512bf16", False)
    except Exception:  # pragma: no cover - a platform whose features LLVM cannot read
        return False


HAS_BF16_DOT = _host_has_bf16_dot()


class _BFloat(ir.Type):
    """LLVM's bfloat (llvmlite has no class for it); only ever used inside vectors here."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash("bfloat")


_F32 = ir.FloatType()
_V16F = ir.VectorType(_F32, 16)
_V32BF = ir.VectorType(_BFloat(), 32)
_I64 = ir.IntType(64)


def dot_tile(RT: int, RO: int, into: bool = False, chains: int = 1):
    """The intrinsic computing an RT x RO tile of dot products over the first 32 * n32 of K.
    into=True (a 4 x 4 tile): `out` is y [T, O] float32 itself (unit stride along O: four 4-float
    stores), written at y[t + r, o + c].
    chains > 1: each dot product is summed by `chains` accumulators (32-element chunks i, i +
    chains, ...), added together at the end; the n32 % chains chunks left go to the first.
    NOTE: why: vdpbf16ps into one accumulator waits for the previous one (~6 cycles); a 1 x 1
    tile is one such chain, 16 long at K = 512, and read a decode step's weights at ~0.8 of the
    machine's read rate. Two or four chains let the loads run ahead (bench/RESULTS.md, issue 18)."""
    assert not into or (RT, RO) == (4, 4)
    assert chains >= 1

    @intrinsic
    def dot(typingctx, x, t, w, o, n32, out):
        def codegen(context, builder, sig, args):
            xty, _, wty, _, _, outty = sig.args
            xa = context.make_array(xty)(context, builder, args[0])
            wa = context.make_array(wty)(context, builder, args[2])
            oa = context.make_array(outty)(context, builder, args[5])
            t_, o_, n = args[1], args[3], args[4]
            zero = ir.Constant(_I64, 0)
            xrows = [cgutils.get_item_pointer(context, builder, xty, xa,
                                              [builder.add(t_, ir.Constant(_I64, r)), zero], wraparound=False)
                     for r in range(RT)]
            wrows = [cgutils.get_item_pointer(context, builder, wty, wa,
                                              [builder.add(o_, ir.Constant(_I64, c)), zero], wraparound=False)
                     for c in range(RO)]
            dp = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F, [_V16F, _V32BF, _V32BF]),
                                                "llvm.x86.avx512bf16.dpbf16ps.512")
            reduce = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [_F32, _V16F]),
                                                    "llvm.vector.reduce.fadd.v16f32")
            tiles = range(RT * RO)

            def chunk(accs, k):
                """accs[r * RO + c] + x[t + r, 32k : 32k + 32] . w[o + c, same] (vdpbf16ps each)."""
                off = builder.mul(k, ir.Constant(_I64, 32))
                xs = [builder.load(builder.bitcast(builder.gep(p, [off]), _V32BF.as_pointer()), align=2)
                      for p in xrows]
                ws = [builder.load(builder.bitcast(builder.gep(p, [off]), _V32BF.as_pointer()), align=2)
                      for p in wrows]
                return [builder.call(dp, [accs[r * RO + c], xs[r], ws[c]]) for r in range(RT) for c in range(RO)]

            def counted_loop(name, start, stop, step, init):
                """for i in range(start, stop, step) carrying the vectors `init` (the body: `step`
                chunks, chain j taking chunk i + j) -> the vectors after it (init if it never ran)."""
                pre = builder.block
                loop = builder.append_basic_block(name)
                after = builder.append_basic_block(name + ".after")
                builder.cbranch(builder.icmp_signed("<", start, stop), loop, after)
                builder.position_at_end(loop)
                i = builder.phi(_I64)
                i.add_incoming(start, pre)
                accs = []
                for v in init:
                    a = builder.phi(_V16F)
                    a.add_incoming(v, pre)
                    accs.append(a)
                chained = [accs[j * len(tiles):(j + 1) * len(tiles)] for j in range(len(init) // len(tiles))]
                nxt = []
                for j, part in enumerate(chained):
                    nxt += chunk(part, builder.add(i, ir.Constant(_I64, j)))
                i_next = builder.add(i, ir.Constant(_I64, step))
                end = builder.block
                i.add_incoming(i_next, end)
                for a, v in zip(accs, nxt):
                    a.add_incoming(v, end)
                builder.cbranch(builder.icmp_signed("<", builder.add(i_next, ir.Constant(_I64, step - 1)), stop),
                                loop, after)
                builder.position_at_end(after)
                out = []
                for v0, v in zip(init, nxt):
                    f = builder.phi(_V16F)
                    f.add_incoming(v0, pre)
                    f.add_incoming(v, end)
                    out.append(f)
                return out

            zeros = [ir.Constant(_V16F, None)] * (RT * RO)
            if chains == 1:
                finals = counted_loop("dp.loop", zero, n, 1, zeros)
            else:
                # chunks 0 .. whole * chains - 1 in `chains` interleaved chains, then the rest in one
                whole = builder.mul(builder.sdiv(n, ir.Constant(_I64, chains)), ir.Constant(_I64, chains))
                parts = counted_loop("dp.chains", zero, whole, chains, zeros * chains)
                summed = []
                for idx in tiles:
                    v = parts[idx]
                    for j in range(1, chains):
                        v = builder.fadd(v, parts[j * len(tiles) + idx])
                    summed.append(v)
                finals = counted_loop("dp.rest", whole, n, 1, summed)
            # done: reduce each accumulator (zero when n == 0) into out[r * RO + c]
            if into:                                   # four <4 x float> rows, straight into y
                v = reduce16(builder, finals)
                for r in range(RT):
                    mask = ir.Constant(ir.VectorType(ir.IntType(32), 4), [4 * r + c for c in range(4)])
                    ptr = cgutils.get_item_pointer(context, builder, outty, oa,
                                                   [builder.add(t_, ir.Constant(_I64, r)), o_], wraparound=False)
                    builder.store(builder.shuffle_vector(v, v, mask),
                                  builder.bitcast(ptr, ir.VectorType(_F32, 4).as_pointer()), align=4)
                return context.get_dummy_value()
            if len(finals) == 16:
                # NOTE: 16 accumulators -> ONE vector of their 16 sums (simd.reduce16), stored at
                # once: per 4x4 tile, 45 shuffles and adds instead of 16 reductions of ~8 each and
                # 16 scalar stores, which cost the tile as much as 9 iterations of its loop.
                out0 = cgutils.get_item_pointer(context, builder, outty, oa, [zero], wraparound=False)
                builder.store(reduce16(builder, finals), builder.bitcast(out0, _V16F.as_pointer()), align=4)
                return context.get_dummy_value()
            for idx, v in enumerate(finals):
                s = builder.call(reduce, [ir.Constant(_F32, 0.0), v], fastmath=("reassoc",))   # a tree, not a chain
                ptr = cgutils.get_item_pointer(context, builder, outty, oa, [ir.Constant(_I64, idx)], wraparound=False)
                builder.store(s, ptr)
            return context.get_dummy_value()
        return types.void(x, t, w, o, n32, out), codegen

    return dot
