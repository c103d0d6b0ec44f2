// host_emulation.h: run the CUDA C kernels of this folder on the CPU, for tests only.
//
// With -DRP_HOST_EMULATION, common.cuh includes this header and a .cu file compiles with g++ as
// plain C++: every CUDA thread of a block becomes a fiber (a coroutine with its own stack, switched
// cooperatively on one OS thread), __syncthreads is a barrier of the block's fibers, a warp shuffle
// is a barrier of the warp's 32 fibers around an exchange slot, mma.sync and ldmatrix are computed from
// the 32 lanes' fragments and row addresses exactly as the PTX ISA lays them out, cp.async copies land
// when the issuing thread waits for their group (so a missing wait or barrier reads poison). Blocks
// run one after another, so `__shared__` becomes `static` and the dynamic shared memory is one buffer.
// It is slow and meant for small shapes; it lets the CPU test suite execute the real kernel sources
// (tests/test_cuda_emulation.py). Not shipped to NVRTC: the
// #include of this file sits in an #ifdef that is false there.
#pragma once
#include <math.h>
#include <string.h>
#include <stdint.h>
#include <stdlib.h>
#include <deque>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

struct rp_dim3 { unsigned x, y, z; };
inline rp_dim3 threadIdx = {0, 0, 0};
inline rp_dim3 blockIdx = {0, 0, 0};
inline rp_dim3 blockDim = {1, 1, 1};
inline rp_dim3 gridDim = {1, 1, 1};

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline float __int_as_float(unsigned i) { float f; memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; memcpy(&i, &f, 4); return i; }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline float __expf(float x) { return expf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
template <typename T> inline T __ldg(const T* p) { return *p; }

// IEEE half <-> float, round to nearest even (what cvt.f32.f16 / cvt.rn.f16.f32 do).
inline float rp_emu_half_to_float(unsigned short h) {
    unsigned sign = (unsigned)(h & 0x8000u) << 16;
    int exp = (h >> 10) & 0x1f;
    unsigned mant = h & 0x3ffu, f;
    if (exp == 0) {
        if (mant == 0) {
            f = sign;
        } else {                                   // subnormal: normalise
            int e = -1;
            do { ++e; mant <<= 1; } while (!(mant & 0x400u));
            f = sign | ((unsigned)(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        f = sign | 0x7f800000u | (mant << 13);
    } else {
        f = sign | ((unsigned)(exp - 15 + 127) << 23) | (mant << 13);
    }
    return __uint_as_float(f);
}

inline unsigned short rp_emu_float_to_half(float x) {
    unsigned u = __float_as_uint(x);
    unsigned sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (unsigned short)(sign | 0x7e00u);        // NaN
    if (a >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);       // rounds to infinity
    if (a < 0x38800000u) {                                               // half subnormal or zero
        const float r = nearbyintf(__uint_as_float(a) * 16777216.0f);    // units of 2^-24
        return (unsigned short)(sign | (unsigned)r);
    }
    unsigned h = (a - 0x38000000u) >> 13, rem = a & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
    return (unsigned short)(sign | h);
}

// ---- Fibers: every CUDA thread of a block is a coroutine on one OS thread ----------------------
// A barrier (block or warp) counts arrivals; the last arrival releases the group and continues,
// the others yield to the scheduler until the group's generation changes. A finished thread leaves
// its groups (so a barrier never waits for it).
struct RpGroup { int count, arrived; unsigned gen; };
struct RpFiber { void* sp; char* stack; bool done; int wait_group; unsigned wait_gen; };

inline RpGroup rp_groups[33];                    // [0] = block, [1 + w] = warp w
inline RpFiber* rp_fibers = nullptr;
inline unsigned rp_fiber_cap = 0;
inline int rp_cur = 0;
inline void* rp_sched_sp = nullptr;
constexpr size_t RP_FIBER_STACK = 256 * 1024;

#if defined(__x86_64__)
// rp_ctx_switch(&save_sp, next_sp): push the callee-saved registers, swap stacks, pop, return.
asm(R"(
.text
.globl rp_ctx_switch
.type rp_ctx_switch,@function
rp_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
)");
extern "C" void rp_ctx_switch(void** save_sp, void* next_sp);
#else
#error "the host emulation's fibers are written for x86-64"
#endif

inline void rp_yield() { rp_ctx_switch(&rp_fibers[rp_cur].sp, rp_sched_sp); }

inline void rp_arrive(int gid) {
    RpGroup& g = rp_groups[gid];
    if (++g.arrived >= g.count) { g.arrived = 0; ++g.gen; return; }
    rp_fibers[rp_cur].wait_group = gid;
    rp_fibers[rp_cur].wait_gen = g.gen;
    rp_yield();
}

inline void rp_leave_group(int gid) {
    RpGroup& g = rp_groups[gid];
    --g.count;
    if (g.arrived > 0 && g.arrived >= g.count) { g.arrived = 0; ++g.gen; }
}

inline float rp_warp_vals[32][32];
struct RpMmaSlot { unsigned a[4], b[2]; };
inline RpMmaSlot rp_mma_slots[32][32];
inline unsigned char* rp_dyn_smem = nullptr;

inline void* rp_emu_dyn_smem() { return rp_dyn_smem; }

inline float __shfl_xor_sync(unsigned, float v, int offset) {
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    rp_warp_vals[w][lane] = v;
    rp_arrive(1 + w);
    const float r = rp_warp_vals[w][lane ^ offset];
    rp_arrive(1 + w);
    return r;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D = A B + C from the 32 lanes' fragments.
// Lane L (g = L/4, c = L%4) holds A (g, 2c..2c+1), (g+8, 2c..), (g, 2c+8..), (g+8, 2c+8..);
// B (k 2c..2c+1, n g), (k 2c+8..2c+9, n g); C (g, 2c..2c+1), (g+8, 2c..2c+1).
template <typename Cvt>
inline void rp_emu_mma(float* c, const unsigned* a, const unsigned* b, Cvt cvt) {
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int i = 0; i < 4; ++i) rp_mma_slots[w][lane].a[i] = a[i];
    rp_mma_slots[w][lane].b[0] = b[0];
    rp_mma_slots[w][lane].b[1] = b[1];
    rp_arrive(1 + w);
    float A[16][16], B[16][8];
    for (int L = 0; L < 32; ++L) {
        const int g = L >> 2, cc = 2 * (L & 3);
        const RpMmaSlot& s = rp_mma_slots[w][L];
        const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {cc, cc, cc + 8, cc + 8};
        for (int r = 0; r < 4; ++r) {
            A[rows[r]][cols[r]] = cvt((unsigned short)(s.a[r] & 0xffffu));
            A[rows[r]][cols[r] + 1] = cvt((unsigned short)(s.a[r] >> 16));
        }
        B[cc][g] = cvt((unsigned short)(s.b[0] & 0xffffu));
        B[cc + 1][g] = cvt((unsigned short)(s.b[0] >> 16));
        B[cc + 8][g] = cvt((unsigned short)(s.b[1] & 0xffffu));
        B[cc + 9][g] = cvt((unsigned short)(s.b[1] >> 16));
    }
    const int g = lane >> 2, cc = 2 * (lane & 3);
    for (int e = 0; e < 4; ++e) {
        const int row = e < 2 ? g : g + 8, col = cc + (e & 1);
        float acc = 0.0f;
        for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
        c[e] += acc;
    }
    rp_arrive(1 + w);
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the addresses of the 8 rows
// (16 bytes each) of matrix i; lane L (g = L/4, c = L%4) receives in r[i] row g, elements 2c and 2c+1
// of matrix i, or with .trans column g, elements of rows 2c and 2c+1 (lower index in the low half).
inline const unsigned short* rp_ldm_rows[32][32];

template <bool TRANS>
inline void rp_emu_ldmatrix_x4(unsigned* r, const void* row) {
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    rp_ldm_rows[w][lane] = (const unsigned short*)row;
    rp_arrive(1 + w);
    const int g = lane >> 2, c = lane & 3;
    for (int i = 0; i < 4; ++i) {
        unsigned lo, hi;
        if (TRANS) {
            lo = rp_ldm_rows[w][8 * i + 2 * c][g];
            hi = rp_ldm_rows[w][8 * i + 2 * c + 1][g];
        } else {
            lo = rp_ldm_rows[w][8 * i + g][2 * c];
            hi = rp_ldm_rows[w][8 * i + g][2 * c + 1];
        }
        r[i] = lo | (hi << 16);
    }
    rp_arrive(1 + w);
}

// cp.async (16 bytes global -> shared, zero-filled when !valid) lands late, as on the device, in
// one of two modes (a kernel must be right in both):
//   deferred (default): a thread's copies wait in its commit groups; cp.async.wait_group N completes
//     all but its newest N groups, and what completed becomes visible in shared memory only when
//     that thread next reaches __syncwarp or __syncthreads. A kernel that reads a stage before
//     waiting for it, or without the barrier that publishes the other threads' copies, reads poison.
//   eager (-DRP_EMU_CP_EAGER): every copy lands the moment it is issued, and the scheduler always
//     resumes the lowest runnable thread, so a warp runs as far ahead of the others as barriers let
//     it. A kernel that refills a stage while other warps may still read it (no barrier between the
//     last read and the next issue) overwrites their data.
struct RpCopy { void* dst; const void* src; bool valid; };
inline std::vector<RpCopy> rp_cp_open[1024];                 // issued since the last commit
inline std::deque<std::vector<RpCopy>> rp_cp_groups[1024];   // committed, oldest first
inline std::vector<RpCopy> rp_cp_done[1024];                 // completed, published at the next barrier

inline void rp_cp_land(const RpCopy& c) {
    if (c.valid) memcpy(c.dst, c.src, 16);
    else memset(c.dst, 0, 16);
}
inline void rp_emu_cp_async(void* dst, const void* src, bool valid) {
#ifdef RP_EMU_CP_EAGER
    rp_cp_land(RpCopy{dst, src, valid});
#else
    rp_cp_open[threadIdx.x].push_back(RpCopy{dst, src, valid});
#endif
}
inline void rp_emu_cp_commit() {
    rp_cp_groups[threadIdx.x].push_back(rp_cp_open[threadIdx.x]);
    rp_cp_open[threadIdx.x].clear();
}
inline void rp_emu_cp_wait(int newest_pending) {
    std::deque<std::vector<RpCopy>>& groups = rp_cp_groups[threadIdx.x];
    while ((int)groups.size() > newest_pending) {
        for (const RpCopy& c : groups.front()) rp_cp_done[threadIdx.x].push_back(c);
        groups.pop_front();
    }
}
inline void rp_emu_cp_publish() {
    for (const RpCopy& c : rp_cp_done[threadIdx.x]) rp_cp_land(c);
    rp_cp_done[threadIdx.x].clear();
}
inline void rp_emu_cp_reset(unsigned threads) {
    for (unsigned i = 0; i < threads; ++i) {
        rp_cp_open[i].clear();
        rp_cp_groups[i].clear();
        rp_cp_done[i].clear();
    }
}

// Block and warp barriers (they also publish the arriving thread's completed cp.async copies).
inline void __syncthreads() { rp_emu_cp_publish(); rp_arrive(0); }
inline void __syncwarp(unsigned = 0xffffffffu) { rp_emu_cp_publish(); rp_arrive(1 + (threadIdx.x >> 5)); }

// ---- Harness entry points (called through ctypes by the test) -------------------------------
// The kernel is called through a prototype of 24 integer-class and 8 float arguments: on x86-64
// (System V) integer/pointer and floating-point arguments are assigned to their own register files
// in order, and overflowing integer arguments go to the stack in order, so this matches every kernel
// signature with at most 24 integer-class and 8 float parameters (an int is passed in a 64-bit slot;
// the callee reads the low half).
typedef void (*RpKernelProto)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                              int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                              int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                              float, float, float, float, float, float, float, float);
inline RpKernelProto rp_kernel = nullptr;
inline const int64_t* rp_ia = nullptr;
inline const float* rp_fa = nullptr;

inline void rp_fiber_main() {
    const int64_t* ia = rp_ia;
    const float* fa = rp_fa;
    rp_kernel(ia[0], ia[1], ia[2], ia[3], ia[4], ia[5], ia[6], ia[7], ia[8], ia[9], ia[10], ia[11], ia[12],
              ia[13], ia[14], ia[15], ia[16], ia[17], ia[18], ia[19], ia[20], ia[21], ia[22], ia[23],
              fa[0], fa[1], fa[2], fa[3], fa[4], fa[5], fa[6], fa[7]);
    rp_fibers[rp_cur].done = true;
    rp_leave_group(0);
    rp_leave_group(1 + (rp_cur >> 5));
    rp_yield();                                  // never resumed
}

// Run one block: returns 0, or -1 when every unfinished thread waits on a barrier (deadlock).
inline int rp_run_block(unsigned threads) {
    if (rp_fiber_cap < threads) {
        for (unsigned i = 0; i < rp_fiber_cap; ++i) free(rp_fibers[i].stack);
        free(rp_fibers);
        rp_fibers = (RpFiber*)calloc(threads, sizeof(RpFiber));
        for (unsigned i = 0; i < threads; ++i) rp_fibers[i].stack = (char*)malloc(RP_FIBER_STACK);
        rp_fiber_cap = threads;
    }
    rp_groups[0] = RpGroup{(int)threads, 0, 0};
    for (unsigned w = 0; w < 32; ++w) {
        const int lanes = (int)threads - 32 * (int)w;
        rp_groups[1 + w] = RpGroup{lanes > 32 ? 32 : (lanes > 0 ? lanes : 0), 0, 0};
    }
    for (unsigned i = 0; i < threads; ++i) {
        RpFiber& f = rp_fibers[i];
        f.done = false;
        f.wait_group = -1;
        // Initial frame: six zero callee-saved registers, then the entry as the return address;
        // at entry rsp = top - 8 (16-byte aligned + 8, as after a call).
        uintptr_t top = ((uintptr_t)(f.stack + RP_FIBER_STACK)) & ~(uintptr_t)15;
        void** sp = (void**)top;
        *--sp = nullptr;                         // fake return address of rp_fiber_main
        *--sp = (void*)&rp_fiber_main;
        for (int r = 0; r < 6; ++r) *--sp = nullptr;
        f.sp = sp;
    }
    unsigned live = threads;
    while (live) {
        bool progressed = false;
        for (unsigned i = 0; i < threads; ++i) {
            RpFiber& f = rp_fibers[i];
            if (f.done) continue;
            if (f.wait_group >= 0) {
                if (rp_groups[f.wait_group].gen == f.wait_gen) continue;
                f.wait_group = -1;
            }
            rp_cur = (int)i;
            threadIdx = rp_dim3{i, 0, 0};
            rp_ctx_switch(&rp_sched_sp, f.sp);
            progressed = true;
            if (f.done) --live;
#ifdef RP_EMU_CP_EAGER
            break;                               // start again from thread 0: low warps run ahead
#endif
        }
        if (!progressed) return -1;
    }
    return 0;
}

// Launch `fn` over a grid, blocks one after another. Returns 0, or -1 on a deadlocked block.
extern "C" int rp_emu_launch(void* fn, unsigned gx, unsigned gy, unsigned gz, unsigned threads,
                             unsigned long long smem_bytes, const int64_t* ia, const float* fa) {
    rp_kernel = (RpKernelProto)fn;
    rp_ia = ia;
    rp_fa = fa;
    for (unsigned bz = 0; bz < gz; ++bz)
        for (unsigned by = 0; by < gy; ++by)
            for (unsigned bx = 0; bx < gx; ++bx) {
                blockIdx = rp_dim3{bx, by, bz};
                gridDim = rp_dim3{gx, gy, gz};
                blockDim = rp_dim3{threads, 1, 1};
                free(rp_dyn_smem);
                rp_dyn_smem = (unsigned char*)aligned_alloc(16, (size_t)((smem_bytes + 15) / 16 * 16 + 16));
                memset(rp_dyn_smem, 0xff, (size_t)((smem_bytes + 15) / 16 * 16 + 16));   // NaN: unwritten reads show
                rp_emu_cp_reset(threads);
                if (rp_run_block(threads)) return -1;
            }
    return 0;
}

extern "C" float rp_emu_test_half_roundtrip(float x) { return rp_emu_half_to_float(rp_emu_float_to_half(x)); }
