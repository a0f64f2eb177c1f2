// The one file that exposes the native core to Python as the private module offload._C.
// Every call that can block (file system calls, waits, engine shutdown) releases the GIL, and
// offload::OsError becomes Python's OSError carrying the errno, the message and the path.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cerrno>

#include "core/adamw.h"
#include "core/arena.h"
#include "core/crc32.h"
#include "core/engine.h"
#include "core/erasure.h"
#include "core/errors.h"
#include "core/file.h"
#include "core/gf256.h"

namespace py = pybind11;
using namespace offload;

namespace {

using Release = py::call_guard<py::gil_scoped_release>;

OpenMode parse_mode(const std::string& mode) {
  if (mode == "r") return OpenMode::Read;
  if (mode == "r+") return OpenMode::ReadWrite;
  if (mode == "w") return OpenMode::Create;
  if (mode == "x") return OpenMode::CreateExclusive;
  throw_os(EINVAL, "open", "", "mode must be one of r, r+, w, x; got '" + mode + "'");
}

std::unique_ptr<Engine> make_engine(const std::string& backend, int64_t chunk_bytes, int queue_depth) {
  EngineOptions opts;
  opts.chunk_bytes = chunk_bytes;
  opts.queue_depth = queue_depth;
  if (backend == "io_uring") return make_uring_engine(opts);
  if (backend == "threads") return make_thread_engine(opts);
  throw_os(EINVAL, "io engine", "", "backend must be io_uring or threads; got '" + backend + "'");
}

// (is_write, file, address, nbytes, offset) tuples from the facade.
using RequestTuple = std::tuple<bool, std::shared_ptr<File>, uintptr_t, int64_t, int64_t>;

std::vector<std::shared_ptr<RequestState>> submit(Engine& engine, const std::vector<RequestTuple>& batch) {
  std::vector<IoRequest> reqs;
  reqs.reserve(batch.size());
  for (const auto& [is_write, file, addr, nbytes, offset] : batch)
    reqs.push_back({is_write ? Op::Write : Op::Read, file, reinterpret_cast<char*>(addr), nbytes, offset});
  py::gil_scoped_release release;
  return engine.submit(reqs);
}

// Erasure codec: addresses from the facade (0 for none) as typed pointers.
template <class T>
std::vector<T*> as_pointers(const std::vector<uintptr_t>& addrs) {
  std::vector<T*> out(addrs.size());
  for (size_t i = 0; i < addrs.size(); ++i) out[i] = reinterpret_cast<T*>(addrs[i]);
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "offload's native core (private: use offload.io and offload.memory)";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const OsError& e) {
      // OSError(errno, strerror, filename) picks the subclass (FileNotFoundError, ...) by errno.
      py::object path = e.path().empty() ? py::object(py::none()) : py::object(py::str(e.path()));
      py::object err = py::reinterpret_borrow<py::object>(PyExc_OSError)(e.err(), e.what(), path);
      PyErr_SetObject(PyExc_OSError, err.ptr());
    }
  });

  m.attr("ERR_EOF") = RequestState::kErrEof;
  m.attr("DIRECT_ALIGN") = kDirectAlign;
  m.def("page_size", &page_size);
  m.def("probe_uring", []() {
    UringProbe p;
    {
      py::gil_scoped_release release;
      p = probe_uring();
    }
    return py::make_tuple(p.ok, p.err, p.reason);
  });

  py::class_<File, std::shared_ptr<File>>(m, "File")
      .def(py::init([](const std::string& path, const std::string& mode, bool direct) {
             OpenMode om = parse_mode(mode);
             py::gil_scoped_release release;
             return File::open(path, om, direct);
           }),
           py::arg("path"), py::arg("mode"), py::arg("direct"))
      .def_property_readonly("path", &File::path)
      .def_property_readonly("direct", &File::direct)
      .def_property_readonly("writable", &File::writable)
      .def_property_readonly("closed", &File::closed)
      .def("size", &File::size, Release())
      .def("truncate", &File::truncate, Release())
      .def("allocate", &File::allocate, Release())
      .def("sync", &File::sync, Release())
      .def("close", &File::close, Release());

  py::class_<RequestState, std::shared_ptr<RequestState>>(m, "Request")
      .def("done", &RequestState::done)
      .def("wait", &RequestState::wait, py::arg("timeout") = -1.0, Release())
      .def_property_readonly("bytes_done", &RequestState::bytes_done)
      .def_property_readonly("error", &RequestState::error)
      .def_property_readonly("error_offset", &RequestState::error_offset)
      .def_property_readonly("nbytes", [](const RequestState& s) { return s.request().nbytes; })
      .def_property_readonly("offset", [](const RequestState& s) { return s.request().offset; })
      .def_property_readonly("is_write", [](const RequestState& s) { return s.request().op == Op::Write; })
      .def_property_readonly("path", [](const RequestState& s) { return s.request().file->path(); });

  py::class_<Engine>(m, "Engine")
      .def_property_readonly("name", &Engine::name)
      .def_property_readonly("chunk_bytes", [](const Engine& e) { return e.options().chunk_bytes; })
      .def_property_readonly("queue_depth", [](const Engine& e) { return e.options().queue_depth; })
      .def("submit", &submit)
      .def("register_buffer",
           [](Engine& e, uintptr_t addr, int64_t nbytes) { return e.register_buffer(reinterpret_cast<void*>(addr), nbytes); },
           Release())
      .def("unregister_buffer", [](Engine& e, uintptr_t addr) { e.unregister_buffer(reinterpret_cast<void*>(addr)); },
           Release())
      .def("registered_bytes", &Engine::registered_bytes)
      .def("shutdown", &Engine::shutdown, Release());
  m.def("make_engine", &make_engine, py::arg("backend"), py::arg("chunk_bytes"), py::arg("queue_depth"));

  py::class_<Arena>(m, "Arena")
      .def(py::init<int64_t, bool, int, bool>(), py::arg("nbytes"), py::arg("hugepages"), py::arg("node"),
           py::arg("populate"), Release())
      .def_property_readonly("ptr", [](const Arena& a) { return reinterpret_cast<uintptr_t>(a.data()); })
      .def_property_readonly("size", &Arena::size)
      .def_property_readonly("node", &Arena::node)
      .def_property_readonly("hugepages", &Arena::hugepages)
      .def_property_readonly("closed", &Arena::closed)
      .def("close", &Arena::close, Release())
      .def("page_nodes", &Arena::page_nodes, py::arg("max_pages") = 64, Release())
      .def("policy", &Arena::policy, Release());

  m.def(
      "adamw_step",
      [](uintptr_t param, uintptr_t exp_avg, uintptr_t exp_avg_sq, uintptr_t grad, bool grad_is_bf16, uintptr_t wire,
         int64_t n, double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
         float grad_scale, int threads) {
        const AdamWParams p{lr, beta1, beta2, eps, weight_decay, step, grad_scale};
        adamw_step(reinterpret_cast<float*>(param), reinterpret_cast<float*>(exp_avg),
                   reinterpret_cast<float*>(exp_avg_sq), reinterpret_cast<const void*>(grad),
                   grad_is_bf16 ? GradDtype::BF16 : GradDtype::F32, reinterpret_cast<uint16_t*>(wire), n, p, threads);
      },
      py::arg("param_ptr"), py::arg("exp_avg_ptr"), py::arg("exp_avg_sq_ptr"), py::arg("grad_ptr"),
      py::arg("grad_is_bf16"), py::arg("wire_ptr"), py::arg("n"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"),
      py::arg("eps"), py::arg("weight_decay"), py::arg("step"), py::arg("grad_scale"), py::arg("threads"), Release());

  // ---- crc32 (zlib's), and a copy that sums what it copies (the checkpoint's staging).
  m.def(
      "crc32",
      [](uintptr_t addr, size_t nbytes, uint32_t crc) {
        return crc32_update(crc, reinterpret_cast<const uint8_t*>(addr), nbytes);
      },
      py::arg("addr"), py::arg("nbytes"), py::arg("crc") = 0, Release());
  m.def(
      "crc32_portable",
      [](uintptr_t addr, size_t nbytes, uint32_t crc) {
        return crc32_portable(crc, reinterpret_cast<const uint8_t*>(addr), nbytes);
      },
      py::arg("addr"), py::arg("nbytes"), py::arg("crc") = 0, Release());
  m.def(
      "copy_crc32",
      [](uintptr_t dst, uintptr_t src, size_t nbytes, uint32_t crc) {
        return copy_crc32(reinterpret_cast<uint8_t*>(dst), reinterpret_cast<const uint8_t*>(src), nbytes, crc);
      },
      py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("crc") = 0, Release());

  // ---- Erasure codec (offload.snapshot.codec): buffers arrive as addresses, 0 for a lost chunk.
  m.def("ec_isas", []() {
    py::list out;
    for (const IsaSupport& s : isa_support()) out.append(py::make_tuple(s.name, s.available));
    return out;
  });
  m.def(
      "ec_resolve_isa", [](const std::string& isa) { return std::string(isa_name(resolve_isa(parse_isa(isa)))); },
      py::arg("isa"));
  m.def(
      "ec_parity_matrix",
      [](int k, int m) {
        const std::vector<uint8_t> p = ec_parity_matrix(k, m);
        return py::bytes(reinterpret_cast<const char*>(p.data()), p.size());
      },
      py::arg("k"), py::arg("m"));
  m.def(
      "ec_encode",
      [](const std::vector<uintptr_t>& data, const std::vector<uintptr_t>& parity, size_t nbytes,
         const std::string& isa, int threads) {
        const auto in = as_pointers<const uint8_t>(data);
        const auto out = as_pointers<uint8_t>(parity);
        ec_encode(in.data(), static_cast<int>(in.size()), out.data(), static_cast<int>(out.size()), nbytes,
                  parse_isa(isa), threads);
      },
      py::arg("data_ptrs"), py::arg("parity_ptrs"), py::arg("nbytes"), py::arg("isa"), py::arg("threads"), Release());
  m.def(
      "ec_decode",
      [](const std::vector<uintptr_t>& chunks, int k, int m, const std::vector<uintptr_t>& data_out, size_t nbytes,
         const std::string& isa, int threads) {
        if (chunks.size() != static_cast<size_t>(k) + m || data_out.size() != static_cast<size_t>(k))
          throw std::invalid_argument("ec_decode: need k + m chunk addresses and k output addresses");
        const auto in = as_pointers<const uint8_t>(chunks);
        const auto out = as_pointers<uint8_t>(data_out);
        ec_decode(in.data(), k, m, out.data(), nbytes, parse_isa(isa), threads);
      },
      py::arg("chunk_ptrs"), py::arg("k"), py::arg("m"), py::arg("out_ptrs"), py::arg("nbytes"), py::arg("isa"),
      py::arg("threads"), Release());
  m.def("gf_tables", []() {
    const gf256::Tables& t = gf256::tables();
    return py::make_tuple(py::bytes(reinterpret_cast<const char*>(t.mul), sizeof t.mul),
                          py::bytes(reinterpret_cast<const char*>(t.inv), sizeof t.inv));
  });
  // ---- end of the erasure codec
}
