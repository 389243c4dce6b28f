#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "common.h"
#include "trace.h"

namespace py = pybind11;
using offload::TraceEvent;
using offload::TraceRing;

void bind_trace(py::module_& m) {
  py::class_<TraceRing, std::shared_ptr<TraceRing>>(m, "TraceRing",
      "Lock-free event ring shared by native producers (store, AdamW) and Python; drained by the profiler.")
      .def(py::init<size_t>(), py::arg("capacity") = 1 << 16)
      .def("record", [](TraceRing& r, uint32_t kind, uint32_t unit, uint64_t bytes, int64_t t0, int64_t t1) {
             return r.record(TraceEvent{kind, unit, bytes, t0, t1});
           }, py::arg("kind"), py::arg("unit"), py::arg("bytes"), py::arg("t_start"), py::arg("t_end"))
      .def("drain", [](TraceRing& r) {
             // Returns an (n, 5) int64 array: kind, unit, bytes, t_start, t_end.
             std::vector<TraceEvent> evs;
             r.drain(evs);
             py::array_t<int64_t> out({py::ssize_t(evs.size()), py::ssize_t(5)});
             auto a = out.mutable_unchecked<2>();
             for (size_t i = 0; i < evs.size(); ++i) {
               a(i, 0) = evs[i].kind; a(i, 1) = evs[i].unit; a(i, 2) = int64_t(evs[i].bytes);
               a(i, 3) = evs[i].t_start; a(i, 4) = evs[i].t_end;
             }
             return out;
           })
      .def_property_readonly("dropped", &TraceRing::dropped)
      .def_property_readonly("capacity", &TraceRing::capacity);
  py::module_ k = m.def_submodule("trace_kind", "TraceRing event kinds");
  k.attr("COMPUTE") = int(offload::kTraceCompute); k.attr("H2D") = int(offload::kTraceH2D);
  k.attr("D2H") = int(offload::kTraceD2H); k.attr("DISK_READ") = int(offload::kTraceDiskRead);
  k.attr("DISK_WRITE") = int(offload::kTraceDiskWrite); k.attr("OPTIM") = int(offload::kTraceOptim);
  k.attr("WAIT") = int(offload::kTraceWait); k.attr("ACT_SWAP_OUT") = int(offload::kTraceActSwapOut);
  k.attr("ACT_SWAP_IN") = int(offload::kTraceActSwapIn); k.attr("OTHER") = int(offload::kTraceOther);
}
