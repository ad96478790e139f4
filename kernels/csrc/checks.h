// Argument checks for the entry points in bindings.cpp: every tensor an entry takes a raw pointer
// from is checked here first (type, dtype, device, shape, strides), so no Python call, however
// wrong, can make a kernel read or write outside a buffer. Tensors are read through their Python
// attributes (data_ptr, shape, stride, dtype, device), so the module still builds without torch
// headers. A failed check raises ValueError naming the entry, the argument, what was expected
// and what it got: "kernels._C.adamw_cpu: exp_avgs[3]: expected float32 [64, 32], got float32 [16, 32]".
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "ops.h"

namespace kernels {

namespace py = pybind11;

constexpr int kI64 = 3;       // int64 (targets); not a kernel storage dtype, so not in ops.h
constexpr int kU8 = 4;        // uint8 (NF4 codes, double-quantized absmax)
constexpr int kI8 = 5;        // int8 (int8 weights)
constexpr int kOther = -1;    // any dtype no kernel takes
constexpr int kCPU = -1;      // TensorArg::device for CPU tensors (else the CUDA device index)
constexpr int kOtherDevice = -2;

// A torch.Tensor as the kernels see it.
struct TensorArg {
  std::string name;
  bool present = false;  // false: None was passed for an optional tensor
  void* data = nullptr;
  int dtype = kOther;
  std::string dtype_name, device_name;
  int device = kCPU;
  std::vector<int64_t> shape, stride;

  int64_t dim() const { return int64_t(shape.size()); }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
  // Row-major dense (torch's is_contiguous: strides of size-1 dims, and of empty tensors, don't matter).
  bool contiguous() const {
    if (numel() == 0) return true;
    int64_t expected = 1;
    for (int64_t d = dim() - 1; d >= 0; --d) {
      if (shape[d] != 1 && stride[d] != expected) return false;
      expected *= shape[d];
    }
    return true;
  }
  bool unit_last_stride() const { return dim() > 0 && (shape.back() <= 1 || stride.back() == 1); }
  std::string describe() const;
};

inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

inline const char* dtype_name(int code) {
  switch (code) {
    case kF32: return "float32";
    case kBF16: return "bfloat16";
    case kF16: return "float16";
    case kI64: return "int64";
    case kU8: return "uint8";
    case kI8: return "int8";
    default: return "another dtype";
  }
}

inline std::string TensorArg::describe() const {
  if (!present) return "None";
  std::string s = dtype_name + " " + shape_str(shape);
  if (!contiguous()) s += " with strides " + shape_str(stride);
  return s + " on " + device_name;
}

// The checks of one call of one entry. All tensors must be on one device: the CPU for *_cpu
// entries, a single CUDA device for *_cuda entries.
class Checker {
 public:
  Checker(const char* entry, bool cuda) : entry_(std::string("kernels._C.") + entry), cuda_(cuda) {}

  [[noreturn]] void fail(const std::string& what, const std::string& expected, const std::string& got) const {
    throw py::value_error(entry_ + ": " + what + ": expected " + expected + ", got " + got);
  }
  void expect(bool ok, const TensorArg& t, const std::string& expected) const {
    if (!ok) fail(t.name, expected, t.describe());
  }

  // A required tensor on this entry's device.
  TensorArg tensor(py::handle obj, const std::string& name) {
    TensorArg t = read(obj, name);
    if (!t.present) fail(name, "a tensor", "None");
    return t;
  }
  // An optional tensor: None gives present = false and data = nullptr.
  TensorArg optional(py::handle obj, const std::string& name) {
    return obj.is_none() ? TensorArg{name} : tensor(obj, name);
  }

  void dtype_in(const TensorArg& t, std::initializer_list<int> allowed) const {
    std::string names;
    for (int code : allowed) {
      if (t.dtype == code) return;
      names += (names.empty() ? "" : " or ") + std::string(dtype_name(code));
    }
    fail(t.name, names, t.describe());
  }
  void dtype_is(const TensorArg& t, int code) const { dtype_in(t, {code}); }
  void shape_is(const TensorArg& t, const std::vector<int64_t>& shape) const {
    if (t.shape != shape) fail(t.name, "shape " + shape_str(shape), t.describe());
  }
  void contiguous(const TensorArg& t) const { expect(t.contiguous(), t, "a contiguous tensor"); }
  // Dense (contiguous) of this dtype and shape: outputs, moments, master weights, tables.
  void dense(const TensorArg& t, int dtype, const std::vector<int64_t>& shape,
             const std::string& why = "") const {
    expect(t.dtype == dtype && t.shape == shape && t.contiguous(), t,
           std::string("a contiguous ") + dtype_name(dtype) + " " + shape_str(shape) + why);
  }
  void dense_like(const TensorArg& t, const TensorArg& like, int dtype) const {
    dense(t, dtype, like.shape, " (the shape of " + like.name + ")");
  }
  void threads(int n_threads) const {
    if (n_threads < 1) fail("n_threads", "a positive thread count", std::to_string(n_threads));
  }

 private:
  TensorArg read(py::handle obj, const std::string& name);

  std::string entry_;
  bool cuda_;
  int device_ = kOtherDevice;  // the first CUDA tensor's device, for *_cuda entries
};

// torch's objects, looked up once (torch is imported before kernels._C is used).
// Attribute names are interned once: these reads run on every decoding step (kernels.linear).
struct TorchRefs {
  py::handle tensor_type, f32, bf16, f16, i64, u8, i8;
  py::handle dtype, shape, stride, is_cpu, is_cuda, get_device, device, data_ptr;
  static const TorchRefs& get() {
    static const TorchRefs refs = [] {
      py::module_ torch = py::module_::import("torch");
      // Leaked on purpose: they live as long as torch, and must not be released at exit.
      auto keep = [&](const char* n) { return py::object(torch.attr(n)).release(); };
      auto name = [](const char* n) { return py::handle(PyUnicode_InternFromString(n)); };
      return TorchRefs{keep("Tensor"), keep("float32"), keep("bfloat16"), keep("float16"), keep("int64"),
                       keep("uint8"), keep("int8"),
                       name("dtype"), name("shape"), name("stride"), name("is_cpu"), name("is_cuda"),
                       name("get_device"), name("device"), name("data_ptr")};
    }();
    return refs;
  }
};

inline TensorArg Checker::read(py::handle obj, const std::string& name) {
  TensorArg t{name};
  if (obj.is_none()) return t;
  const TorchRefs& torch = TorchRefs::get();
  if (!py::isinstance(obj, torch.tensor_type))
    fail(name, "a torch.Tensor", std::string(py::str(py::type::of(obj).attr("__name__"))));
  t.present = true;
  py::object dtype = obj.attr(torch.dtype);
  t.dtype = dtype.is(torch.f32) ? kF32 : dtype.is(torch.bf16) ? kBF16 : dtype.is(torch.f16) ? kF16
          : dtype.is(torch.i64) ? kI64 : dtype.is(torch.u8) ? kU8 : dtype.is(torch.i8) ? kI8 : kOther;
  t.dtype_name = t.dtype == kOther ? std::string(py::str(dtype)) : dtype_name(t.dtype);
  if (t.dtype_name.rfind("torch.", 0) == 0) t.dtype_name = t.dtype_name.substr(6);
  py::tuple shape = obj.attr(torch.shape), stride = obj.attr(torch.stride)();
  t.shape.reserve(shape.size());
  t.stride.reserve(stride.size());
  for (py::handle s : shape) t.shape.push_back(PyLong_AsLongLong(s.ptr()));
  for (py::handle s : stride) t.stride.push_back(PyLong_AsLongLong(s.ptr()));
  if (obj.attr(torch.is_cpu).ptr() == Py_True) {
    t.device = kCPU;
    t.device_name = "cpu";
  } else if (obj.attr(torch.is_cuda).ptr() == Py_True) {
    t.device = obj.attr(torch.get_device)().cast<int>();
    t.device_name = "cuda:" + std::to_string(t.device);
  } else {
    t.device = kOtherDevice;
    t.device_name = std::string(py::str(obj.attr(torch.device)));
  }
  if (cuda_) {
    if (device_ == kOtherDevice && t.device >= 0) device_ = t.device;
    if (t.device < 0 || t.device != device_)
      fail(name, device_ >= 0 ? "a tensor on cuda:" + std::to_string(device_) : "a CUDA tensor", t.describe());
  } else if (t.device != kCPU) {
    fail(name, "a CPU tensor", t.describe());
  }
  for (int64_t s : t.stride)
    if (s < 0) fail(name, "non-negative strides", t.describe());
  t.data = reinterpret_cast<void*>(obj.attr(torch.data_ptr)().cast<intptr_t>());
  return t;
}

// The buffers of a quantized weight W [n, k] (layout: kernels/reference.py), each checked against n and k;
// `at` prefixes every argument name in an error (quant_bindings.cpp; the decode plan uses it too).
QuantWeight quant_weight(Checker& c, int kind, int64_t n, int64_t k, py::handle codes, py::handle qabsmax,
                         py::handle absmax2, py::handle code2, py::handle nf4, float offset, py::handle scale,
                         const std::string& at);

}  // namespace kernels
