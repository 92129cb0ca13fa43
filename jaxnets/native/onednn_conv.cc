// 2-D float32 convolutions through oneDNN, as XLA FFI handlers for jaxnets.onednn.
//
// Layouts are JAX's canonical ones (x NHWC, kernel HWIO, y NHWC), so no transposes are
// needed on the JAX side; the kernel is reordered into the blocked layout oneDNN's
// implementation asks for on every call (it is small next to the activations). Padding is
// explicit (low, high) per spatial dimension; dilation is JAX's (1 = none). One group only.
// The *Bias targets add a bias (O,) inside the forward primitive and return its gradient
// from the kernel-gradient one (jaxnets.onednn says why).
//
// Primitives are cached by shape and settings (creating one costs tens of microseconds,
// comparable to a small convolution); calls run one at a time (run() says why), each with
// its own scratchpad.
#include <cstdint>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow;
  int64_t sh, sw, pt, pb, pl, pr, dh, dw;
  bool bias = false;
  auto key() const {
    return std::make_tuple(n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr, dh, dw, bias);
  }
  memory::desc x(tag t = tag::nhwc) const { return {{n, c, h, w}, dt::f32, t}; }
  memory::desc y(tag t = tag::nhwc) const { return {{n, o, oh, ow}, dt::f32, t}; }
  memory::desc k(tag t = tag::hwio) const { return {{o, c, kh, kw}, dt::f32, t}; }
  memory::desc b() const { return bias ? memory::desc({o}, dt::f32, tag::a) : memory::desc(); }
  memory::dims strides() const { return {sh, sw}; }
  memory::dims dilates() const { return {dh - 1, dw - 1}; }  // oneDNN counts the gaps
  memory::dims pad_l() const { return {pt, pl}; }
  memory::dims pad_r() const { return {pb, pr}; }
};

dnnl::primitive_attr user_scratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc forward_pd(const Geometry& g) {
#if DNNL_VERSION_MAJOR >= 3
  return {cpu_engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
          g.x(), g.k(tag::any), g.b(), g.y(), g.strides(), g.dilates(), g.pad_l(), g.pad_r(),
          user_scratchpad()};
#else
  dnnl::convolution_forward::desc d(dnnl::prop_kind::forward_training,
                                    dnnl::algorithm::convolution_direct, g.x(), g.k(tag::any),
                                    g.b(), g.y(), g.strides(), g.dilates(), g.pad_l(),
                                    g.pad_r());
  return {d, user_scratchpad(), cpu_engine()};
#endif
}

// One cached primitive and the kernel layout it wants.
struct Cached {
  dnnl::primitive prim;
  memory::desc kernel;   // the primitive's kernel (or kernel-gradient) layout
  memory::desc scratch;
};

template <typename Make>
const Cached& cached(int which, const Geometry& g, Make make) {
  static std::mutex mu;
  static std::map<std::tuple<int, decltype(g.key())>, std::unique_ptr<Cached>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[{which, g.key()}];
  if (!slot) slot = std::make_unique<Cached>(make());
  return *slot;
}

// Runs `prim` with the kernel (or its gradient) at `user_kernel` in HWIO, reordering through
// a blocked buffer when the primitive's layout differs. `kernel_is_output`: backward weights.
void run(const Cached& c, const Geometry& g, std::unordered_map<int, memory> args,
         void* user_kernel, bool kernel_is_output) {
  // One call at a time: XLA runs independent calls (a conv's kernel gradient beside its
  // projection's) on two of its threads at once, and each would start an OpenMP team over
  // all the cores. Measured on a 2-core EPYC, ResNet's scanned training step: the two
  // stride-2 kernel gradients took 5.5 ms each concurrently against 0.08 ms alone.
  static std::mutex one_at_a_time;
  std::lock_guard<std::mutex> lock(one_at_a_time);
  auto& engine = cpu_engine();
  dnnl::stream stream(engine);
  memory user(g.k(), engine, user_kernel);
  std::vector<uint8_t> blocked_buf, scratch_buf(c.scratch.get_size());
  memory kernel = user;
  bool reorder = c.kernel != user.get_desc();
  if (reorder) {
    blocked_buf.resize(c.kernel.get_size());
    kernel = memory(c.kernel, engine, blocked_buf.data());
    if (!kernel_is_output) dnnl::reorder(user, kernel).execute(stream, user, kernel);
  }
  args[kernel_is_output ? DNNL_ARG_DIFF_WEIGHTS : DNNL_ARG_WEIGHTS] = kernel;
  args[DNNL_ARG_SCRATCHPAD] = memory(c.scratch, engine, scratch_buf.data());
  c.prim.execute(stream, args);
  if (reorder && kernel_is_output) dnnl::reorder(kernel, user).execute(stream, kernel, user);
  stream.wait();
}

Geometry geometry(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> kd,
                  ffi::Span<const int64_t> yd, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                  int64_t pl, int64_t pr, int64_t dh, int64_t dw) {
  return {xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], kd[3], yd[1], yd[2],
          sh, sw, pt, pb, pl, pr, dh, dw};
}

std::string error_text(const std::exception& e) {
  return std::string("oneDNN convolution: ") + e.what();
}

// y = x * k (+ b): `b` null for the targets without a bias.
ffi::Error RunForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k, const float* b,
                      ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                      int64_t pb, int64_t pl, int64_t pr, int64_t dh, int64_t dw) {
  try {
    Geometry g = geometry(x.dimensions(), k.dimensions(), y->dimensions(), sh, sw, pt, pb,
                          pl, pr, dh, dw);
    g.bias = b != nullptr;
    const Cached& c = cached(0, g, [&] {
      auto pd = forward_pd(g);
      return Cached{dnnl::convolution_forward(pd), pd.weights_desc(), pd.scratchpad_desc()};
    });
    auto& e = cpu_engine();
    std::unordered_map<int, memory> args{{DNNL_ARG_SRC, memory(g.x(), e, x.typed_data())},
                                         {DNNL_ARG_DST, memory(g.y(), e, y->typed_data())}};
    if (b) args[DNNL_ARG_BIAS] = memory(g.b(), e, const_cast<float*>(b));
    run(c, g, std::move(args), k.typed_data(), false);
  } catch (const std::exception& e) {  // dnnl::error, std::bad_alloc: never past the C ABI
    return ffi::Error(ffi::ErrorCode::kInternal, error_text(e));
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                   ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                   int64_t pb, int64_t pl, int64_t pr, int64_t dh, int64_t dw) {
  return RunForward(x, k, nullptr, y, sh, sw, pt, pb, pl, pr, dh, dw);
}

ffi::Error ForwardBias(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                       ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> y, int64_t sh,
                       int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t dh,
                       int64_t dw) {
  return RunForward(x, k, b.typed_data(), y, sh, sw, pt, pb, pl, pr, dh, dw);
}

ffi::Error BackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> k,
                        ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t pt,
                        int64_t pb, int64_t pl, int64_t pr, int64_t dh, int64_t dw) {
  try {
    Geometry g = geometry(dx->dimensions(), k.dimensions(), dy.dimensions(), sh, sw, pt, pb,
                          pl, pr, dh, dw);
    const Cached& c = cached(1, g, [&] {
#if DNNL_VERSION_MAJOR >= 3
      dnnl::convolution_backward_data::primitive_desc pd(
          cpu_engine(), dnnl::algorithm::convolution_direct, g.x(), g.k(tag::any), g.y(),
          g.strides(), g.dilates(), g.pad_l(), g.pad_r(), forward_pd(g), user_scratchpad());
#else
      dnnl::convolution_backward_data::desc d(dnnl::algorithm::convolution_direct, g.x(),
                                              g.k(tag::any), g.y(), g.strides(), g.dilates(),
                                              g.pad_l(), g.pad_r());
      dnnl::convolution_backward_data::primitive_desc pd(d, user_scratchpad(), cpu_engine(),
                                                         forward_pd(g));
#endif
      return Cached{dnnl::convolution_backward_data(pd), pd.weights_desc(),
                    pd.scratchpad_desc()};
    });
    auto& e = cpu_engine();
    run(c, g, {{DNNL_ARG_DIFF_DST, memory(g.y(), e, dy.typed_data())},
               {DNNL_ARG_DIFF_SRC, memory(g.x(), e, dx->typed_data())}},
        k.typed_data(), false);
  } catch (const std::exception& e) {  // dnnl::error, std::bad_alloc: never past the C ABI
    return ffi::Error(ffi::ErrorCode::kInternal, error_text(e));
  }
  return ffi::Error::Success();
}

// dk (and db, when `db` is not null) from x and dy.
ffi::Error RunBackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                              ffi::ResultBuffer<ffi::F32> dk, float* db, int64_t sh,
                              int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                              int64_t dh, int64_t dw) {
  try {
    Geometry g = geometry(x.dimensions(), dk->dimensions(), dy.dimensions(), sh, sw, pt, pb,
                          pl, pr, dh, dw);
    g.bias = db != nullptr;
    const Cached& c = cached(2, g, [&] {
#if DNNL_VERSION_MAJOR >= 3
      dnnl::convolution_backward_weights::primitive_desc pd(
          cpu_engine(), dnnl::algorithm::convolution_direct, g.x(), g.k(tag::any), g.b(),
          g.y(), g.strides(), g.dilates(), g.pad_l(), g.pad_r(), forward_pd(g),
          user_scratchpad());
#else
      dnnl::convolution_backward_weights::desc d(dnnl::algorithm::convolution_direct, g.x(),
                                                 g.k(tag::any), g.b(), g.y(), g.strides(),
                                                 g.dilates(), g.pad_l(), g.pad_r());
      dnnl::convolution_backward_weights::primitive_desc pd(d, user_scratchpad(),
                                                            cpu_engine(), forward_pd(g));
#endif
      return Cached{dnnl::convolution_backward_weights(pd), pd.diff_weights_desc(),
                    pd.scratchpad_desc()};
    });
    auto& e = cpu_engine();
    std::unordered_map<int, memory> args{{DNNL_ARG_SRC, memory(g.x(), e, x.typed_data())},
                                         {DNNL_ARG_DIFF_DST, memory(g.y(), e, dy.typed_data())}};
    if (db) args[DNNL_ARG_DIFF_BIAS] = memory(g.b(), e, db);
    run(c, g, std::move(args), dk->typed_data(), true);
  } catch (const std::exception& e) {  // dnnl::error, std::bad_alloc: never past the C ABI
    return ffi::Error(ffi::ErrorCode::kInternal, error_text(e));
  }
  return ffi::Error::Success();
}

ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                           ffi::ResultBuffer<ffi::F32> dk, int64_t sh, int64_t sw, int64_t pt,
                           int64_t pb, int64_t pl, int64_t pr, int64_t dh, int64_t dw) {
  return RunBackwardWeights(x, dy, dk, nullptr, sh, sw, pt, pb, pl, pr, dh, dw);
}

ffi::Error BackwardWeightsBias(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                               ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> db,
                               int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                               int64_t pr, int64_t dh, int64_t dw) {
  return RunBackwardWeights(x, dy, dk, db->typed_data(), sh, sw, pt, pb, pl, pr, dh, dw);
}

#define CONV_ATTRS                                                               \
  .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("pt").Attr<int64_t>("pb") \
      .Attr<int64_t>("pl").Attr<int64_t>("pr").Attr<int64_t>("dh").Attr<int64_t>("dw")

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnetsOnednnConvForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnetsOnednnConvBackwardData, BackwardData,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnetsOnednnConvBackwardWeights, BackwardWeights,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnetsOnednnConvForwardBias, ForwardBias,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnetsOnednnConvBackwardWeightsBias, BackwardWeightsBias,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);
