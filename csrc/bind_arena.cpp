#include <pybind11/pybind11.h>

#include <algorithm>

#include "arena.h"
#include "common.h"

namespace py = pybind11;
using offload::Arena;
using offload::ArenaRegion;
using offload::SlotPool;

namespace {

// Waits in short slices with the GIL released, taking it back between slices only to let Ctrl-C (and any
// other pending signal handler) interrupt an indefinite wait.
int64_t acquire_interruptible(SlotPool& p, double timeout_s) {
  constexpr double kSlice = 0.05;
  double left = timeout_s;
  for (;;) {
    const double wait = left < 0 ? kSlice : std::min(left, kSlice);
    int64_t i;
    {
      py::gil_scoped_release nogil;
      i = p.acquire(wait);
    }
    if (i >= 0) return i;
    if (left >= 0) {
      left -= wait;
      if (left <= 0) return -1;
    }
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
  }
}

}  // namespace

void bind_arena(py::module_& m) {
  py::class_<ArenaRegion, std::shared_ptr<ArenaRegion>>(m, "ArenaRegion", py::buffer_protocol(),
      "A writable byte range of an Arena (buffer protocol, format 'B'). It keeps the arena's mapping alive, "
      "so torch.frombuffer(region, ...) tensors never dangle, even after Arena.close().")
      .def_buffer([](ArenaRegion& r) {
        return py::buffer_info(r.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {py::ssize_t(r.nbytes())}, {py::ssize_t(1)}, /*readonly=*/false);
      })
      .def_property_readonly("offset", &ArenaRegion::offset)
      .def_property_readonly("nbytes", &ArenaRegion::nbytes)
      .def("__len__", [](const ArenaRegion& r) { return r.nbytes(); });

  py::class_<Arena, std::shared_ptr<Arena>>(m, "Arena",
      "Host memory under an exact byte budget: one anonymous mapping (budget rounded up to 2 MiB, 2 MiB "
      "aligned, committed as touched), sub-allocated best-fit by offset. Thread-safe. Sizes are charged "
      "after rounding up to their alignment. Pinning is done from Python (offload.arena.HostArena).")
      .def(py::init<uint64_t, bool>(), py::arg("budget"), py::arg("huge_pages") = true,
           "Maps budget bytes (rounded up to 2 MiB); huge_pages asks for transparent huge pages.")
      .def("alloc", &Arena::alloc, py::arg("nbytes"), py::arg("align") = offload::kArenaDefaultAlign,
           "Offset of nbytes rounded up to align (a power of two in [64, 2 MiB]); raises "
           "offload.errors.ArenaExhaustedError (requested = the rounded size) when no free extent fits.")
      .def("free", &Arena::free, py::arg("offset"),
           "Returns an allocation; ValueError for an offset that is not live.")
      .def("size_of", &Arena::size_of, py::arg("offset"), "Rounded size charged for a live allocation.")
      .def("region", [](const Arena& a, uint64_t offset, uint64_t nbytes) {
             return std::make_shared<ArenaRegion>(a.region(offset, nbytes));
           }, py::arg("offset"), py::arg("nbytes"),
           "ArenaRegion over [offset, offset + nbytes); ValueError past the budget.")
      .def("close", &Arena::close, py::call_guard<py::gil_scoped_release>(),
           "Drops the arena's hold on its mapping; live regions keep it mapped until they die. Releases the "
           "GIL (unmapping gigabytes of touched pages takes a while). Idempotent.")
      .def_property_readonly("budget", &Arena::budget)
      .def_property_readonly("in_use", &Arena::in_use, "Sum of the rounded sizes of live allocations.")
      .def_property_readonly("capacity", &Arena::capacity, "Mapped bytes: the budget rounded up to 2 MiB.")
      .def_property_readonly("largest_free", &Arena::largest_free, "Largest free extent in bytes.")
      .def_property_readonly("huge_pages", &Arena::huge_pages,
                             "Whether the kernel accepted MADV_HUGEPAGE (advice, not a guarantee).")
      .def_property_readonly("closed", &Arena::closed)
      .def_property_readonly("address", &Arena::address,
          "Base address of the mapping. Only for registering the whole region with CUDA (cudaHostRegister) "
          "or io_uring; everything else addresses the arena by offset. ValueError after close().");

  py::class_<SlotPool, std::shared_ptr<SlotPool>>(m, "SlotPool",
      "count equal slots carved from an Arena as one allocation, for bounded buffer rings. Holds the Arena; "
      "gives the slots back to it when garbage collected.")
      .def(py::init<std::shared_ptr<Arena>, uint64_t, uint32_t>(), py::arg("arena"), py::arg("slot_bytes"),
           py::arg("count"),
           "Slots are slot_bytes rounded up to 4 KiB apart; ArenaExhaustedError when they do not fit.")
      .def("acquire", &acquire_interruptible, py::arg("timeout_s") = -1.0,
           "Index of a free slot. Blocks with the GIL released while all are held (back-pressure); with "
           "timeout_s >= 0 returns -1 when none came free in time. Interruptible by signals.")
      .def("release", &SlotPool::release, py::arg("index"), "ValueError unless the slot is held.")
      .def("offset", &SlotPool::offset, py::arg("index"), "Arena offset of a slot.")
      .def_property_readonly("slot_bytes", &SlotPool::slot_bytes)
      .def_property_readonly("stride", &SlotPool::stride)
      .def_property_readonly("count", &SlotPool::count)
      .def_property_readonly("free_count", &SlotPool::free_count)
      .def_property_readonly("arena", &SlotPool::arena);
}
