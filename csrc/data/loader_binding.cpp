// pybind11 binding of the loader core as fmcore._C.TokenLoader (wrapped by fmcore.data.Loader).
// Host buffers are torch tensors from at::empty (pinned when asked): torch's caching host allocator
// then knows about them, so a buffer handed to .to("cuda", non_blocking=True) is not reused before
// the copy finished, and reuse after warm-up costs no cudaHostAlloc.
#include <torch/extension.h>

#include "data/loader.h"

namespace py = pybind11;

namespace fmcore::data {
namespace {

Mode parse_mode(const std::string& mode) {
  if (mode == "sequential") return Mode::Sequential;
  if (mode == "random") return Mode::Random;
  throw std::invalid_argument("mode must be 'sequential' or 'random', got '" + mode + "'");
}

at::Tensor view(const at::Tensor& bytes, size_t offset, int64_t numel, at::ScalarType dtype,
                at::IntArrayRef shape) {
  const int64_t width = static_cast<int64_t>(c10::elementSize(dtype));
  return bytes.narrow(0, static_cast<int64_t>(offset), numel * width).view(dtype).view(shape);
}

// x, y, positions, cu_seqlens, max_seqlen (the last three None without doc boundaries).
py::tuple batch_tensors(const Loader& loader, Batch&& batch) {
  const at::Tensor& bytes = *std::static_pointer_cast<at::Tensor>(batch.buffer.owner);
  const LoaderOptions& o = loader.options();
  const BatchLayout& L = loader.layout();
  const at::ScalarType dt = o.out_bytes == 8 ? at::kLong : at::kInt;
  const int64_t bt = o.batch_size * o.seq_len;
  at::Tensor x = view(bytes, L.x, bt, dt, {o.batch_size, o.seq_len});
  at::Tensor y = view(bytes, L.y, bt, dt, {o.batch_size, o.seq_len});
  if (!o.doc_boundaries) return py::make_tuple(x, y, py::none(), py::none(), py::none());
  at::Tensor pos = view(bytes, L.positions, bt, dt, {o.batch_size, o.seq_len});
  at::Tensor cu = view(bytes, L.cu_seqlens, batch.n_segments + 1, at::kInt, {batch.n_segments + 1});
  return py::make_tuple(x, y, pos, cu, batch.max_seqlen);
}

// The blend's phases from parallel lists (phase k starts at phase_starts[k] with phase_weights[k]).
std::vector<BlendPhase> make_phases(const std::vector<uint64_t>& phase_starts,
                                    const std::vector<std::vector<double>>& phase_weights) {
  if (phase_starts.size() != phase_weights.size())
    throw std::invalid_argument("phase_starts and phase_weights need one entry per phase, got " +
                                std::to_string(phase_starts.size()) + " and " +
                                std::to_string(phase_weights.size()));
  std::vector<BlendPhase> phases;
  for (size_t k = 0; k < phase_starts.size(); ++k)
    phases.push_back(BlendPhase{phase_starts[k], phase_weights[k]});
  return phases;
}

}  // namespace

void register_loader(py::module_& m) {
  // ShardError (C++) -> fmcore.data.shards.ShardError (a ValueError), looked up when first raised.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ShardError& e) {
      py::object cls;
      try {
        cls = py::module_::import("fmcore.data.shards").attr("ShardError");
      } catch (py::error_already_set&) {
        PyErr_SetString(PyExc_ValueError, e.what());
        return;
      }
      PyErr_SetString(cls.ptr(), e.what());
    }
  });

  py::class_<Loader>(m, "TokenLoader", "C++ token loader core; use fmcore.data.Loader.")
      .def(py::init([](std::vector<std::string> paths, int64_t batch_size, int64_t seq_len,
                       const std::string& mode, uint64_t seed, int64_t rank, int64_t world_size,
                       int threads, int prefetch, bool doc_boundaries, int out_bytes,
                       bool check_vocab, uint32_t vocab_size, int64_t eos_id, bool verify,
                       uint64_t start_sample, bool pin_memory, std::vector<uint32_t> source_shards,
                       std::vector<uint64_t> phase_starts,
                       std::vector<std::vector<double>> phase_weights) {
             LoaderOptions o;
             o.paths = std::move(paths);
             o.batch_size = batch_size;
             o.seq_len = seq_len;
             o.mode = parse_mode(mode);
             o.seed = seed;
             o.rank = rank;
             o.world_size = world_size;
             o.threads = threads;
             o.prefetch = prefetch;
             o.doc_boundaries = doc_boundaries;
             o.out_bytes = out_bytes;
             o.check_vocab = check_vocab;
             o.vocab_size = vocab_size;
             o.eos_id = eos_id;
             o.verify = verify;
             o.start_sample = start_sample;
             o.source_shards = std::move(source_shards);
             o.phases = make_phases(phase_starts, phase_weights);
             Allocator alloc = [pin_memory](size_t nbytes) {
               auto t = std::make_shared<at::Tensor>(
                   at::empty({static_cast<int64_t>(nbytes)},
                             at::TensorOptions().dtype(at::kByte).pinned_memory(pin_memory)));
               return HostBuffer{t->data_ptr(), t};
             };
             py::gil_scoped_release nogil;  // opening (and checksumming) shards can take a while
             return std::make_unique<Loader>(std::move(o), std::move(alloc));
           }),
           py::arg("paths"), py::arg("batch_size"), py::arg("seq_len"), py::arg("mode"),
           py::arg("seed"), py::arg("rank"), py::arg("world_size"), py::arg("threads"),
           py::arg("prefetch"), py::arg("doc_boundaries"), py::arg("out_bytes"),
           py::arg("check_vocab"), py::arg("vocab_size"), py::arg("eos_id"), py::arg("verify"),
           py::arg("start_sample"), py::arg("pin_memory"),
           py::arg("source_shards") = std::vector<uint32_t>{},
           py::arg("phase_starts") = std::vector<uint64_t>{},
           py::arg("phase_weights") = std::vector<std::vector<double>>{})
      .def("next",
           [](Loader& self) {
             Batch b;
             try {
               py::gil_scoped_release nogil;
               // Signals are checked while waiting: Python runs its handlers between bytecodes, so
               // Ctrl-C waited for the batch (on slow storage, as long as it took), then dropped it.
               b = self.next([] {
                 py::gil_scoped_acquire gil;
                 return PyErr_CheckSignals() != 0;
               });
             } catch (const Loader::Interrupted&) {
               throw py::error_already_set();  // the handler's exception (KeyboardInterrupt)
             }
             return batch_tensors(self, std::move(b));
           })
      .def("close", &Loader::close, py::call_guard<py::gil_scoped_release>())
      .def(
          "restart",
          [](Loader& self, uint64_t start_sample, const std::vector<uint64_t>& phase_starts,
             const std::vector<std::vector<double>>& phase_weights) {
            std::vector<BlendPhase> phases = make_phases(phase_starts, phase_weights);
            py::gil_scoped_release nogil;
            self.restart(start_sample, std::move(phases));
          },
          py::arg("start_sample"), py::arg("phase_starts") = std::vector<uint64_t>{},
          py::arg("phase_weights") = std::vector<std::vector<double>>{})
      .def_property_readonly("next_sample", &Loader::next_sample)
      .def_property_readonly("wait_seconds", &Loader::wait_seconds)
      .def_property_readonly("windows_per_epoch",
                             [](const Loader& self) { return self.plan().windows_per_epoch(); })
      .def(
          "epoch_order",
          [](const Loader& self, uint64_t epoch, size_t source) {
            if (source >= self.plan().num_sources())
              throw py::index_error("source " + std::to_string(source) + " of " +
                                    std::to_string(self.plan().num_sources()));
            return self.plan().source(source).epoch_order(epoch);
          },
          py::arg("epoch"), py::arg("source") = 0)
      // The blend (blend.h): the source of each slot of the (last phase's) period; (source, its
      // sample) of global sample g; each source's samples among the global samples [0, g); each
      // source's own epoch.
      .def_property_readonly(
          "blend_table",
          [](const Loader& self) { return self.plan().table(self.plan().num_phases() - 1); })
      .def("pick",
           [](const Loader& self, uint64_t g) {
             const BlendPlan::Pick p = self.plan().pick(g);
             return py::make_tuple(p.source, p.sample);
           })
      .def("source_samples",
           [](const Loader& self, uint64_t g) {
             std::vector<uint64_t> out;
             for (size_t s = 0; s < self.plan().num_sources(); ++s)
               out.push_back(self.plan().samples_before(static_cast<uint32_t>(s), g));
             return out;
           })
      .def_property_readonly("source_windows_per_epoch",
                             [](const Loader& self) {
                               std::vector<uint64_t> out;
                               for (size_t s = 0; s < self.plan().num_sources(); ++s)
                                 out.push_back(self.plan().source(s).windows_per_epoch());
                               return out;
                             })
      .def("shard_infos", [](const Loader& self) {
        py::list out;
        for (size_t k = 0; k < self.num_shards(); ++k) {
          const ShardInfo& i = self.shard(k).info();
          py::dict d;
          d["path"] = i.path;
          d["kind"] = i.llmc ? "llmc" : "fmcore";
          d["tokens"] = i.n_tokens;
          d["documents"] = i.n_docs;
          d["vocab_size"] = i.vocab_size;
          d["eos_id"] = i.eos_id == kNoEos ? py::object(py::none()) : py::int_(i.eos_id);
          out.append(d);
        }
        return out;
      });
}

}  // namespace fmcore::data
