// arch.cuh: tensor-core and asynchronous-copy instructions (sm_80+), each
// behind one small wrapper function.
//
// The CUDA build emits the PTX instruction. The simulator emulates it with the
// fragment layouts documented in the PTX ISA ("Matrix Fragments for
// mma.m16n8k16", "ldmatrix", "cp.async"), as a warp collective where the PTX
// instruction is warp-wide (.sync.aligned): all 32 lanes must call it.
//
// Layouts, for lane = 4*g + t (g = lane >> 2, t = lane & 3):
//   mma.m16n8k16 A (16x16, row-major), four 32-bit registers of two 16-bit
//     values each (low half first):
//       a[0] = A[g][2t..2t+1]      a[1] = A[g+8][2t..2t+1]
//       a[2] = A[g][2t+8..2t+9]    a[3] = A[g+8][2t+8..2t+9]
//   B (16x8, "col": k-major per column), two registers:
//       b[0] = B[2t..2t+1][g]      b[1] = B[2t+8..2t+9][g]
//   C, D (16x8, f32): c[0] = C[g][2t], c[1] = C[g][2t+1],
//                     c[2] = C[g+8][2t], c[3] = C[g+8][2t+1]
//   ldmatrix.m8n8 .x1/.x2/.x4: lanes 8i..8i+7 give the shared-memory
//     addresses of the 8 rows (16 bytes each) of matrix i; lane receives
//     r[i] = M_i[g][2t..2t+1], or with .trans r[i] = (M_i[2t][g], M_i[2t+1][g]).
#pragma once
#include "common.cuh"

#if defined(GIF_SIM)
namespace gif_arch_sim {

struct MmaIn {
  unsigned a[4];
  unsigned b[2];
  float c[4];
};

template <typename T>
inline void complete_mma_m16n8k16(gif_sim::Arrival* lanes[32], unsigned mask, const char** error) {
  if (mask != 0xffffffffu) {
    *error = "mma.sync needs all 32 lanes (mask 0xffffffff)";
    return;
  }
  float A[16][16], B[16][8], C[16][8];
  auto lo = [](unsigned r) { T v; v.bits = (unsigned short)(r & 0xffffu); return to_float(v); };
  auto hi = [](unsigned r) { T v; v.bits = (unsigned short)(r >> 16); return to_float(v); };
  for (int lane = 0; lane < 32; ++lane) {
    const MmaIn* in = static_cast<const MmaIn*>(lanes[lane]->in);
    int g = lane >> 2, t = lane & 3;
    A[g][2 * t] = lo(in->a[0]);
    A[g][2 * t + 1] = hi(in->a[0]);
    A[g + 8][2 * t] = lo(in->a[1]);
    A[g + 8][2 * t + 1] = hi(in->a[1]);
    A[g][2 * t + 8] = lo(in->a[2]);
    A[g][2 * t + 9] = hi(in->a[2]);
    A[g + 8][2 * t + 8] = lo(in->a[3]);
    A[g + 8][2 * t + 9] = hi(in->a[3]);
    B[2 * t][g] = lo(in->b[0]);
    B[2 * t + 1][g] = hi(in->b[0]);
    B[2 * t + 8][g] = lo(in->b[1]);
    B[2 * t + 9][g] = hi(in->b[1]);
    C[g][2 * t] = in->c[0];
    C[g][2 * t + 1] = in->c[1];
    C[g + 8][2 * t] = in->c[2];
    C[g + 8][2 * t + 1] = in->c[3];
  }
  for (int lane = 0; lane < 32; ++lane) {
    float* d = static_cast<float*>(lanes[lane]->out);
    int g = lane >> 2, t = lane & 3;
    const int rows[4] = {g, g, g + 8, g + 8};
    const int cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int i = 0; i < 4; ++i) {
      // The products of 16-bit inputs are exact in float; the hardware's
      // summation order is unspecified, so any order is as right as this one.
      float acc = C[rows[i]][cols[i]];
      for (int k = 0; k < 16; ++k) acc += A[rows[i]][k] * B[k][cols[i]];
      d[i] = acc;
    }
  }
}

// p0 = number of matrices (1, 2, 4), p1 = transposed.
inline void complete_ldmatrix(gif_sim::Arrival* lanes[32], unsigned mask, const char** error) {
  if (mask != 0xffffffffu) {
    *error = "ldmatrix needs all 32 lanes";
    return;
  }
  const int num = lanes[0]->p0;
  const bool trans = lanes[0]->p1 != 0;
  unsigned short M[4][8][8];
  for (int i = 0; i < num; ++i)
    for (int r = 0; r < 8; ++r) {
      const unsigned char* row = *static_cast<const unsigned char* const*>(lanes[8 * i + r]->in);
      if (reinterpret_cast<unsigned long long>(row) % 16 != 0) {
        *error = "ldmatrix row address is not 16-byte aligned";
        return;
      }
      std::memcpy(M[i][r], row, 16);
    }
  for (int lane = 0; lane < 32; ++lane) {
    unsigned* out = static_cast<unsigned*>(lanes[lane]->out);
    int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < num; ++i) {
      unsigned a = trans ? M[i][2 * t][g] : M[i][g][2 * t];
      unsigned b = trans ? M[i][2 * t + 1][g] : M[i][g][2 * t + 1];
      out[i] = a | (b << 16);
    }
  }
}

}  // namespace gif_arch_sim
#endif

// d = A·B + c for one 16x8x16 tile: T (bf16 or f16) inputs, f32
// accumulators (mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32).
template <typename T>
GIF_DEVICE void mma_m16n8k16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const float (&c)[4]) {
  static_assert(sizeof(T) == 2, "mma_m16n8k16 takes bf16 or f16");
#if defined(GIF_SIM)
  gif_arch_sim::MmaIn in{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}, {c[0], c[1], c[2], c[3]}};
  float out[4];
  gif_sim::warp_collective(0xffffffffu, gif_arch_sim::complete_mma_m16n8k16<T>, "mma.sync.m16n8k16", &in, out, 0, 0,
                           std::source_location::current());
  for (int i = 0; i < 4; ++i) d[i] = out[i];
#else
#define GIF_MMA_ASM(TYPE)                                                                                    \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, " \
               "{%8,%9}, {%10,%11,%12,%13};\n"                                                              \
               : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])                                             \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),     \
                 "f"(c[2]), "f"(c[3]))
  if constexpr (gif_is_bf16<T>::value) {
    GIF_MMA_ASM("bf16");
  } else {
    GIF_MMA_ASM("f16");
  }
#undef GIF_MMA_ASM
#endif
}

#if !defined(GIF_SIM)
GIF_DEVICE unsigned smem_addr(const void* p) {
  unsigned a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}
#endif

// ldmatrix.sync.aligned.m8n8.xN[.trans].shared.b16. `row` is this lane's
// row address in shared memory (16-byte aligned; lanes beyond 8N pass any
// valid address).
template <int N, bool Trans>
GIF_DEVICE void ldmatrix(unsigned (&r)[N], const void* row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
#if defined(GIF_SIM)
  unsigned out[4];
  gif_sim::warp_collective(0xffffffffu, gif_arch_sim::complete_ldmatrix, Trans ? "ldmatrix.trans" : "ldmatrix", &row,
                           out, N, Trans ? 1 : 0, std::source_location::current());
  for (int i = 0; i < N; ++i) r[i] = out[i];
#else
  const unsigned a = smem_addr(row);
  if constexpr (N == 1) {
    if constexpr (Trans)
      asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
    else
      asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
  } else if constexpr (N == 2) {
    if constexpr (Trans)
      asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
    else
      asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  } else {
    if constexpr (Trans)
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                   : "r"(a));
    else
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                   : "r"(a));
  }
#endif
}

// cp.async: copy `Bytes` (4, 8 or 16) from global to shared memory without
// passing through registers. `src_bytes` < Bytes reads only that many and
// fills the rest with zeros (for tile edges; 0 reads nothing).
template <int Bytes>
GIF_DEVICE void cp_async(void* smem_dst, const void* gmem_src, int src_bytes = Bytes) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
#if defined(GIF_SIM)
  gif_sim::cp_async_enqueue(smem_dst, gmem_src, Bytes, src_bytes);
#else
  const unsigned a = smem_addr(smem_dst);
  if constexpr (Bytes == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(gmem_src), "r"(src_bytes));
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(a), "l"(gmem_src), "n"(Bytes),
                 "r"(src_bytes));
#endif
}

// Closes the group of cp.async issued since the last commit.
GIF_DEVICE void cp_async_commit() {
#if defined(GIF_SIM)
  gif_sim::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most `N` of this thread's committed groups are pending.
// Other threads see the data only after a following __syncthreads().
template <int N>
GIF_DEVICE void cp_async_wait() {
#if defined(GIF_SIM)
  gif_sim::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}
