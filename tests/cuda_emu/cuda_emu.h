// cuda_emu: CUDA's execution model on the CPU, for testing kernels with g++.
//
// Compile a kernel source as C++ with this header force-included (g++ -x c++ -include
// cuda_emu.h). Every GPU thread of a block runs as a fiber on the calling OS thread; a fiber
// runs until it reaches a collective (__syncthreads, __syncwarp, __shfl_*_sync) or returns.
// When every thread of the block waits or has exited, the scheduler completes the warp
// collectives whose lanes have all arrived, then the block barrier, and resumes those threads.
// What a GPU would punish throws cuda_emu::Error out of the launch (on the CPU stack, never
// inside a fiber): a collective that names a lane that has exited or does not exist, lanes
// of one warp at different collectives (kind, mask, value type or call site), a barrier that
// some thread of the block never reaches, an invalid launch configuration. Blocks run one
// after another; atomics are plain read-modify-writes (one OS thread), and atomicAdd on a
// type that sm_80 has no atomicAdd for does not compile.
//
// Not emulated: dynamic shared memory, memory fences, __ballot/__any/__all, textures,
// streams (launches run to completion synchronously), out-of-bounds memory checks.
// One launch at a time per process (the built-in variables are globals); include this header
// in one translation unit per library (it defines the fiber switch in assembly).
#pragma once

#if !defined(__x86_64__)
#error "cuda_emu switches fibers with x86-64 assembly"
#endif

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static  // blocks run one after another, so a static is per-block memory

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
constexpr int warpSize = 32;

// The built-in variables of the thread that runs now (set by the scheduler on every switch).
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace cuda_emu {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class Op { kShfl, kShflUp, kShflDown, kShflXor, kSyncwarp, kSyncthreads };

inline const char* op_name(Op op) {
  switch (op) {
    case Op::kShfl: return "__shfl_sync";
    case Op::kShflUp: return "__shfl_up_sync";
    case Op::kShflDown: return "__shfl_down_sync";
    case Op::kShflXor: return "__shfl_xor_sync";
    case Op::kSyncwarp: return "__syncwarp";
    case Op::kSyncthreads: return "__syncthreads";
  }
  return "?";
}

// Where a waiting thread waits, and what it brought.
struct Collective {
  Op op;
  unsigned mask;
  int arg, width;  // srcLane / delta / laneMask, and width, of a shuffle
  const std::type_info* type;
  size_t size;
  const char* file;
  int line;
  unsigned char value[16];
  unsigned char result[16];
};

struct Thread {
  enum State { kRunnable, kWaiting, kExited } state = kRunnable;
  void* sp = nullptr;
  Collective at{};
};

namespace detail {

extern "C" void cuda_emu_switch(void** save_sp, void* load_sp);
// Saves the callee-saved registers on the current stack, stores its pointer in *save_sp,
// switches to load_sp and restores the registers saved there.
asm(R"(
  .text
  .p2align 4
  .globl cuda_emu_switch
  .hidden cuda_emu_switch
  .type cuda_emu_switch, @function
cuda_emu_switch:
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
  .size cuda_emu_switch, .-cuda_emu_switch
)");

struct Block {
  std::vector<Thread> threads;
  const std::function<void()>* body = nullptr;
  void* scheduler_sp = nullptr;
  unsigned current = 0;
  std::string error;  // set by a thread that found a misuse; the scheduler throws it
};

inline Block* g_block = nullptr;

inline std::string where(const Collective& c) {
  return std::string(op_name(c.op)) + " (" + c.file + ":" + std::to_string(c.line) + ")";
}

inline void set_thread_index(unsigned linear) {
  threadIdx = uint3(linear % blockDim.x, linear / blockDim.x % blockDim.y,
                    linear / (blockDim.x * blockDim.y));
}

inline Thread& self() { return g_block->threads[g_block->current]; }

// Leaves the running fiber for the scheduler; returns when the scheduler resumes it.
inline void yield_to_scheduler() {
  cuda_emu_switch(&self().sp, g_block->scheduler_sp);
}

[[noreturn]] inline void fail_in_thread(const std::string& message) {
  g_block->error = message;
  self().state = Thread::kExited;
  yield_to_scheduler();
  __builtin_unreachable();
}

[[noreturn]] inline void fiber_main() {
  try {
    (*g_block->body)();
  } catch (...) {
    g_block->error = "exception thrown by a GPU thread";
  }
  self().state = Thread::kExited;
  yield_to_scheduler();
  __builtin_unreachable();
}

// Fiber stacks, each with a guard page below it.
class Stacks {
 public:
  static constexpr size_t kBytes = 64 << 10;
  explicit Stacks(unsigned count) : page_(static_cast<size_t>(sysconf(_SC_PAGESIZE))) {
    stride_ = kBytes + page_;
    size_ = stride_ * count;
    void* base = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) throw Error("cuda_emu: cannot map fiber stacks");
    base_ = static_cast<char*>(base);
    for (unsigned i = 0; i < count; ++i) mprotect(base_ + i * stride_, page_, PROT_NONE);
  }
  ~Stacks() { munmap(base_, size_); }
  unsigned count() const { return static_cast<unsigned>(size_ / stride_); }
  Stacks(const Stacks&) = delete;
  Stacks& operator=(const Stacks&) = delete;

  // A stack pointer that cuda_emu_switch "returns" into fiber_main with, as if called.
  void* initial_sp(unsigned i) const {
    auto top = reinterpret_cast<uintptr_t>(base_ + (i + 1) * stride_) & ~uintptr_t(15);
    auto* slot = reinterpret_cast<void**>(top);
    *--slot = nullptr;                                            // fiber_main's return address
    *--slot = reinterpret_cast<void*>(&fiber_main);               // where `ret` goes
    for (int r = 0; r < 6; ++r) *--slot = nullptr;                // rbp rbx r12-r15
    return slot;
  }

 private:
  size_t page_, stride_, size_;
  char* base_;
};

inline bool same_collective(const Collective& a, const Collective& b) {
  return a.op == b.op && a.mask == b.mask && a.type == b.type && a.line == b.line &&
         std::strcmp(a.file, b.file) == 0;
}

inline std::string lane_name(unsigned warp, unsigned lane) {
  return "lane " + std::to_string(lane) + " of warp " + std::to_string(warp);
}

inline int source_lane(const Collective& c, int lane) {
  const int base = lane & ~(c.width - 1);
  switch (c.op) {
    case Op::kShfl: return base + (c.arg & (c.width - 1));
    case Op::kShflUp: return lane - c.arg >= base ? lane - c.arg : lane;
    case Op::kShflDown: return lane + c.arg < base + c.width ? lane + c.arg : lane;
    case Op::kShflXor: return (lane ^ c.arg) < base + c.width ? (lane ^ c.arg) : lane;
    default: return lane;
  }
}

// Whether every lane that lane i's collective names waits at that same collective.
inline bool group_arrived(const Thread* t, unsigned lanes, unsigned i) {
  const Collective& c = t[i].at;
  for (unsigned j = 0; j < 32; ++j) {
    if (!(c.mask >> j & 1u)) continue;
    if (j >= lanes || t[j].state != Thread::kWaiting || !same_collective(t[j].at, c)) return false;
  }
  return true;
}

// Hands each lane of lane i's (arrived) collective its result and lets them run on.
inline void complete_group(Thread* t, unsigned warp, unsigned i) {
  const Collective& c = t[i].at;
  for (unsigned j = 0; j < 32; ++j) {
    if (!(c.mask >> j & 1u) || c.op == Op::kSyncwarp) continue;
    const int src = source_lane(t[j].at, static_cast<int>(j));
    if (src < 0 || src >= 32 || !(c.mask >> src & 1u)) {
      throw Error(lane_name(warp, j) + " at " + where(c) + " reads lane " +
                  std::to_string(src) + ", which is not in the mask");
    }
    std::memcpy(t[j].at.result, t[src].at.value, c.size);
  }
  for (unsigned j = 0; j < 32; ++j) {
    if (c.mask >> j & 1u) t[j].state = Thread::kRunnable;
  }
}

// Throws what keeps lane i's collective from completing.
[[noreturn]] inline void diagnose(const Thread* t, unsigned lanes, unsigned count, unsigned warp,
                                  unsigned i) {
  const Collective& c = t[i].at;
  const std::string who = lane_name(warp, i) + " at " + where(c);
  for (unsigned j = 0; j < 32; ++j) {
    if (!(c.mask >> j & 1u)) continue;
    if (j >= lanes) {
      throw Error(who + " names " + lane_name(warp, j) + " in its mask, which does not exist" +
                  " (the block has " + std::to_string(count) + " threads)");
    }
    if (t[j].state == Thread::kExited) {
      throw Error(who + " names " + lane_name(warp, j) + " in its mask, which has exited");
    }
    if (!same_collective(t[j].at, c)) {
      const bool same_place = t[j].at.op == c.op && t[j].at.line == c.line;
      throw Error("lanes of one warp at different collectives: " + who + ", " +
                  lane_name(warp, j) + " at " + where(t[j].at) +
                  (same_place && t[j].at.mask != c.mask ? " with another mask" : "") +
                  (same_place && t[j].at.type != c.type ? " with another value type" : ""));
    }
  }
  throw Error(who + " cannot complete");
}

// Completes every warp collective whose lanes have all arrived. When none has and some lane
// waits at one, that lane can never go on: throws why. Called only when no thread can run.
inline bool complete_warp_collectives(Block& b) {
  const unsigned count = static_cast<unsigned>(b.threads.size());
  bool progressed = false;
  for (unsigned first = 0; first < count; first += 32) {
    Thread* t = &b.threads[first];
    const unsigned lanes = std::min(32u, count - first);
    for (unsigned i = 0; i < lanes; ++i) {
      if (t[i].state != Thread::kWaiting || t[i].at.op == Op::kSyncthreads) continue;
      if (group_arrived(t, lanes, i)) {
        complete_group(t, first / 32, i);
        progressed = true;
      }
    }
  }
  if (progressed) return true;
  for (unsigned first = 0; first < count; first += 32) {
    const Thread* t = &b.threads[first];
    const unsigned lanes = std::min(32u, count - first);
    for (unsigned i = 0; i < lanes; ++i) {
      if (t[i].state == Thread::kWaiting && t[i].at.op != Op::kSyncthreads) {
        diagnose(t, lanes, count, first / 32, i);
      }
    }
  }
  return false;
}

inline void release_barrier(Block& b) {
  for (size_t k = 0; k < b.threads.size(); ++k) {
    if (b.threads[k].state == Thread::kExited) {
      const Thread* waiting = nullptr;
      for (const Thread& t : b.threads) {
        if (t.state == Thread::kWaiting) waiting = &t;
      }
      throw Error("deadlock: thread " + std::to_string(k) + " of the block has exited, so " +
                  where(waiting->at) + " is never reached by the whole block");
    }
  }
  for (Thread& t : b.threads) t.state = Thread::kRunnable;
}

inline void run_block(Block& b, const Stacks& stacks) {
  const unsigned count = static_cast<unsigned>(b.threads.size());
  for (unsigned i = 0; i < count; ++i) b.threads[i] = Thread{Thread::kRunnable, stacks.initial_sp(i), {}};
  for (;;) {
    for (unsigned i = 0; i < count; ++i) {
      if (b.threads[i].state != Thread::kRunnable) continue;
      b.current = i;
      set_thread_index(i);
      cuda_emu_switch(&b.scheduler_sp, b.threads[i].sp);
      if (!b.error.empty()) throw Error(b.error);
    }
    bool any_waiting = false;
    for (const Thread& t : b.threads) any_waiting |= t.state == Thread::kWaiting;
    if (!any_waiting) return;
    if (complete_warp_collectives(b)) continue;
    release_barrier(b);  // every waiting thread is at __syncthreads
  }
}

inline void check_launch(dim3 grid, dim3 block, size_t shared_bytes) {
  const auto bad = [&](const std::string& why) {
    throw Error("invalid launch <<<(" + std::to_string(grid.x) + ", " + std::to_string(grid.y) +
                ", " + std::to_string(grid.z) + "), (" + std::to_string(block.x) + ", " +
                std::to_string(block.y) + ", " + std::to_string(block.z) + ")>>>: " + why);
  };
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) bad("a grid of 0 blocks");
  if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) bad("grid beyond 2^31-1 x 65535 x 65535");
  if (block.x == 0 || block.y == 0 || block.z == 0) bad("a block of 0 threads");
  if (block.x > 1024 || block.y > 1024 || block.z > 64 ||
      static_cast<uint64_t>(block.x) * block.y * block.z > 1024) {
    bad("more than 1024 threads per block (or a dimension beyond 1024 x 1024 x 64)");
  }
  if (shared_bytes != 0) bad("dynamic shared memory is not emulated");
}

}  // namespace detail

// Runs body as a kernel over grid x block; throws Error on a misuse.
inline void run(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body) {
  detail::check_launch(grid, block, shared_bytes);
  gridDim = grid;
  blockDim = block;
  const unsigned count = block.x * block.y * block.z;
  // Kept for the next launches: mapping 1024 guarded stacks costs more than a small launch.
  static std::unique_ptr<detail::Stacks> stacks;
  if (!stacks || stacks->count() < count) stacks = std::make_unique<detail::Stacks>(count);
  detail::Block b;
  b.threads.resize(count);
  b.body = &body;
  detail::g_block = &b;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = uint3(x, y, z);
        detail::run_block(b, *stacks);
      }
    }
  }
  detail::g_block = nullptr;
}

template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t shared_bytes;
  template <typename... Args>
  void operator()(Args&&... args) const {
    const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    run(grid, block, shared_bytes, [&] { std::apply(kernel, params); });
  }
};

template <typename... Params>
Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                         cudaStream_t) {
  return {kernel, grid, block, shared_bytes};
}

namespace detail {

// Waits at a collective until the scheduler completes it; returns the collective's record.
template <typename T>
const Collective& arrive(Op op, unsigned mask, const T& value, int arg, int width,
                         const char* file, int line) {
  static_assert(sizeof(T) <= sizeof(Collective::value), "value too wide for a shuffle");
  Thread& t = self();
  const unsigned lane = (g_block->current) % 32;
  if (op != Op::kSyncthreads) {
    if (!(mask >> lane & 1u)) {
      fail_in_thread(lane_name(g_block->current / 32, lane) + " calls " + op_name(op) + " (" +
                     file + ":" + std::to_string(line) + ") with a mask that leaves it out");
    }
    if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
      fail_in_thread(std::string(op_name(op)) + " (" + file + ":" + std::to_string(line) +
                     "): width " + std::to_string(width) + " is not a power of 2 up to 32");
    }
  }
  t.at = Collective{op, mask, arg, width, &typeid(T), sizeof(T), file, line, {}, {}};
  std::memcpy(t.at.value, &value, sizeof(T));
  t.state = Thread::kWaiting;
  yield_to_scheduler();
  return self().at;
}

template <typename T>
T shuffle(Op op, unsigned mask, T var, int arg, int width, const char* file, int line) {
  static_assert(std::is_arithmetic<T>::value, "warp shuffles take int, float and double types");
  const Collective& c = arrive(op, mask, var, arg, width, file, line);
  T out;
  std::memcpy(&out, c.result, sizeof(T));
  return out;
}

}  // namespace detail
}  // namespace cuda_emu

#define CUDA_EMU_SITE const char* file = __builtin_FILE(), int line = __builtin_LINE()

inline void __syncthreads(CUDA_EMU_SITE) {
  cuda_emu::detail::arrive(cuda_emu::Op::kSyncthreads, 0u, 0, 0, 32, file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, CUDA_EMU_SITE) {
  cuda_emu::detail::arrive(cuda_emu::Op::kSyncwarp, mask, 0, 0, 32, file, line);
}
template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize, CUDA_EMU_SITE) {
  return cuda_emu::detail::shuffle(cuda_emu::Op::kShfl, mask, var, src_lane, width, file, line);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize, CUDA_EMU_SITE) {
  return cuda_emu::detail::shuffle(cuda_emu::Op::kShflUp, mask, var, static_cast<int>(delta),
                                   width, file, line);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize, CUDA_EMU_SITE) {
  return cuda_emu::detail::shuffle(cuda_emu::Op::kShflDown, mask, var, static_cast<int>(delta),
                                   width, file, line);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize, CUDA_EMU_SITE) {
  return cuda_emu::detail::shuffle(cuda_emu::Op::kShflXor, mask, var, lane_mask, width, file,
                                   line);
}

// atomicAdd exists for these types on sm_80 (and __half, __nv_bfloat16 and their pairs,
// which this emulator does not model); one OS thread runs every fiber, so a plain
// read-modify-write is atomic here.
#define CUDA_EMU_ATOMIC_ADD(T)            \
  inline T atomicAdd(T* address, T val) { \
    const T old = *address;               \
    *address = old + val;                 \
    return old;                           \
  }
CUDA_EMU_ATOMIC_ADD(int)
CUDA_EMU_ATOMIC_ADD(unsigned int)
CUDA_EMU_ATOMIC_ADD(unsigned long long)
CUDA_EMU_ATOMIC_ADD(float)
CUDA_EMU_ATOMIC_ADD(double)
#undef CUDA_EMU_ATOMIC_ADD

template <typename T, typename U,
          typename = std::enable_if_t<
              !std::is_same<T, int>::value && !std::is_same<T, unsigned int>::value &&
              !std::is_same<T, unsigned long long>::value && !std::is_same<T, float>::value &&
              !std::is_same<T, double>::value>>
T atomicAdd(T*, U) {
  static_assert(sizeof(T) == 0,
                "cuda_emu: sm_80 has no atomicAdd for this type (it has int, unsigned, "
                "unsigned long long, float, double, __half, __nv_bfloat16 and their pairs)");
  return T();
}
