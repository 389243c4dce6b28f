// Python binding of the swap store. Every call that can block (open, create, remove, submit, wait, wait_all,
// close, register_buffer) releases the GIL. Buffers stay exported (PyObject_GetBuffer) from submit until
// their ticket is waited or the store closes, so the memory under an in-flight request can neither be freed
// nor resized.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <unordered_map>

#include "store.h"
#include "trace.h"

namespace py = pybind11;
using offload::Store;

namespace {

bool interpreter_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing();
#else
  return _Py_IsFinalizing();
#endif
}

struct HeldBuffer {
  Py_buffer view{};
  bool ok = false;
  HeldBuffer() = default;
  HeldBuffer(const HeldBuffer&) = delete;
  HeldBuffer& operator=(const HeldBuffer&) = delete;
  ~HeldBuffer() {
    if (ok) PyBuffer_Release(&view);  // always destroyed with the GIL held
  }
};

std::unique_ptr<HeldBuffer> export_buffer(const py::handle& obj, bool writable) {
  auto b = std::make_unique<HeldBuffer>();
  if (PyObject_GetBuffer(obj.ptr(), &b->view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) != 0) {
    py::error_already_set e;
    throw py::value_error(std::string("buf must be a C-contiguous") + (writable ? ", writable" : "") +
                          " buffer (numpy array, memoryview, bytearray): " + e.what());
  }
  b->ok = true;
  return b;
}

struct PyStore {
  std::unique_ptr<Store> store;
  std::unordered_map<uint64_t, std::unique_ptr<HeldBuffer>> held;  // ticket -> buffer; touched under the GIL
  std::vector<std::unique_ptr<HeldBuffer>> registered;

  void close() {
    {
      py::gil_scoped_release nogil;
      store->close();
    }
    held.clear();
    registered.clear();
  }
  ~PyStore() {
    if (!store) return;
    if (interpreter_finalizing()) {
      store->close();
    } else {
      py::gil_scoped_release nogil;
      store->close();
    }
  }

  uint64_t submit(bool write, uint64_t obj, uint64_t offset, const py::object& buf, uint32_t tag) {
    auto b = export_buffer(buf, !write);
    uint64_t t;
    {
      py::gil_scoped_release nogil;
      t = store->submit(write, obj, offset, b->view.buf, uint64_t(b->view.len), tag);
    }
    held[t] = std::move(b);
    return t;
  }
};

offload::FaultOp parse_fault_op(const std::string& op) {
  if (op == "any") return offload::FaultOp::kAny;
  if (op == "read") return offload::FaultOp::kRead;
  if (op == "write") return offload::FaultOp::kWrite;
  throw py::value_error("inject_fault: op must be 'read', 'write' or 'any', not '" + op + "'");
}

}  // namespace

void bind_store(py::module_& m) {
  py::class_<PyStore>(m, "Store",
      "NVMe swap store: objects striped over directories, O_DIRECT where accepted, io_uring or thread-pool "
      "backend. Opening releases the GIL (it probes and reclaims dead runs).")
      .def(py::init([](std::vector<std::string> paths, unsigned queue_depth, std::string backend,
                       std::string direct, uint64_t stripe_bytes, unsigned threads,
                       std::shared_ptr<offload::TraceRing> trace) {
             offload::StoreOptions o;
             o.paths = std::move(paths);
             o.queue_depth = queue_depth;
             o.backend = std::move(backend);
             o.direct = std::move(direct);
             o.stripe_bytes = stripe_bytes;
             o.threads = threads;
             o.trace = std::move(trace);
             auto p = std::make_unique<PyStore>();
             py::gil_scoped_release nogil;
             p->store = std::make_unique<Store>(o);
             return p;
           }),
           py::arg("paths"), py::arg("queue_depth") = 32, py::arg("backend") = "auto", py::arg("direct") = "auto",
           py::arg("stripe_bytes") = uint64_t(4) << 20, py::arg("threads") = 4, py::arg("trace") = py::none())
      .def("create", [](PyStore& s, uint64_t nbytes) {
             py::gil_scoped_release nogil;
             return s.store->create(nbytes);
           }, py::arg("nbytes"), "New object of nbytes (backing files reserved now). Releases the GIL.")
      .def("remove", [](PyStore& s, uint64_t obj) {
             py::gil_scoped_release nogil;
             s.store->remove(obj);
           }, py::arg("obj"), "Waits for the object's in-flight requests, then deletes it. Releases the GIL.")
      .def("size", [](PyStore& s, uint64_t obj) { return s.store->size(obj); }, py::arg("obj"))
      .def("path_of", [](PyStore& s, uint64_t obj) { return s.store->path_of(obj); }, py::arg("obj"),
           "Backing files of the object, one per path it stripes over.")
      .def("submit_write", [](PyStore& s, uint64_t obj, uint64_t offset, py::object buf, uint32_t tag) {
             return s.submit(true, obj, offset, buf, tag);
           }, py::arg("obj"), py::arg("offset"), py::arg("buf"), py::arg("tag") = 0,
           "Queues a write of buf's bytes at offset; returns a ticket. Blocks, GIL released, while the queue is "
           "full. buf is held until the ticket is waited.")
      .def("submit_read", [](PyStore& s, uint64_t obj, uint64_t offset, py::object buf, uint32_t tag) {
             return s.submit(false, obj, offset, buf, tag);
           }, py::arg("obj"), py::arg("offset"), py::arg("buf"), py::arg("tag") = 0,
           "Queues a read into writable buf from offset; returns a ticket. Blocks, GIL released, while the "
           "queue is full.")
      .def("wait", [](PyStore& s, uint64_t t) {
             try {
               py::gil_scoped_release nogil;
               s.store->wait(t);
             } catch (...) {
               s.held.erase(t);
               throw;
             }
             s.held.erase(t);
           }, py::arg("ticket"), "Blocks (GIL released) until the ticket is done; raises its StoreIOError.")
      .def("poll", [](PyStore& s, uint64_t t) { return s.store->poll(t); }, py::arg("ticket"))
      .def("wait_all", [](PyStore& s) {
             std::vector<uint64_t> retired;
             try {
               py::gil_scoped_release nogil;
               s.store->wait_all(&retired);
             } catch (...) {
               for (uint64_t t : retired) s.held.erase(t);
               throw;
             }
             for (uint64_t t : retired) s.held.erase(t);
           }, "Waits (GIL released) for every outstanding ticket, then raises the first error among them.")
      .def("close", &PyStore::close,
           "Waits for in-flight I/O (GIL released), deletes the files and run directories, releases the lock. "
           "Idempotent.")
      .def("register_buffer", [](PyStore& s, py::object buf) {
             auto b = export_buffer(buf, false);
             bool ok;
             {
               py::gil_scoped_release nogil;
               ok = s.store->register_buffer(b->view.buf, size_t(b->view.len));
             }
             if (ok) s.registered.push_back(std::move(b));
             return ok;
           }, py::arg("buf"),
           "Registers buf's memory as io_uring fixed buffers (held for the store's life). False when it cannot "
           "(RLIMIT_MEMLOCK, thread-pool backend, table full): I/O still works, unregistered.")
      .def("inject_fault", [](PyStore& s, uint64_t k, int err, bool short_io, const std::string& op) {
             s.store->inject_fault(k, err, short_io, parse_fault_op(op));
           }, py::arg("k"), py::arg("err") = 0, py::arg("short") = false, py::arg("op") = "any",
           "Test hook: the k-th next backend operation of kind op fails with -err, or transfers only part.")
      .def("inject_enter_fault", [](PyStore& s, int err, unsigned submits, unsigned waits) {
             s.store->inject_enter_fault(err, submits, waits);
           }, py::arg("err"), py::arg("submits") = 0, py::arg("waits") = 0,
           "Test hook (io_uring backend): the next `submits` io_uring_enter submissions and `waits` completion "
           "waits fail with -err (EINTR, EAGAIN or EBUSY) without entering the kernel; they are retried.")
      .def_property_readonly("enter_faults_armed", [](PyStore& s) { return s.store->enter_faults_armed(); },
                             "io_uring_enter faults armed and not yet fired.")
      .def("clear_faults", [](PyStore& s) { s.store->clear_faults(); })
      .def_property_readonly("faults_armed", [](PyStore& s) { return s.store->faults_armed(); },
                             "Injected faults not yet fired (tests check that each one fired).")
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](PyStore& s, py::args) { s.close(); return false; })
      .def_property_readonly("backend", [](PyStore& s) { return std::string(s.store->backend_name()); })
      .def_property_readonly("run_dirs", [](PyStore& s) { return s.store->run_dirs(); })
      .def_property_readonly("direct", [](PyStore& s) { return s.store->direct(); })
      .def_property_readonly("alignment", [](PyStore& s) { return s.store->alignment(); })
      .def_property_readonly("queue_depth", [](PyStore& s) { return s.store->queue_depth(); })
      .def_property_readonly("reclaimed", [](PyStore& s) { return s.store->reclaimed(); })
      .def_property_readonly("closed", [](PyStore& s) { return s.store->closed(); });

  m.def("probe_direct", [](const std::string& path) {
          offload::DirectProbe p;
          {
            py::gil_scoped_release nogil;
            p = offload::probe_direct(path);
          }
          py::dict d;
          d["direct"] = p.direct;
          d["alignment"] = p.alignment;
          d["reason"] = p.reason;
          return d;
        }, py::arg("path"), "Whether path's filesystem accepts O_DIRECT, and its alignment. Releases the GIL.");
  m.def("store_backends", &offload::store_backends, "Store backends compiled into this build.");
}
