// The one place the extension's exports are listed: each component binds itself in bind_<component>.cpp.
#include <pybind11/pybind11.h>

#include "common.h"

namespace py = pybind11;

// Weak so that a component can be built and tested before the others exist; every release build has all.
void bind_arena(py::module_& m) __attribute__((weak));
void bind_store(py::module_& m) __attribute__((weak));
void bind_adam(py::module_& m) __attribute__((weak));
void bind_trace(py::module_& m) __attribute__((weak));

static void register_errors() {
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const offload::IoError& e) {
      py::object cls = py::module_::import("offload.errors").attr("StoreIOError");
      py::object exc = cls(e.err, std::strerror(e.err), e.path, e.offset, e.length, e.op);
      PyErr_SetObject(cls.ptr(), exc.ptr());
    } catch (const offload::ArenaExhausted& e) {
      py::object cls = py::module_::import("offload.errors").attr("ArenaExhaustedError");
      py::object exc = cls(e.requested, e.budget, e.in_use);
      PyErr_SetObject(cls.ptr(), exc.ptr());
    }
  });
}

PYBIND11_MODULE(_native, m) {
  m.doc() = "offload native core: pinned host arena, NVMe store, CPU AdamW, trace ring";
  register_errors();
#ifdef OFFLOAD_HAVE_URING
  m.attr("HAVE_URING") = true;
#else
  m.attr("HAVE_URING") = false;
#endif
  m.def("now_ns", &offload::now_ns, "CLOCK_MONOTONIC in nanoseconds (the trace clock)");
  if (bind_arena) bind_arena(m);
  if (bind_store) bind_store(m);
  if (bind_adam) bind_adam(m);
  if (bind_trace) bind_trace(m);
}
