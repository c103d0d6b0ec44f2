"""Vector code Numba cannot express, written in LLVM IR (portable: LLVM lowers it to AVX-512,
AVX2 or whatever the CPU has).

`scores16(kind)` makes the Numba intrinsic

    scores16(q, g, k, out, r, o)   q [G, D] float32, k [16, D] (one KV block's keys of one head,
                                   stored as `kind`: float32, or bfloat16 / float16 bits as uint16),
                                   out [R, n] float32;   D a multiple of 16
        out[r, o + j] = sum_d q[g, d] * widen(k[j, d])      for the 16 keys j of the block
    (unchecked: the caller guarantees g < G, r < R and o + 16 <= n)

NOTE: why: a decode token's attention is, per key, one dot product of head_dim elements; written
in Numba, each is vectorised over head_dim and then reduced horizontally (~10 dependent shuffles
and adds per key), which left the decode attention compute-bound at a fraction of the memory's
rate. Here the 16 keys of a block keep 16 vector accumulators over head_dim (one FMA per key per
16 elements), and the 16 horizontal sums are done together by a transpose-reduce tree: 15 vector
adds and 30 shuffles per block, ~3 instructions per key.

`values16(kind)` makes its twin for the values (acc[g] += p[g, o:o+16] @ widen(v), below).

The tree: level 1 pairs accumulators (a, b) -> one vector whose low half holds a's lanes summed
in pairs and whose high half holds b's; each level halves the lanes per key and doubles the keys
per vector, so after 4 levels lane j holds key j's full sum, in order.

NOTE: Numba's on-disk cache keys a kernel by ITS source file (attention.py, gemm.py), not by the
files of the intrinsics it inlines: after editing this file (or bf16dot.py, lowp.py), touch the
kernels' files or clear NUMBA_CACHE_DIR, or the old code keeps running from the cache.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from rawpaged.backend.cpu import lowp

_F32 = ir.FloatType()
_I16, _I32, _I64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)
_V16F = ir.VectorType(_F32, 16)
_EVEN = ir.Constant(ir.VectorType(_I32, 16), [2 * i for i in range(16)])
_ODD = ir.Constant(ir.VectorType(_I32, 16), [2 * i + 1 for i in range(16)])


def _load_wide(builder, ptr, kind):
    """16 stored elements at ptr -> <16 x float>."""
    if kind == lowp.F32:
        return builder.load(builder.bitcast(ptr, _V16F.as_pointer()), align=4)
    if kind == lowp.BF16:
        raw = builder.load(builder.bitcast(ptr, ir.VectorType(_I16, 16).as_pointer()), align=2)
        wide = builder.shl(builder.zext(raw, ir.VectorType(_I32, 16)), ir.Constant(ir.VectorType(_I32, 16), [16] * 16))
        return builder.bitcast(wide, _V16F)
    half = builder.load(builder.bitcast(ptr, ir.VectorType(ir.HalfType(), 16).as_pointer()), align=2)
    return builder.fpext(half, _V16F)


def reduce16(builder, vs):
    """16 <16 x float> -> one whose lane j is the sum of vs[j]'s lanes (the transpose-reduce tree;
    also bf16dot's 4 x 4 GEMM tile)."""
    while len(vs) > 1:
        vs = [builder.fadd(builder.shuffle_vector(a, b, _EVEN), builder.shuffle_vector(a, b, _ODD),
                           flags=("reassoc", "nsz", "contract"))
              for a, b in zip(vs[0::2], vs[1::2])]
    return vs[0]


def scores16(kind: int):
    """The intrinsic for keys stored as `kind` (lowp.F32 / BF16 / F16)."""

    @intrinsic
    def scores(typingctx, q, g, k, out, r, o):
        def codegen(context, builder, sig, args):
            qty, _, kty, outty, _, _ = sig.args
            qa = context.make_array(qty)(context, builder, args[0])
            ka = context.make_array(kty)(context, builder, args[2])
            oa = context.make_array(outty)(context, builder, args[3])
            g_, r_, o_ = args[1], args[4], args[5]
            zero = ir.Constant(_I64, 0)
            D = cgutils.unpack_tuple(builder, qa.shape, 2)[1]
            chunks = builder.sdiv(D, ir.Constant(_I64, 16))
            qrow = cgutils.get_item_pointer(context, builder, qty, qa, [g_, zero], wraparound=False)
            krows = [cgutils.get_item_pointer(context, builder, kty, ka, [ir.Constant(_I64, j), zero],
                                              wraparound=False) for j in range(16)]
            pre = builder.block
            loop = builder.append_basic_block("s16.loop")
            done = builder.append_basic_block("s16.done")
            builder.cbranch(builder.icmp_signed(">", chunks, zero), loop, done)
            # loop: c = 0 .. D/16 - 1; acc[j] += q[g, 16c:16c+16] * k[j, 16c:16c+16]
            builder.position_at_end(loop)
            c = builder.phi(_I64)
            c.add_incoming(zero, pre)
            accs = []
            for _ in range(16):
                a = builder.phi(_V16F)
                a.add_incoming(ir.Constant(_V16F, None), pre)
                accs.append(a)
            off = builder.mul(c, ir.Constant(_I64, 16))
            qv = builder.load(builder.bitcast(builder.gep(qrow, [off]), _V16F.as_pointer()), align=4)
            nxt = []
            for j in range(16):
                kv = _load_wide(builder, builder.gep(krows[j], [off]), kind)
                nxt.append(builder.fadd(accs[j], builder.fmul(qv, kv, flags=("contract",)), flags=("contract",)))
            c_next = builder.add(c, ir.Constant(_I64, 1))
            end = builder.block
            c.add_incoming(c_next, end)
            for a, v in zip(accs, nxt):
                a.add_incoming(v, end)
            builder.cbranch(builder.icmp_signed("<", c_next, chunks), loop, done)
            # done: the 16 sums, stored to out[r, o:o+16]
            builder.position_at_end(done)
            finals = []
            for j in range(16):
                v = builder.phi(_V16F)
                v.add_incoming(ir.Constant(_V16F, None), pre)
                v.add_incoming(nxt[j], end)
                finals.append(v)
            sums = reduce16(builder, finals)
            dst = cgutils.get_item_pointer(context, builder, outty, oa, [r_, o_], wraparound=False)
            builder.store(sums, builder.bitcast(dst, _V16F.as_pointer()), align=4)
            return context.get_dummy_value()
        return types.void(q, g, k, out, r, o), codegen

    return scores


def values16(kind: int):
    """The intrinsic  values16(p, g, o, v, acc)  for values stored as `kind`:

        acc[g, :] += sum_{j < 16} p[g, o + j] * widen(v[j, :])      v [16, D] one block's values,
                                                                    p [G, n], acc [G, D] float32
    NOTE: written in Numba, the loop over keys reads and writes acc[g] once per key; here each
    16-wide chunk of acc[g] is loaded once per block, takes the 16 keys' products in a register
    and is stored once (the 16 weights p are broadcast once per block)."""

    @intrinsic
    def values(typingctx, p, g, o, v, acc):
        def codegen(context, builder, sig, args):
            pty, _, _, vty, accty = sig.args
            pa = context.make_array(pty)(context, builder, args[0])
            va = context.make_array(vty)(context, builder, args[3])
            aa = context.make_array(accty)(context, builder, args[4])
            g_, o_ = args[1], args[2]
            zero = ir.Constant(_I64, 0)
            D = cgutils.unpack_tuple(builder, aa.shape, 2)[1]
            chunks = builder.sdiv(D, ir.Constant(_I64, 16))
            prow = cgutils.get_item_pointer(context, builder, pty, pa, [g_, o_], wraparound=False)
            arow = cgutils.get_item_pointer(context, builder, accty, aa, [g_, zero], wraparound=False)
            vrows = [cgutils.get_item_pointer(context, builder, vty, va, [ir.Constant(_I64, j), zero],
                                              wraparound=False) for j in range(16)]
            splats = []                                 # p[g, o + j] in every lane
            for j in range(16):
                pj = builder.load(builder.gep(prow, [ir.Constant(_I64, j)]))
                splats.append(builder.insert_element(ir.Constant(_V16F, None), pj, ir.Constant(_I32, 0)))
            zeros16 = ir.Constant(ir.VectorType(_I32, 16), [0] * 16)
            splats = [builder.shuffle_vector(s, s, zeros16) for s in splats]
            pre = builder.block
            loop = builder.append_basic_block("v16.loop")
            done = builder.append_basic_block("v16.done")
            builder.cbranch(builder.icmp_signed(">", chunks, zero), loop, done)
            builder.position_at_end(loop)
            c = builder.phi(_I64)
            c.add_incoming(zero, pre)
            off = builder.mul(c, ir.Constant(_I64, 16))
            aptr = builder.bitcast(builder.gep(arow, [off]), _V16F.as_pointer())
            a = builder.load(aptr, align=4)
            for j in range(16):
                vv = _load_wide(builder, builder.gep(vrows[j], [off]), kind)
                a = builder.fadd(a, builder.fmul(splats[j], vv, flags=("contract",)), flags=("contract",))
            builder.store(a, aptr, align=4)
            c_next = builder.add(c, ir.Constant(_I64, 1))
            c.add_incoming(c_next, builder.block)
            builder.cbranch(builder.icmp_signed("<", c_next, chunks), loop, done)
            builder.position_at_end(done)
            return context.get_dummy_value()
        return types.void(p, g, o, v, acc), codegen

    return values


# NOTE: module-level names (not a dict): Numba kernels call them as globals, and the on-disk cache
# finds a kernel again only if what it refers to is importable by name.
SCORES16_F32, SCORES16_BF16, SCORES16_F16 = scores16(lowp.F32), scores16(lowp.BF16), scores16(lowp.F16)
VALUES16_F32, VALUES16_BF16, VALUES16_F16 = values16(lowp.F32), values16(lowp.BF16), values16(lowp.F16)
