// grouped_gemm.cu: bf16 grouped GEMMs for Mixture-of-Experts (ops/grouped_gemm.h), sm_90a.
//
// Three kernel templates, each over the three layouts; a thread block computes one BM x BN = 128 x 256
// output tile (tn on mma.sync: 128 x 128), looping over the reduction in BK = 64 slices through a
// kStages = 4 deep pipeline in dynamic shared memory (one block per SM).
//   the TMA kernel (default; its own comment block below): a persistent grid, one loader warpgroup
//     issuing cp.async.bulk.tensor into the same swizzled 4-stage ring with full/empty mbarriers, two
//     compute warpgroups on wgmma.m64n256k16 (tn: 128 x 192 tiles on m64n192k16), bf16 outputs staged
//     through shared memory for 16-byte stores. LMF_GROUPED_GEMM_NO_TMA=1 (read once) selects the cp.async kernel below instead.
//   grouped_gemm_wgmma_kernel (cp.async loads by all threads): 2 warpgroups, each 64 rows x 256 columns with
//     wgmma.m64n256k16 reading both operands from shared memory (K-major or M/N-major through the
//     descriptor's transpose bits); 128 f32 accumulators per thread.
//   grouped_gemm_kernel (fallback, GroupedGemmKernel::mma_sync): 8 warps (2 along M x 4 along N) on
//     mma.sync m16n8k16, fed by ldmatrix (K-major tiles) or ldmatrix.trans (M/N-major tiles).
//
//   layout  reduction    A tile in smem            B tile in smem            output
//   nt      K            [BM rows][BK] (K-major)   [BN][BK] (K-major)        bf16 rows of group g
//   nn      K            [BM rows][BK] (K-major)   [BK][BN] (N-major)        bf16 rows of group g
//   tn      rows of g    [BK rows][BM] (M-major)   [BK rows][BN] (N-major)   f32 C[g] tile
//
// Shared-memory layout (swz): every tile row is 8 chunks of 16 bytes (64 bf16); chunk c of row r is
// stored at chunk c ^ (r & 7), and tiles wider than 64 are stored as 64-column blocks one after the
// other. That is the hardware's SWIZZLE_128B layout (tiles start 1024-byte aligned) that wgmma reads,
// and ldmatrix reads it without bank conflicts (8 rows of one logical chunk hit 8 bank groups).
//
// Work assignment: nt/nn launch (ceil(max_rows / BM) + G) * n_tiles blocks (the most row tiles any
// offsets can need: each group adds at most one partial tile); each block reads offsets (into shared
// memory), walks the groups to find its group and row tile, and exits when it has none. tn launches
// (n_tiles, m_tiles, G) blocks; each reduces its tile over all the rows of its group in order.
// Out-of-range rows and columns are zero-filled on load (cp.async src-size 0) and never stored.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cudaTypedefs.h>

#include <cstdint>
#include <cstdlib>

#include "core/check.h"
#include "core/cuda_launch.cuh"
#include "ops/ptx.cuh"
#include "ops/grouped_gemm.h"
#include "ops/packed.cuh"

namespace lmf::cuda {
namespace {

using nv_bf16 = __nv_bfloat16;

constexpr int kThreads = 256;  // 8 warps
constexpr int kBK = 64;        // reduction slice: 128-byte K-major rows
constexpr int kStages = 4;
constexpr int kMaxGroups = 256;

enum class Layout { nt, nn, tn };

// ---------------------------------------------------------------------------------------------
// PTX wrappers
// ---------------------------------------------------------------------------------------------

// (ops/ptx.cuh: smem_u32, cp_async_*, ldmatrix_x4[_trans], mma_bf16)

// wgmma (sm_90a) for the NT layout: both operands K-major in the same 128-byte-swizzled tiles (the
// swizzle above is the hardware's SWIZZLE_128B pattern when a tile starts 1024-byte aligned).
// Shared-memory matrix descriptor: start address, stride of 1024 bytes between 8-row groups,
// SWIZZLE_128B; a k16 step inside the 64-wide slice advances the start address by 32 bytes.
// K-major: 8-row groups 1024 bytes apart (SBO); LBO unused. MN-major (canonical SWIZZLE_128B layout
// ((64, m), (8, k)) : ((1, LBO), (64, SBO)) in elements): 64-wide MN blocks kBlockBytes apart (LBO),
// 8-row K groups 1024 bytes apart (SBO); a k16 step advances the start address by 2048 bytes.
template <bool kMNMajor>
__device__ __forceinline__ uint64_t wgmma_desc_sw128(const void* p) {
  constexpr uint64_t kLbo = kMNMajor ? 64 * 64 * 2 : 16;  // bytes; a 64 x 64 block of an MN-major tile
  const uint64_t addr = smem_u32(p);
  return ((addr & 0x3FFFF) >> 4) | ((kLbo >> 4) << 16) | (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// cp.async writes are generic-proxy writes; wgmma reads through the async proxy.
// fence_proxy_async: ops/ptx.cuh
// Keeps the compiler from moving accumulator accesses across wgmma issue / wait.
template <int N>
__device__ __forceinline__ void fence_acc(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// d (64 x 256 per warpgroup, f32) += A (64 x 16) B (16 x 256), both from shared memory; kTransA /
// kTransB: 0 = K-major operand, 1 = M/N-major operand.
template <int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], uint64_t desc_a, uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, %131, %132;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(desc_a), "l"(desc_b), "r"(1), "n"(kTransA), "n"(kTransB));
}

// The same with N = 192 (96 f32 accumulators per thread): the TN kernel's tile (fuller waves).
template <int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_m64n192k16(float (&d)[96], uint64_t desc_a, uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n192k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}, %96, %97, p, 1, 1, %99, %100;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95])
      : "l"(desc_a), "l"(desc_b), "r"(1), "n"(kTransA), "n"(kTransB));
}
// d += A B for a 64 x BN tile (BN 256 or 192).
template <int BN, int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_m64nBNk16(float (&d)[BN / 2], uint64_t desc_a, uint64_t desc_b) {
  if constexpr (BN == 256) wgmma_m64n256k16<kTransA, kTransB>(d, desc_a, desc_b);
  else wgmma_m64n192k16<kTransA, kTransB>(d, desc_a, desc_b);
}

// Element offset of (row r, column c) in a swizzled kRows x kCols tile. Every tile has 64-element
// (128-byte) rows or 64 rows (kBK): a wider tile is stored as 64-column blocks of kRows x 64, one
// after the other (the layout wgmma expects of an MN-major operand).
template <int kRows>
__device__ __forceinline__ int swz(int r, int c) {
  return (c >> 6) * (kRows * 64) + r * 64 + ((((c >> 3) & 7) ^ (r & 7)) << 3) + (c & 7);
}

// Copies the kRows x kCols tile at (row0, col0) of the row-major global matrix g (leading dimension
// ld) into the swizzled tile s; rows >= row_lim and columns >= col_lim read as zero. col_lim is a
// multiple of 8, so every 16-byte chunk is wholly in or out.
template <int kRows, int kCols, int kN = kThreads>
__device__ __forceinline__ void load_tile(nv_bf16* s, const nv_bf16* g, int64_t ld, int64_t row0, int64_t row_lim,
                                          int64_t col0, int64_t col_lim, int t) {
  constexpr int kChunks = kCols / 8;
  static_assert(kRows * kChunks % kN == 0, "tile chunks must divide over the loading threads");
  static_assert(kCols == 64 || (kRows == 64 && kCols % 64 == 0), "tiles are 64 wide or 64 deep");
#pragma unroll 8
  for (int i = 0; i < kRows * kChunks / kN; ++i) {
    const int idx = t + i * kN;
    const int r = idx / kChunks, c = idx % kChunks;
    const int64_t gr = row0 + r, gc = col0 + c * 8;
    const bool valid = gr < row_lim && gc < col_lim;
    cp_async_16(s + swz<kRows>(r, c * 8), valid ? g + gr * ld + gc : g, valid);
  }
}

struct GemmArgs {
  void* C;
  const nv_bf16* A;
  const nv_bf16* B;
  const int32_t* offsets;
  int G;
  int64_t max_rows;
  int64_t M, N, K;  // nt/nn: M unused (rows come from offsets); tn: K unused (reduction over rows)
  float beta;       // tn only
  int n_tiles;      // ceil(N / BN)
};

// Clamped bounds of group g: a corrupt offsets array cannot make a block read or write out of range.
__device__ __forceinline__ void group_bounds(const GemmArgs& p, const int64_t* off, int g, int64_t& b, int64_t& e) {
  e = min(max(off[g + 1], int64_t{0}), p.max_rows);
  b = min(max(off[g], int64_t{0}), e);
}

// Row layouts (nt, nn): block x covers row tile x / n_tiles of the concatenated groups. Reads offsets
// into s_off (G + 1 entries; a barrier) and returns the tile's group, or -1 when the tile is past
// the last group's rows; m0 = first row of the tile, row_end = end of its group's rows.
template <int BM>
__device__ __forceinline__ int find_row_tile(const GemmArgs& p, int64_t* s_off, int64_t& m0, int64_t& row_end) {
  for (int i = static_cast<int>(threadIdx.x); i <= p.G; i += static_cast<int>(blockDim.x)) s_off[i] = p.offsets[i];
  __syncthreads();
  int64_t t = blockIdx.x / p.n_tiles;
  m0 = 0;
  row_end = 0;
  for (int g = 0; g < p.G; ++g) {
    int64_t b, e;
    group_bounds(p, s_off, g, b, e);
    const int64_t tiles = (e - b + BM - 1) / BM;
    if (t < tiles) {
      m0 = b + t * BM;
      row_end = e;
      return g;
    }
    t -= tiles;
  }
  return -1;
}

// The cp.async kernels' tile (grid as grid_of): its group, first row / column, reduction range, and
// the copy of reduction slice kt into a stage's A and B buffers (zero-filled outside the operands).
template <Layout L, int BM, int BN>
struct CpAsyncTile {
  int64_t m0 = 0, n0 = 0, row_end = 0;  // nt/nn: first row of the tile, end of its group's rows
  int64_t red0 = 0, red_end = 0;        // reduction range: [0, K) or the group's rows
  const nv_bf16* Bg = nullptr;          // the group's B
  int g = -1;

  // Reads the offsets (a barrier); false when the block has no tile (nt/nn: past the last group's rows).
  __device__ __forceinline__ bool init(const GemmArgs& p, int64_t* s_off, int tid) {
    Bg = p.B;
    if constexpr (L == Layout::tn) {
      g = static_cast<int>(blockIdx.z);
      m0 = static_cast<int64_t>(blockIdx.y) * BM;
      n0 = static_cast<int64_t>(blockIdx.x) * BN;
      if (tid < 2) s_off[tid] = p.offsets[g + tid];
      __syncthreads();
      group_bounds(p, s_off, 0, red0, red_end);
      return true;
    } else {
      n0 = static_cast<int64_t>(blockIdx.x % p.n_tiles) * BN;
      g = find_row_tile<BM>(p, s_off, m0, row_end);
      if (g < 0) return false;
      Bg = p.B + static_cast<int64_t>(g) * p.N * p.K;
      red0 = 0;
      red_end = p.K;
      return true;
    }
  }
  __device__ __forceinline__ int k_tiles() const { return static_cast<int>((red_end - red0 + kBK - 1) / kBK); }
  __device__ __forceinline__ void load(const GemmArgs& p, nv_bf16* a, nv_bf16* b, int kt, int tid) const {
    const int64_t k0 = red0 + static_cast<int64_t>(kt) * kBK;
    if constexpr (L == Layout::tn) {
      load_tile<kBK, BM>(a, p.A, p.M, k0, red_end, m0, p.M, tid);
      load_tile<kBK, BN>(b, p.B, p.N, k0, red_end, n0, p.N, tid);
    } else {
      load_tile<BM, kBK>(a, p.A, p.K, m0, row_end, k0, p.K, tid);
      if constexpr (L == Layout::nt)
        load_tile<BN, kBK>(b, Bg, p.K, n0, p.N, k0, p.K, tid);
      else
        load_tile<kBK, BN>(b, Bg, p.N, k0, p.K, n0, p.N, tid);
    }
  }
};

template <Layout L, int BM, int BN>
__global__ void __launch_bounds__(kThreads, 1) grouped_gemm_kernel(GemmArgs p) {
  constexpr bool kAKMajor = L != Layout::tn;
  constexpr bool kBKMajor = L == Layout::nt;
  constexpr int WM = BM / 2, WN = BN / 4;  // warp tile
  constexpr int MI = WM / 16, NJ = WN / 16;
  static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tile must be a multiple of 16 x 16");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  nv_bf16* sA = reinterpret_cast<nv_bf16*>(smem_raw);  // kStages x BM*kBK
  nv_bf16* sB = sA + kStages * BM * kBK;               // kStages x BN*kBK
  __shared__ int64_t s_off[kMaxGroups + 1];

  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int wm0 = (warp >> 2) * WM, wn0 = (warp & 3) * WN;

  CpAsyncTile<L, BM, BN> tile;
  if (!tile.init(p, s_off, tid)) return;  // uniform over the block: no work for this tile
  const int64_t m0 = tile.m0, n0 = tile.n0, row_end = tile.row_end;
  const int g = tile.g, k_tiles = tile.k_tiles();
  auto load_stage = [&](int stage, int kt) { tile.load(p, sA + stage * BM * kBK, sB + stage * BN * kBK, kt, tid); };

  float acc[MI][2 * NJ][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < 2 * NJ; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.0f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // slice kt is visible to all; slice kt-1's buffer is free
    if (kt + kStages - 1 < k_tiles) load_stage((kt + kStages - 1) % kStages, kt + kStages - 1);
    cp_async_commit();

    const nv_bf16* a = sA + (kt % kStages) * BM * kBK;
    const nv_bf16* b = sB + (kt % kStages) * BN * kBK;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t af[MI][4], bfr[NJ][4];
#pragma unroll
      for (int i = 0; i < MI; ++i) {
        if constexpr (kAKMajor) {
          const int r = wm0 + i * 16 + (lane & 15), c = kk + (lane >> 4) * 8;
          ldmatrix_x4(af[i], a + swz<BM>(r, c));
        } else {
          const int r = kk + (lane & 7) + ((lane >> 4) << 3), c = wm0 + i * 16 + ((lane >> 3) & 1) * 8;
          ldmatrix_x4_trans(af[i], a + swz<kBK>(r, c));
        }
      }
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        if constexpr (kBKMajor) {
          const int r = wn0 + j * 16 + (lane & 7) + ((lane >> 4) << 3), c = kk + ((lane >> 3) & 1) * 8;
          ldmatrix_x4(bfr[j], b + swz<BN>(r, c));
        } else {
          const int r = kk + (lane & 7) + ((lane >> 3) & 1) * 8, c = wn0 + j * 16 + (lane >> 4) * 8;
          ldmatrix_x4_trans(bfr[j], b + swz<kBK>(r, c));
        }
      }
#pragma unroll
      for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
          mma_bf16(acc[i][2 * j], af[i], bfr[j][0], bfr[j][1]);
          mma_bf16(acc[i][2 * j + 1], af[i], bfr[j][2], bfr[j][3]);
        }
    }
  }
  cp_async_wait<0>();  // only empty groups can remain; leave nothing in flight at exit

  // Epilogue: each thread owns rows (lane/4, +8) and column pairs ((lane%4)*2, +1) of each 16 x 8 block.
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < 2 * NJ; ++j) {
      const int64_t col = n0 + wn0 + j * 8 + (lane & 3) * 2;
      if (col >= p.N) continue;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = m0 + wm0 + i * 16 + (lane >> 2) + h * 8;
        const float v0 = acc[i][j][2 * h], v1 = acc[i][j][2 * h + 1];
        if constexpr (L == Layout::tn) {
          if (row >= p.M) continue;
          float2* dst = reinterpret_cast<float2*>(static_cast<float*>(p.C) + (static_cast<int64_t>(g) * p.M + row) * p.N + col);
          float2 out = make_float2(v0, v1);
          if (p.beta != 0.0f) {  // beta == 0: C is not read (may hold NaN)
            const float2 old = *dst;
            out.x = p.beta * old.x + v0;
            out.y = p.beta * old.y + v1;
          }
          *dst = out;
        } else {
          if (row >= row_end) continue;
          *reinterpret_cast<__nv_bfloat162*>(static_cast<nv_bf16*>(p.C) + row * p.N + col) =
              __floats2bfloat162_rn(v0, v1);
        }
      }
    }
}

// Stores one warpgroup's m64n256 accumulators (wgmma layout: d[j*4 + h*2 + {0,1}] is row
// (warp%4)*16 + lane/4 + 8h, columns j*8 + (lane%4)*2 + {0,1}); row0/col0: this thread's first
// row and column. nt/nn: bf16 rows < row_end; tn: f32 C[g] rows < M with beta.
template <Layout L, int kAcc>
__device__ __forceinline__ void store_wgmma_tile(const GemmArgs& p, float (&d)[kAcc], int g, int64_t row0,
                                                 int64_t col0, int64_t row_end) {
  if constexpr (L == Layout::tn) {
    // beta == 1: d += C first, in a loop of loads only, so that the loads are all in flight together
    // (interleaved with the stores below, each load waited for the previous store: C might alias).
    if (p.beta != 0.0f) {
#pragma unroll
      for (int j = 0; j < kAcc / 4; ++j) {
        const int64_t col = col0 + j * 8;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t row = row0 + h * 8;
          if (col >= p.N || row >= p.M) continue;
          const float2 old = *reinterpret_cast<const float2*>(static_cast<const float*>(p.C) +
                                                              (static_cast<int64_t>(g) * p.M + row) * p.N + col);
          d[j * 4 + h * 2] = p.beta * old.x + d[j * 4 + h * 2];
          d[j * 4 + h * 2 + 1] = p.beta * old.y + d[j * 4 + h * 2 + 1];
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kAcc / 4; ++j) {
    const int64_t col = col0 + j * 8;
    if (col >= p.N) continue;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = row0 + h * 8;
      const float v0 = d[j * 4 + h * 2], v1 = d[j * 4 + h * 2 + 1];
      if constexpr (L == Layout::tn) {
        if (row >= p.M) continue;
        float2* dst =
            reinterpret_cast<float2*>(static_cast<float*>(p.C) + (static_cast<int64_t>(g) * p.M + row) * p.N + col);
        *dst = make_float2(v0, v1);  // beta C already added above (beta == 0: C is not read, may hold NaN)
      } else {
        if (row >= row_end) continue;
        *reinterpret_cast<__nv_bfloat162*>(static_cast<nv_bf16*>(p.C) + row * p.N + col) =
            __floats2bfloat162_rn(v0, v1);
      }
    }
  }
}

// wgmma (sm_90a) kernel: the same tiles, shared-memory layout, pipeline and work assignment as
// grouped_gemm_kernel with BM = 128, BN = 256, but each of the two warpgroups multiplies its 64 rows
// by the whole 256-column B slice with wgmma.m64n256k16 straight from shared memory (K-major or
// M/N-major operands; accumulators: 128 f32 registers per thread). One wgmma group stays in flight
// while the next slice is waited for, so loads run kStages - 2 slices ahead (the slice being
// overwritten was read by a group that has completed).
constexpr int kWgBM = 128, kWgBN = 256;
constexpr size_t kWgSmem = static_cast<size_t>(kStages) * (kWgBM + kWgBN) * kBK * sizeof(nv_bf16) + 1024;

template <Layout L>
__global__ void __launch_bounds__(kThreads, 1) grouped_gemm_wgmma_kernel(GemmArgs p) {
  constexpr int BM = kWgBM, BN = kWgBN;
  constexpr bool kAKMajor = L != Layout::tn;
  constexpr bool kBKMajor = L == Layout::nt;
  extern __shared__ __align__(1024) unsigned char smem_wg[];
  // SWIZZLE_128B atoms must start 1024-byte aligned (the dynamic base may follow static memory).
  unsigned char* base = smem_wg + ((1024 - (smem_u32(smem_wg) & 1023)) & 1023);
  nv_bf16* sA = reinterpret_cast<nv_bf16*>(base);  // kStages x BM*kBK
  nv_bf16* sB = sA + kStages * BM * kBK;           // kStages x BN*kBK
  __shared__ int64_t s_off[kMaxGroups + 1];

  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2;  // warpgroup: rows [wg * 64, +64) of the tile
  CpAsyncTile<L, BM, BN> tile;
  if (!tile.init(p, s_off, tid)) return;  // uniform over the block: no work for this tile
  const int64_t m0 = tile.m0, n0 = tile.n0, row_end = tile.row_end;
  const int g = tile.g, k_tiles = tile.k_tiles();
  auto load_stage = [&](int stage, int kt) { tile.load(p, sA + stage * BM * kBK, sB + stage * BN * kBK, kt, tid); };

  float d[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) d[i] = 0.0f;

#pragma unroll
  for (int s = 0; s < kStages - 2; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 3>();
    fence_proxy_async();
    __syncthreads();  // slice kt visible to all (and to the async proxy)
    if (kt + kStages - 2 < k_tiles) load_stage((kt + kStages - 2) % kStages, kt + kStages - 2);
    cp_async_commit();

    const int stage = kt % kStages;
    // This warpgroup's 64 rows of A: rows wg*64.. of a K-major tile, or the wg-th 64-column block of
    // an M-major one; both start wg * 64 * kBK elements in.
    const uint64_t da = wgmma_desc_sw128<!kAKMajor>(sA + stage * BM * kBK + wg * 64 * kBK);
    const uint64_t db = wgmma_desc_sw128<!kBKMajor>(sB + stage * BN * kBK);
    // Start address (16-byte units) per k16 step: 32 bytes along a K-major row, 16 rows of 128
    // bytes down an M/N-major block.
    constexpr uint64_t kStepA = kAKMajor ? 2 : 128, kStepB = kBKMajor ? 2 : 128;
    fence_acc(d);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk)
      wgmma_m64n256k16<kAKMajor ? 0 : 1, kBKMajor ? 0 : 1>(d, da + kStepA * kk, db + kStepB * kk);
    wgmma_commit();
    wgmma_wait<1>();
    fence_acc(d);
  }
  wgmma_wait<0>();
  fence_acc(d);
  cp_async_wait<0>();

  store_wgmma_tile<L>(p, d, g, m0 + wg * 64 + (warp & 3) * 16 + (lane >> 2), n0 + (lane & 3) * 2, row_end);
}

template <Layout L, int BM, int BN>
Dim3 grid_of(GemmArgs& a) {
  a.n_tiles = static_cast<int>(ceil_div(a.N, BN));
  if constexpr (L == Layout::tn) return {a.n_tiles, ceil_div(a.M, BM), a.G};
  return {(ceil_div(a.max_rows, BM) + a.G) * a.n_tiles, 1, 1};
}
ShapeText shapes_of(Layout L, const GemmArgs& a) {
  return L == Layout::tn ? shape_text("G=", a.G, " max_rows=", a.max_rows, " M=", a.M, " N=", a.N)
                         : shape_text("G=", a.G, " max_rows=", a.max_rows, " N=", a.N, " K=", a.K);
}

// ---------------------------------------------------------------------------------------------
// TMA + warp-specialized persistent wgmma kernel (the default for GroupedGemmKernel::wgmma).
// 384 threads: warpgroup 0 is the producer (one thread issues cp.async.bulk.tensor loads into a
// kStages deep ring of 128x64 A / 256x64 B slices, completing on "full" mbarriers), warpgroups 1
// and 2 consume (wgmma.m64n256k16 on 64 rows each) and release slices on "empty" mbarriers. The grid
// is persistent (one block per SM); every block walks the same static tile order, so producer and
// consumers agree on the stage/phase sequence and loads of the next tile overlap the epilogue.
// Group boundaries (known only on the device): nt/nn rows of A past the group's end are loaded (a
// neighbouring group's rows, or zeros past max_rows) but only feed output rows that are not stored;
// B is a 3-D tensor map (.., .., G) so N/K tails are zero-filled per group. tn reduces over rows:
// in a group's last, partial slice the consumers zero the rows past the group's end in both tiles
// before the wgmma reads them.
// ---------------------------------------------------------------------------------------------
constexpr int kTmaThreads = 384;
// Tile width: 256 for nt/nn; 192 for tn, whose tiles reduce over a whole group's rows: at the MoE
// layer's shapes (M x N = 3072 x 768 or 768 x 3072, 8 groups) that is 768 tiles, 5.8 waves of 132 SMs,
// instead of 576, 4.4 waves (the last wave a third full).
template <Layout L>
constexpr int kTmaBN = L == Layout::tn ? 192 : kWgBN;
template <int BN>
constexpr int kStageBytes = (kWgBM + BN) * kBK * 2;  // 48 KiB at BN 256
template <int BN>
constexpr size_t kTmaSmem = static_cast<size_t>(kStages) * kStageBytes<BN> + 1024;
constexpr int kEpiStride = 36;  // words per staged epilogue row (32 + 4 padding)

struct TmaMaps {
  CUtensorMap a;
  CUtensorMap b;
};

// mbar_init, mbar_expect_tx, mbar_arrive, mbar_wait: ops/ptx.cuh
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(
          smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(c0), "r"(c1)
      : "memory");
}
__device__ __forceinline__ void tma_load_3d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(
          smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}
__device__ __forceinline__ void named_barrier_sync(int id, int n) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}

struct TileInfo {
  int g;            // group; -1: no work (nt/nn: past the last group's rows)
  int64_t m0, n0;   // first row (nt/nn) / first M column (tn), first N column
  int64_t red0, red_end;  // reduction range: [0, K) or the group's rows
  int64_t row_end;  // nt/nn: end of the group's rows
};

template <Layout L>
__device__ __forceinline__ TileInfo tile_info(const GemmArgs& p, const int64_t* s_off, int64_t t, int m_tiles) {
  TileInfo ti;
  ti.n0 = static_cast<int64_t>(t % p.n_tiles) * kTmaBN<L>;
  int64_t rt = t / p.n_tiles;
  if constexpr (L == Layout::tn) {
    ti.m0 = static_cast<int64_t>(rt % m_tiles) * kWgBM;
    ti.g = static_cast<int>(rt / m_tiles);
    group_bounds(p, s_off, ti.g, ti.red0, ti.red_end);
    ti.row_end = 0;
  } else {
    ti.g = -1;
    ti.m0 = 0;
    ti.row_end = 0;
    ti.red0 = 0;
    ti.red_end = p.K;
    for (int g = 0; g < p.G; ++g) {
      int64_t b, e;
      group_bounds(p, s_off, g, b, e);
      const int64_t tiles = (e - b + kWgBM - 1) / kWgBM;
      if (rt < tiles) {
        ti.g = g;
        ti.m0 = b + rt * kWgBM;
        ti.row_end = e;
        break;
      }
      rt -= tiles;
    }
  }
  return ti;
}

template <Layout L>
__global__ void __launch_bounds__(kTmaThreads, 1)
    grouped_gemm_tma_kernel(GemmArgs p, const __grid_constant__ TmaMaps maps, int64_t total_tiles, int m_tiles) {
  constexpr int BM = kWgBM, BN = kTmaBN<L>;
  constexpr bool kAKMajor = L != Layout::tn;
  constexpr bool kBKMajor = L == Layout::nt;
  extern __shared__ __align__(1024) unsigned char smem_tma[];
  unsigned char* base = smem_tma + ((1024 - (smem_u32(smem_tma) & 1023)) & 1023);
  nv_bf16* sA = reinterpret_cast<nv_bf16*>(base);  // kStages x BM*kBK
  nv_bf16* sB = sA + kStages * BM * kBK;           // kStages x BN*kBK
  __shared__ int64_t s_off[kMaxGroups + 1];
  __shared__ __align__(8) uint64_t full_bar[kStages];
  __shared__ __align__(8) uint64_t empty_bar[kStages];
  // Epilogue staging (nt/nn), per consumer warp: 16 rows x 64 bf16, rows padded to 36 words (no
  // bank conflicts on the 4-byte writes; 16-byte aligned rows for the reads).
  __shared__ __align__(16) uint32_t s_epi[8][16 * kEpiStride];

  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  for (int i = tid; i <= p.G; i += kTmaThreads) s_off[i] = p.offsets[i];
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full_bar[s], 1);
      mbar_init(&empty_bar[s], 256);  // every consumer thread arrives
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (warp < 4) {
    // Producer.
    if (tid != 0) return;
    int stage = 0;
    uint32_t phase = 1;  // the empty barriers' "previous phase" counts as complete
    for (int64_t t = blockIdx.x; t < total_tiles; t += gridDim.x) {
      const TileInfo ti = tile_info<L>(p, s_off, t, m_tiles);
      if (ti.g < 0) break;  // nt/nn: tiles are in row order, so every later tile is empty too
      const int k_tiles = static_cast<int>((ti.red_end - ti.red0 + kBK - 1) / kBK);
      for (int kt = 0; kt < k_tiles; ++kt) {
        mbar_wait(&empty_bar[stage], phase);
        uint64_t* fb = &full_bar[stage];
        mbar_expect_tx(fb, kStageBytes<BN>);
        nv_bf16* a = sA + stage * BM * kBK;
        nv_bf16* b = sB + stage * BN * kBK;
        const int k0 = static_cast<int>(ti.red0 + static_cast<int64_t>(kt) * kBK);
        if constexpr (L == Layout::tn) {
          // A: (rows, M) -> [64 rows][128 m] as two 64x64 blocks; B: [64 rows][256 n] as four.
#pragma unroll
          for (int j = 0; j < BM / 64; ++j) tma_load_2d(a + j * 64 * kBK, &maps.a, fb, static_cast<int>(ti.m0) + j * 64, k0);
#pragma unroll
          for (int j = 0; j < BN / 64; ++j) tma_load_2d(b + j * 64 * kBK, &maps.b, fb, static_cast<int>(ti.n0) + j * 64, k0);
        } else {
          tma_load_2d(a, &maps.a, fb, k0, static_cast<int>(ti.m0));
          if constexpr (L == Layout::nt) {
            tma_load_3d(b, &maps.b, fb, k0, static_cast<int>(ti.n0), ti.g);
          } else {
#pragma unroll
            for (int j = 0; j < BN / 64; ++j)
              tma_load_3d(b + j * 64 * kBK, &maps.b, fb, static_cast<int>(ti.n0) + j * 64, k0, ti.g);
          }
        }
        if (++stage == kStages) {
          stage = 0;
          phase ^= 1;
        }
      }
    }
    return;
  }

  // Consumers: warpgroup cw (0 or 1) owns rows [cw * 64, +64) of the tile.
  const int cw = (warp >> 2) - 1;
  const int ctid = tid - 128;  // 0..255 over both consumer warpgroups
  int stage = 0;
  uint32_t phase = 0;
  float d[BN / 2];
  for (int64_t t = blockIdx.x; t < total_tiles; t += gridDim.x) {
    const TileInfo ti = tile_info<L>(p, s_off, t, m_tiles);
    if (ti.g < 0) break;
    const int k_tiles = static_cast<int>((ti.red_end - ti.red0 + kBK - 1) / kBK);
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) d[i] = 0.0f;
    int prev_stage = -1;
    for (int kt = 0; kt < k_tiles; ++kt) {
      mbar_wait(&full_bar[stage], phase);
      if constexpr (L == Layout::tn) {
        const int64_t valid = ti.red_end - (ti.red0 + static_cast<int64_t>(kt) * kBK);  // rows of the group
        if (valid < kBK) {  // uniform over the consumers: zero rows [valid, 64) of every 64x64 block
          const int v = static_cast<int>(valid);
          const int rows = kBK - v;
          const int blocks = (BM + BN) / 64;  // A's blocks then B's, contiguous only per operand
          for (int i = ctid; i < blocks * rows * 8; i += 256) {
            const int blk = i / (rows * 8), rem = i % (rows * 8);
            const int r = v + rem / 8, c = rem % 8;
            nv_bf16* tile = blk < BM / 64 ? sA + stage * BM * kBK + blk * 64 * kBK
                                          : sB + stage * BN * kBK + (blk - BM / 64) * 64 * kBK;
            *reinterpret_cast<uint4*>(tile + r * 64 + c * 8) = make_uint4(0, 0, 0, 0);
          }
          fence_proxy_async();
          named_barrier_sync(1, 256);
        }
      }
      const uint64_t da = wgmma_desc_sw128<!kAKMajor>(sA + stage * BM * kBK + cw * 64 * kBK);
      const uint64_t db = wgmma_desc_sw128<!kBKMajor>(sB + stage * BN * kBK);
      constexpr uint64_t kStepA = kAKMajor ? 2 : 128, kStepB = kBKMajor ? 2 : 128;
      fence_acc(d);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBK / 16; ++kk)
        wgmma_m64nBNk16<BN, kAKMajor ? 0 : 1, kBKMajor ? 0 : 1>(d, da + kStepA * kk, db + kStepB * kk);
      wgmma_commit();
      wgmma_wait<1>();
      fence_acc(d);
      // The previous slice's wgmma group has completed: hand its stage back to the producer.
      if (prev_stage >= 0) mbar_arrive(&empty_bar[prev_stage]);
      prev_stage = stage;
      if (++stage == kStages) {
        stage = 0;
        phase ^= 1;
      }
    }
    wgmma_wait<0>();
    fence_acc(d);
    if (prev_stage >= 0) mbar_arrive(&empty_bar[prev_stage]);
    if constexpr (L == Layout::tn) {
      store_wgmma_tile<L>(p, d, ti.g, ti.m0 + cw * 64 + (warp & 3) * 16 + (lane >> 2), ti.n0 + (lane & 3) * 2,
                          ti.row_end);
    } else {
      // bf16 rows through this warp's staging buffer, 64 columns at a time: 16-byte stores, each
      // warp store covering 4 rows x 128 contiguous bytes (the fragment layout gives 4-byte pieces).
      uint32_t* buf = s_epi[warp - 4];
      const int64_t wrow0 = ti.m0 + cw * 64 + (warp & 3) * 16;
      nv_bf16* C = static_cast<nv_bf16*>(p.C);
#pragma unroll
      for (int cb = 0; cb < BN / 64; ++cb) {
#pragma unroll
        for (int jj = 0; jj < 8; ++jj)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int j = cb * 8 + jj;
            const __nv_bfloat162 v = __floats2bfloat162_rn(d[j * 4 + h * 2], d[j * 4 + h * 2 + 1]);
            buf[((lane >> 2) + 8 * h) * kEpiStride + jj * 4 + (lane & 3)] = *reinterpret_cast<const uint32_t*>(&v);
          }
        __syncwarp();
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = i * 4 + (lane >> 3), c = lane & 7;
          const uint4 v = *reinterpret_cast<const uint4*>(buf + r * kEpiStride + c * 4);
          const int64_t row = wrow0 + r, col = ti.n0 + cb * 64 + c * 8;
          if (row < ti.row_end && col < p.N) *reinterpret_cast<uint4*>(C + row * p.N + col) = v;
        }
        __syncwarp();
      }
    }
  }
}

// Host: tensor maps (bf16, SWIZZLE_128B, zero fill out of bounds) through the driver entry point.
PFN_cuTensorMapEncodeTiled_v12000 encode_fn(const char* op) {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      f = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  if (fn == nullptr) fail(op, ": cuTensorMapEncodeTiled is not available");
  return fn;
}
// dims/strides innermost first; strides in bytes for dims 1.. (rank - 1 entries).
CUtensorMap make_map(const char* op, const void* ptr, int rank, const uint64_t* dims, const uint64_t* strides,
                     const uint32_t* box) {
  CUtensorMap m;
  cuuint64_t gd[3], gs[2];
  cuuint32_t bx[3], es[3] = {1, 1, 1};
  for (int i = 0; i < rank; ++i) {
    gd[i] = dims[i];
    bx[i] = box[i];
  }
  for (int i = 0; i + 1 < rank; ++i) gs[i] = strides[i];
  const CUresult r = encode_fn(op)(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, static_cast<cuuint32_t>(rank),
                                   const_cast<void*>(ptr), gd, gs, bx, es, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                   CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                   CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) fail(op, ": cuTensorMapEncodeTiled failed (", static_cast<int>(r), ")");
  return m;
}

template <Layout L>
void launch_tma(const char* op, GemmArgs a) {
  constexpr int BN = kTmaBN<L>;
  a.n_tiles = static_cast<int>(ceil_div(a.N, BN));
  TmaMaps maps;
  const uint64_t rows = static_cast<uint64_t>(a.max_rows > 0 ? a.max_rows : 1);
  const uint64_t G = static_cast<uint64_t>(a.G);
  int m_tiles = 0;
  int64_t total;
  if constexpr (L == Layout::tn) {
    m_tiles = static_cast<int>(ceil_div(a.M, kWgBM));
    const uint64_t da[2] = {static_cast<uint64_t>(a.M), rows}, sa[1] = {static_cast<uint64_t>(a.M) * 2};
    const uint64_t db[2] = {static_cast<uint64_t>(a.N), rows}, sb[1] = {static_cast<uint64_t>(a.N) * 2};
    const uint32_t box[2] = {64, 64};
    maps.a = make_map(op, a.A, 2, da, sa, box);
    maps.b = make_map(op, a.B, 2, db, sb, box);
    total = static_cast<int64_t>(a.n_tiles) * m_tiles * a.G;
  } else {
    const uint64_t K = static_cast<uint64_t>(a.K), N = static_cast<uint64_t>(a.N);
    const uint64_t da[2] = {K, rows}, sa[1] = {K * 2};
    const uint32_t boxa[2] = {64, static_cast<uint32_t>(kWgBM)};
    maps.a = make_map(op, a.A, 2, da, sa, boxa);
    if constexpr (L == Layout::nt) {
      const uint64_t db[3] = {K, N, G}, sb[2] = {K * 2, N * K * 2};
      const uint32_t boxb[3] = {64, static_cast<uint32_t>(BN), 1};
      maps.b = make_map(op, a.B, 3, db, sb, boxb);
    } else {
      const uint64_t db[3] = {N, K, G}, sb[2] = {N * 2, K * N * 2};
      const uint32_t boxb[3] = {64, 64, 1};
      maps.b = make_map(op, a.B, 3, db, sb, boxb);
    }
    total = (ceil_div(a.max_rows, kWgBM) + a.G) * a.n_tiles;
  }
  const int sms = cuda_limits().sm_count > 0 ? cuda_limits().sm_count : 132;
  const int64_t blocks = total < sms ? total : sms;
  if (blocks <= 0) return;
  launch({op, shapes_of(L, a), {blocks, 1, 1}, {kTmaThreads, 1, 1}, kTmaSmem<BN>}, grouped_gemm_tma_kernel<L>, a, maps,
         total, m_tiles);
}

GroupedGemmKernel g_kernel = GroupedGemmKernel::wgmma;  // grouped_gemm_set_kernel

// Per layout (nt, nn, tn): the TMA warp-specialized kernel, or the cp.async one.
constexpr bool kUseTma[3] = {true, true, true};
// LMF_GROUPED_GEMM_NO_TMA=1 (read once) selects the cp.async wgmma kernel instead: for comparisons.
bool tma_disabled() {
  static const bool off = [] {
    const char* e = std::getenv("LMF_GROUPED_GEMM_NO_TMA");
    return e != nullptr && e[0] == '1';
  }();
  return off;
}

template <Layout L>
void launch_grouped(const char* op, GemmArgs a) {
  switch (g_kernel) {
    case GroupedGemmKernel::wgmma: {
      if (kUseTma[static_cast<int>(L)] && !tma_disabled()) {
        launch_tma<L>(op, a);
        return;
      }
      const Dim3 grid = grid_of<L, kWgBM, kWgBN>(a);
      launch({op, shapes_of(L, a), grid, {kThreads, 1, 1}, kWgSmem}, grouped_gemm_wgmma_kernel<L>, a);
      return;
    }
    case GroupedGemmKernel::mma_sync: {
      // 128 x 256 tiles for the row layouts; 128 x 128 for tn (twice the blocks: fuller waves).
      constexpr int BN = L == Layout::tn ? 128 : 256;
      constexpr size_t kSmem = static_cast<size_t>(kStages) * (128 + BN) * kBK * sizeof(nv_bf16);
      const Dim3 grid = grid_of<L, 128, BN>(a);
      launch({op, shapes_of(L, a), grid, {kThreads, 1, 1}, kSmem}, grouped_gemm_kernel<L, 128, BN>, a);
      return;
    }
  }
  fail(op, ": unknown kernel choice ", static_cast<int>(g_kernel));
}

void check_common(const char* op, const void* C, const void* A, const void* B, const int32_t* offsets, int G,
                  int64_t max_rows) {
  if (G < 0 || G > kMaxGroups) fail(op, ": G=", G, " must be in [0, ", kMaxGroups, "]");
  if (max_rows < 0) fail(op, ": max_rows=", max_rows, " must be >= 0");
  if (offsets == nullptr) fail(op, ": offsets is null");
  if (!aligned16(C, A, B)) fail(op, ": A, B and C must be 16-byte aligned (A=", A, " B=", B, " C=", C, ")");
}
void check_dim(const char* op, const char* name, int64_t v) {
  if (v <= 0 || v % 8 != 0) fail(op, ": ", name, "=", v, " must be a positive multiple of 8");
}

template <Layout L>
void grouped_rows(const char* op, bf16* C, const bf16* A, const bf16* B, const int32_t* offsets, int G,
                  int64_t max_rows, int64_t N, int64_t K) {
  check_common(op, C, A, B, offsets, G, max_rows);
  check_dim(op, "N", N);
  check_dim(op, "K", K);
  if (G == 0 || max_rows == 0) return;
  launch_grouped<L>(op, {C, as_nv(A), as_nv(B), offsets, G, max_rows, 0, N, K, 0.0f, 0});
}

}  // namespace

void grouped_gemm_set_kernel(GroupedGemmKernel k) { g_kernel = k; }

void grouped_gemm_nt(bf16* C, const bf16* A, const bf16* B, const int32_t* offsets, int G, int64_t max_rows,
                     int64_t N, int64_t K) {
  grouped_rows<Layout::nt>("grouped_gemm_nt", C, A, B, offsets, G, max_rows, N, K);
}

void grouped_gemm_nn(bf16* C, const bf16* A, const bf16* B, const int32_t* offsets, int G, int64_t max_rows,
                     int64_t N, int64_t K) {
  grouped_rows<Layout::nn>("grouped_gemm_nn", C, A, B, offsets, G, max_rows, N, K);
}

void grouped_gemm_tn(float* C, const bf16* A, const bf16* B, const int32_t* offsets, int G, int64_t max_rows,
                     int64_t M, int64_t N, float beta) {
  const char* op = "grouped_gemm_tn";
  check_common(op, C, A, B, offsets, G, max_rows);
  check_dim(op, "M", M);
  check_dim(op, "N", N);
  if (beta != 0.0f && beta != 1.0f) fail(op, ": beta=", beta, " must be 0 or 1");
  if (G == 0) return;
  launch_grouped<Layout::tn>(op, {C, as_nv(A), as_nv(B), offsets, G, max_rows, M, N, 0, beta, 0});
}

}  // namespace lmf::cuda
