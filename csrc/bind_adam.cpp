// Binding of the native AdamW (adam.h): buffer checks with errors that name the argument, then the kernels
// with the GIL released.
#include <pybind11/pybind11.h>

#include <cmath>
#include <string>
#include <vector>

#include "adam.h"

namespace py = pybind11;
using namespace offload;

namespace {

Dtype parse_dtype(const std::string& s, const char* arg) {
  if (s == "float32") return Dtype::F32;
  if (s == "bfloat16") return Dtype::BF16;
  if (s == "float16") return Dtype::F16;
  throw py::value_error(std::string(arg) + ": unsupported dtype '" + s +
                        "'; expected 'float32', 'bfloat16' or 'float16'");
}

Simd parse_simd(const std::string& s) {
  Simd level;
  if (s == "auto") return simd_best();
  if (s == "avx512") level = Simd::Avx512;
  else if (s == "avx2") level = Simd::Avx2;
  else if (s == "scalar") level = Simd::Scalar;
  else throw py::value_error("simd: expected 'auto', 'avx512', 'avx2' or 'scalar', got '" + s + "'");
  if (!simd_supported(level))
    throw py::value_error("simd: '" + s + "' is not supported by this CPU (best: '" +
                          simd_name(simd_best()) + "')");
  return level;
}

int parse_threads(int threads) {
  if (threads < 0) throw py::value_error("threads: must be >= 0 (0 = the pool's default), got " +
                                         std::to_string(threads));
  return threads;
}

// A C-contiguous buffer viewed as raw bytes. Holding the py::buffer_info keeps the exporter's memory alive;
// it is released only after the GIL is taken back (it is destroyed with the caller's frame).
struct Bytes {
  py::buffer_info info;
  uint8_t* ptr = nullptr;
  size_t nbytes = 0;
};

Bytes view(const py::object& obj, const char* arg, bool writable) {
  if (!PyObject_CheckBuffer(obj.ptr()))
    throw py::value_error(std::string(arg) + ": expected a buffer (numpy array, memoryview, bytearray), got " +
                          std::string(py::str(py::type::of(obj).attr("__name__"))));
  Bytes b;
  try {
    b.info = py::reinterpret_borrow<py::buffer>(obj).request(writable);
  } catch (py::error_already_set& e) {
    throw py::value_error(std::string(arg) + (writable ? ": needs a writable buffer: " : ": ") + e.what());
  }
  py::ssize_t expect = b.info.itemsize;
  for (py::ssize_t d = b.info.ndim - 1; d >= 0; --d) {
    if (b.info.shape[d] != 1 && b.info.strides[d] != expect)
      throw py::value_error(std::string(arg) + ": buffer must be C-contiguous");
    expect *= b.info.shape[d];
  }
  b.ptr = static_cast<uint8_t*>(b.info.ptr);
  b.nbytes = size_t(b.info.size) * size_t(b.info.itemsize);
  return b;
}

void check_size(const Bytes& b, size_t n, size_t elem, const char* arg, const char* dtype) {
  if (b.nbytes != n * elem)
    throw py::value_error(std::string(arg) + ": expected " + std::to_string(n) + " " + dtype + " elements (" +
                          std::to_string(n * elem) + " bytes), got " + std::to_string(b.nbytes) + " bytes");
}

// Overlapping buffers would read values this same pass has already written.
void check_disjoint(const std::vector<std::pair<const char*, const Bytes*>>& bs) {
  for (size_t i = 0; i < bs.size(); ++i)
    for (size_t j = i + 1; j < bs.size(); ++j) {
      const Bytes &a = *bs[i].second, &b = *bs[j].second;
      if (a.nbytes && b.nbytes && a.ptr < b.ptr + b.nbytes && b.ptr < a.ptr + a.nbytes)
        throw py::value_error(std::string(bs[i].first) + " and " + bs[j].first + ": buffers overlap");
    }
}

void check_hyper(const AdamHyper& h) {
  std::string bad;
  auto need = [&](bool ok, const std::string& what) { if (!ok) bad += (bad.empty() ? "" : "; ") + what; };
  need(std::isfinite(h.lr) && h.lr >= 0, "lr must be finite and >= 0, got " + std::to_string(h.lr));
  need(h.beta1 >= 0 && h.beta1 < 1, "beta1 must be in [0, 1), got " + std::to_string(h.beta1));
  need(h.beta2 >= 0 && h.beta2 < 1, "beta2 must be in [0, 1), got " + std::to_string(h.beta2));
  need(std::isfinite(h.eps) && h.eps >= 0, "eps must be finite and >= 0, got " + std::to_string(h.eps));
  need(std::isfinite(h.weight_decay) && h.weight_decay >= 0,
       "weight_decay must be finite and >= 0, got " + std::to_string(h.weight_decay));
  need(h.step >= 1, "step must be >= 1 (the count after this update, as torch's state['step']), got " +
                        std::to_string(h.step));
  need(std::isfinite(h.grad_scale), "grad_scale must be finite, got " + std::to_string(h.grad_scale));
  if (!bad.empty()) throw py::value_error(bad);
}

void adamw_step_py(const py::object& master, const py::object& grad, const py::object& exp_avg,
                   const py::object& exp_avg_sq, double lr, double beta1, double beta2, double eps,
                   double weight_decay, int64_t step, const std::string& grad_dtype, const py::object& out,
                   const std::string& out_dtype, double grad_scale, const std::string& simd, int threads) {
  const AdamHyper h{lr, beta1, beta2, eps, weight_decay, step, grad_scale};
  check_hyper(h);
  const Dtype gd = parse_dtype(grad_dtype, "grad_dtype");
  const Dtype od = parse_dtype(out_dtype, "out_dtype");
  const Simd level = parse_simd(simd);
  parse_threads(threads);
  Bytes p = view(master, "master", true), m = view(exp_avg, "exp_avg", true);
  Bytes v = view(exp_avg_sq, "exp_avg_sq", true), g = view(grad, "grad", false), o;
  if (p.nbytes % 4) throw py::value_error("master: byte size " + std::to_string(p.nbytes) +
                                          " is not a whole number of float32 elements");
  const size_t n = p.nbytes / 4;
  check_size(m, n, 4, "exp_avg", "float32");
  check_size(v, n, 4, "exp_avg_sq", "float32");
  check_size(g, n, dtype_size(gd), "grad", grad_dtype.c_str());
  std::vector<std::pair<const char*, const Bytes*>> all{{"master", &p}, {"exp_avg", &m},
                                                        {"exp_avg_sq", &v}, {"grad", &g}};
  const bool has_out = !out.is_none();
  if (has_out) {
    o = view(out, "out", true);
    check_size(o, n, dtype_size(od), "out", out_dtype.c_str());
    // out may be grad itself (the engine writes the update over the gradients it came from): every kernel
    // reads element i's gradient before it writes element i's output, at the same bytes when the dtypes
    // match. Any other overlap with grad is refused.
    const bool out_is_grad = o.ptr == g.ptr && o.nbytes == g.nbytes && od == gd;
    if (!out_is_grad) all.push_back({"out", &o});
  }
  check_disjoint(all);
  const AdamBuffers b{reinterpret_cast<float*>(p.ptr), reinterpret_cast<float*>(m.ptr),
                      reinterpret_cast<float*>(v.ptr), g.ptr, has_out ? o.ptr : nullptr, n, gd, od};
  py::gil_scoped_release nogil;
  offload::adamw_step(b, h, level, threads);
}

double grad_sumsq_py(const py::object& grad, const std::string& grad_dtype, int threads) {
  const Dtype gd = parse_dtype(grad_dtype, "grad_dtype");
  parse_threads(threads);
  Bytes g = view(grad, "grad", false);
  const size_t es = dtype_size(gd);
  if (g.nbytes % es) throw py::value_error("grad: byte size " + std::to_string(g.nbytes) +
                                           " is not a whole number of " + grad_dtype + " elements");
  py::gil_scoped_release nogil;
  return offload::grad_sumsq(g.ptr, gd, g.nbytes / es, simd_best(), threads);
}

}  // namespace

void bind_adam(py::module_& m) {
  m.def("adamw_step", &adamw_step_py, py::arg("master"), py::arg("grad"), py::arg("exp_avg"),
        py::arg("exp_avg_sq"), py::kw_only(), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("step"), py::arg("grad_dtype") = "float32",
        py::arg("out") = py::none(), py::arg("out_dtype") = "bfloat16", py::arg("grad_scale") = 1.0,
        py::arg("simd") = "auto", py::arg("threads") = 0,
        "One torch.optim.AdamW step (foreach=False semantics, fp32 math) over flat buffers, in place.\n\n"
        "master, exp_avg, exp_avg_sq: writable C-contiguous buffers of n float32 (any item type; bytes are\n"
        "counted). grad: n elements of grad_dtype ('float32' | 'bfloat16' | 'float16') as raw bytes; it is\n"
        "multiplied by grad_scale. out: None or n elements of out_dtype, set to the updated master in the same\n"
        "pass (bf16/fp16 round to nearest even). step: the count including this update (>= 1). simd: 'auto' |\n"
        "'avx512' | 'avx2' | 'scalar'; every level gives bitwise the same result. threads: 0 = adam_threads().\n"
        "Releases the GIL. Raises ValueError naming the argument on bad sizes, dtypes, overlap or values.");
  m.def("grad_sumsq", &grad_sumsq_py, py::arg("grad"), py::kw_only(), py::arg("grad_dtype") = "float32",
        py::arg("threads") = 0,
        "Sum of squares of a flat grad buffer, accumulated in double (inf and nan propagate), for global-norm\n"
        "clipping and non-finite detection. Independent of the thread count. Releases the GIL.");
  m.def("simd_level", [] { return std::string(simd_name(simd_best())); },
        "The widest SIMD level this CPU runs: 'avx512', 'avx2' or 'scalar' (detected at load time).");
  m.def("set_adam_threads", [](int n) {
          if (n < 1) throw py::value_error("set_adam_threads: n must be >= 1, got " + std::to_string(n));
          py::gil_scoped_release nogil;  // waits for an in-flight step and joins the old workers
          offload::set_adam_threads(n);
        }, py::arg("n"), "Sets the AdamW pool's default thread count (initially os.cpu_count()).");
  m.def("adam_threads", &offload::adam_threads, "The AdamW pool's default thread count.");
}
