// CPU emulator of the CUDA tile kernel (csrc/cuda/relay_kernels.cuh), for tests without a GPU.
//
// Each thread block runs its four phases one after another; within a phase the 256 threads
// run one after another. That is a legal schedule of the real kernel exactly when threads
// exchange data only across barriers, which the shared-memory checker below enforces:
// every 4-byte word remembers who wrote and who read it in which phase, and a read of a
// word another thread wrote in the same phase (or a write to a word another thread wrote
// or read in it), a read of a never-written word, an out-of-range or misaligned access is
// an error. Global accesses must fall inside the op's tensors, and every output element
// must be written exactly once. The op arguments are built by the same functions the
// torch glue uses (relay_launch.h), so the emulator runs exactly the kernel's parameters.
//
// Built by tests/test_cuda_emulation.py with g++ and driven through ctypes (C API below).
#define RELAYDIFF_EMULATE 1

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "../../csrc/cuda/relay_kernels.cuh"

namespace relaydiff {
namespace emu {

struct Word {
  int32_t wtid = -1, wphase = -1;  // last writer
  int32_t rtid = -1, rphase = -1;  // last reader (-2: several threads)
};

struct Range {
  const char* lo;
  const char* hi;
  size_t elem;
};

struct State {
  const char* smem = nullptr;
  size_t smem_bytes = 0;
  std::vector<Word> words;
  int tid = 0, phase = 0;
  std::vector<Range> reads;
  Range out{nullptr, nullptr, 1};
  std::vector<uint8_t> written;  // per output element
};

State g;

[[noreturn]] void fail(const std::string& what, const void* p) {
  throw std::runtime_error(what + " (thread " + std::to_string(g.tid) + ", phase " +
                           std::to_string(g.phase) + ", address offset " +
                           std::to_string(static_cast<const char*>(p) - g.smem) + ")");
}

size_t word_of(const void* p, size_t bytes, size_t align) {
  const char* c = static_cast<const char*>(p);
  if (c < g.smem || c + bytes > g.smem + g.smem_bytes) fail("shared access out of range", p);
  if (reinterpret_cast<uintptr_t>(c) % align != 0) fail("misaligned shared access", p);
  return static_cast<size_t>(c - g.smem) / 4;
}

void shared_read(const void* p, size_t bytes, size_t align) {
  const size_t w0 = word_of(p, bytes, align);
  for (size_t w = w0; w < w0 + (bytes + 3) / 4; ++w) {
    Word& s = g.words[w];
    if (s.wphase < 0) fail("read of uninitialised shared memory", p);
    if (s.wphase == g.phase && s.wtid != g.tid) fail("race: read of a word another thread wrote in this phase", p);
    if (s.rphase == g.phase && s.rtid != g.tid) {
      s.rtid = -2;
    } else if (s.rphase != g.phase) {
      s.rtid = g.tid;
    }
    s.rphase = g.phase;
  }
}

void shared_write(const void* p, size_t bytes, size_t align) {
  const size_t w0 = word_of(p, bytes, align);
  for (size_t w = w0; w < w0 + (bytes + 3) / 4; ++w) {
    Word& s = g.words[w];
    if (s.wphase == g.phase && s.wtid != g.tid) fail("race: two threads write one word in a phase", p);
    if (s.rphase == g.phase && s.rtid != g.tid) fail("race: write of a word another thread read in this phase", p);
    s.wtid = g.tid;
    s.wphase = g.phase;
  }
}

void global_read(const void* p, size_t bytes, size_t align) {
  const char* c = static_cast<const char*>(p);
  if (reinterpret_cast<uintptr_t>(c) % align != 0) throw std::runtime_error("misaligned global load");
  for (const Range& r : g.reads) {
    if (c >= r.lo && c + bytes <= r.hi) return;
  }
  throw std::runtime_error("global load outside every input tensor");
}

void global_write(const void* p, size_t bytes, size_t align) {
  const char* c = static_cast<const char*>(p);
  if (reinterpret_cast<uintptr_t>(c) % align != 0) throw std::runtime_error("misaligned global store");
  if (c < g.out.lo || c + bytes > g.out.hi) throw std::runtime_error("global store outside the output");
  for (size_t e = (c - g.out.lo) / g.out.elem; e < (c + bytes - g.out.lo) / g.out.elem; ++e) {
    if (g.written[e]++) throw std::runtime_error("output element " + std::to_string(e) + " written twice");
  }
}

}  // namespace emu

namespace cuda {

// H100: 227 KB of shared memory per block at most (after cudaFuncSetAttribute)
constexpr size_t kMaxSmem = 227 * 1024;

struct EmuExec {
  using Result = std::string;
  Result fail(const char* what) { return what; }

  template <typename S, int P, Kind K>
  Result run(const TileParams<S, P, K>& prm, int64_t tiles, size_t smem) {
    using T = compute_t<S>;
    if (smem > kMaxSmem) return "shared memory " + std::to_string(smem) + " bytes exceeds the limit";
    if (tiles > kMaxTiles) return "grid too large";
    std::unique_ptr<T[]> buf(new T[smem / sizeof(T) + 4]);
    T* base = buf.get();
    emu::g.smem = reinterpret_cast<const char*>(base);
    emu::g.smem_bytes = smem;
    for (int64_t tile = 0; tile < tiles; ++tile) {
      emu::g.words.assign(smem / 4 + 1, emu::Word{});
      std::fill(reinterpret_cast<unsigned char*>(base), reinterpret_cast<unsigned char*>(base) + smem, 0xFF);
      emu::g.phase = 0;
      const TileKernel<S, P, K> k(prm, tile, base);
      for (int ph = 1; ph <= 4; ++ph) {
        emu::g.phase = static_cast<int>(tile * 4 + ph);
        for (int tid = 0; tid < kThreads; ++tid) {
          emu::g.tid = tid;
          switch (ph) {
            case 1: k.phase1(tid); break;
            case 2: k.phase2(tid); break;
            case 3: k.phase3(tid); break;
            default: k.phase4(tid); break;
          }
        }
      }
    }
    return "";
  }
};

size_t elem_size(DType d) {
  switch (d) {
    case DType::kFloat32: return 4;
    case DType::kFloat64: return 8;
    default: return 2;
  }
}

// The bytes an image view spans (strides are non-negative for torch tensors we pass).
emu::Range span(const ImageRef& r, Shape s, size_t elem) {
  const int64_t sz[4] = {s.B, s.C, s.H, s.W};
  int64_t last = 0;
  for (int d = 0; d < 4; ++d) last += (sz[d] - 1) * r.stride[d];
  const char* lo = static_cast<const char*>(r.data);
  return {lo, lo + (last + 1) * static_cast<int64_t>(elem), elem};
}

// Answers the launcher's shared-memory size instead of running.
struct SizeExec {
  using Result = int64_t;
  Result fail(const char*) { return -1; }
  template <typename S, int P, Kind K>
  Result run(const TileParams<S, P, K>&, int64_t, size_t smem) {
    return static_cast<int64_t>(smem);
  }
};

thread_local std::string last_error;

const char* run_args(const OpArgs& a) {
  try {
    const Shape s{a.B, a.C, a.H, a.W};
    const size_t elem = elem_size(a.dtype);
    emu::g.reads.clear();
    for (int i = 0; i < a.n_in; ++i) emu::g.reads.push_back(span(a.in[i], s, elem));
    for (const double* v : {a.tau, a.tau_next, a.sigma, a.sigma_next, a.noise_src}) {
      if (v != nullptr) {
        const char* lo = reinterpret_cast<const char*>(v);
        emu::g.reads.push_back({lo, lo + a.B * 8, 8});
      }
    }
    const int64_t numel = a.B * a.C * a.H * a.W;
    const char* out = static_cast<const char*>(a.out);
    emu::g.out = {out, out + numel * static_cast<int64_t>(elem), elem};
    emu::g.written.assign(static_cast<size_t>(numel), 0);
    if (numel == 0) return nullptr;  // the glue returns before launching
    EmuExec exec;
    last_error = dispatch(a, exec);
    if (!last_error.empty()) return last_error.c_str();
    for (int64_t e = 0; e < numel; ++e) {
      if (!emu::g.written[e]) {
        last_error = "output element " + std::to_string(e) + " never written";
        return last_error.c_str();
      }
    }
    return nullptr;
  } catch (const std::exception& e) {
    last_error = e.what();
    return last_error.c_str();
  }
}

}  // namespace cuda
}  // namespace relaydiff

using relaydiff::cuda::DType;
using relaydiff::cuda::ImageRef;
using relaydiff::cuda::Shape;
using relaydiff::cuda::run_args;
namespace rc = relaydiff::cuda;

// C API: each returns NULL on success or an error message. `shape` is [B, C, H, W].
extern "C" {

const char* rd_emu_patch_transform(int dtype, const int64_t* shape, ImageRef x, void* out,
                                   int patch_size, int inverse) {
  const Shape s{shape[0], shape[1], shape[2], shape[3]};
  return run_args(rc::transform_args(static_cast<DType>(dtype), s, x, out, patch_size, inverse != 0));
}

const char* rd_emu_patch_blur(int dtype, const int64_t* shape, ImageRef x, void* out,
                              const double* tau, int patch_size, double min_scale) {
  const Shape s{shape[0], shape[1], shape[2], shape[3]};
  return run_args(rc::blur_args(static_cast<DType>(dtype), s, x, out, tau, patch_size, min_scale));
}

const char* rd_emu_block_noise(int dtype, const int64_t* shape, void* out, int block_size,
                               uint64_t seed) {
  const Shape s{shape[0], shape[1], shape[2], shape[3]};
  return run_args(rc::block_noise_args(static_cast<DType>(dtype), s, out, block_size, seed));
}

const char* rd_emu_mixed_noise(int dtype, const int64_t* shape, void* out, double alpha,
                               int block_size, int normalize, uint64_t seed) {
  const Shape s{shape[0], shape[1], shape[2], shape[3]};
  return run_args(rc::mixed_noise_args(static_cast<DType>(dtype), s, out, alpha, block_size,
                                       normalize != 0, seed));
}

const char* rd_emu_relay_corrupt(int dtype, const int64_t* shape, ImageRef x0, void* out,
                                 const double* sigma, const double* tau, int patch_size,
                                 double alpha, int block_size, double min_scale, int normalize,
                                 uint64_t seed) {
  const Shape s{shape[0], shape[1], shape[2], shape[3]};
  return run_args(rc::corrupt_args(static_cast<DType>(dtype), s, x0, out, sigma, tau, patch_size,
                                   alpha, block_size, min_scale, normalize != 0, seed));
}

const char* rd_emu_relay_step(int dtype, const int64_t* shape, ImageRef x, ImageRef denoised,
                              const ImageRef* x_prop, const ImageRef* denoised_prop, void* out,
                              const double* sigma, const double* sigma_next, const double* tau,
                              const double* tau_next, double s_noise, int patch_size,
                              double alpha, int block_size, double min_scale, int normalize,
                              uint64_t seed) {
  const Shape s{shape[0], shape[1], shape[2], shape[3]};
  return run_args(rc::step_args(static_cast<DType>(dtype), s, x, denoised, x_prop, denoised_prop,
                                out, sigma, sigma_next, tau, tau_next, s_noise, patch_size, alpha,
                                block_size, min_scale, normalize != 0, seed));
}

// Shared-memory bytes of an op's kernel (the launcher's number): for the size checks.
int64_t rd_emu_smem_bytes(int dtype, int kind, int patch_size, int step, int block_size) {
  rc::OpArgs a = rc::base_args(static_cast<rc::Kind>(kind), static_cast<DType>(dtype),
                               Shape{1, 1, 16, 16}, nullptr);
  a.patch_size = patch_size;
  a.step = step;
  a.n_in = step ? 4 : 1;
  a.noise_mul = 1.0;
  rc::set_noise(a, 0.5, block_size, true, 0);
  rc::SizeExec exec;
  return rc::dispatch(a, exec);
}

}  // extern "C"
