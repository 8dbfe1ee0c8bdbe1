// module.cpp: lmforge._core, the Python extension over the engine (nanobind). python/lmforge/ wraps
// it in the typed public API (docs/PYTHON.md); this file only adapts types, threads and errors:
// - errors: lmf::Error -> ValueError (bad input), FileNotFoundError (a missing path), RuntimeError (a
//   broken invariant, a device failure), with the CLI's one-line message;
// - the GIL is released while the engine works (loading, scoring, generating, training steps);
//   generation checks for Ctrl-C between engine steps, training runs on its own thread and stops at a
//   step boundary with a checkpoint (Trainer::Hooks);
// - text out of the engine is bytes that may end inside a UTF-8 character: it becomes str with
//   U+FFFD for invalid bytes, as bytes.decode("utf-8", "replace").
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <exception>
#include <iostream>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <streambuf>
#include <string>
#include <thread>
#include <vector>

#include "core/check.h"
#include "core/device.h"
#include "data/tokenizer.h"
#include "model/config.h"
#include "model/score.h"
#include "ops/sampling.h"
#include "serve/engine.h"
#include "serve/offline.h"
#include "serve/served_model.h"
#include "train/trainer.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace lmf {
namespace {

// bytes -> str, invalid UTF-8 as U+FFFD
nb::str py_text(const std::string& s) {
  PyObject* o = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "replace");
  if (!o) throw nb::python_error();
  return nb::steal<nb::str>(o);
}

// A (rows, cols) float32 NumPy array that owns `v`.
nb::ndarray<nb::numpy, float, nb::ndim<2>> numpy_2d(std::vector<float>&& v, size_t rows, size_t cols) {
  auto* heap = new std::vector<float>(std::move(v));
  nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
  return nb::ndarray<nb::numpy, float, nb::ndim<2>>(heap->data(), {rows, cols}, owner);
}

// Asked between engine steps with the GIL released: a pending Ctrl-C (or any signal handler that
// raised) ends the call; its Python exception is left set for the caller to raise.
struct SignalCheck {
  bool raised = false;
  bool operator()() {
    nb::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) raised = true;
    return raised;
  }
};

// ---------------------------------------------------------------------------------------------------
// Tokenizer

struct PyTokenizer {
  std::shared_ptr<const Tokenizer> tok;

  std::vector<int32_t> encode(const std::string& text) const {
    nb::gil_scoped_release nogil;
    return tok->encode(text);
  }
  std::vector<std::vector<int32_t>> encode_batch(const std::vector<std::string>& texts, int threads) const {
    if (threads < 0 || threads > 1024) fail("threads=", threads, " must be in [0, 1024] (0: one per core)");
    nb::gil_scoped_release nogil;
    std::vector<std::vector<int32_t>> out(texts.size());
    const size_t n = texts.size();
    const size_t workers =
        std::max<size_t>(1, std::min<size_t>(n, threads > 0 ? static_cast<size_t>(threads)
                                                            : std::max(1u, std::thread::hardware_concurrency())));
    std::atomic<size_t> next{0};
    std::exception_ptr err;
    std::mutex err_mu;
    auto work = [&] {
      for (size_t i; (i = next.fetch_add(1)) < n;) {
        try {
          out[i] = tok->encode(texts[i]);
        } catch (...) {
          std::lock_guard<std::mutex> lk(err_mu);
          if (!err) err = std::current_exception();
        }
      }
    };
    std::vector<std::thread> pool;
    for (size_t w = 1; w < workers; ++w) pool.emplace_back(work);
    work();
    for (std::thread& t : pool) t.join();
    if (err) std::rethrow_exception(err);
    return out;
  }
  std::string decode_bytes(const std::vector<int32_t>& ids) const {
    for (size_t i = 0; i < ids.size(); ++i)
      if (ids[i] < 0 || ids[i] >= tok->vocab_size())
        fail("decode: token ", ids[i], " (position ", i, ") is outside the vocabulary [0, ", tok->vocab_size(), ")");
    return tok->decode(ids);
  }
};

// ---------------------------------------------------------------------------------------------------
// Model: weights on a device, its tokenizer, the serving engine (built on first use) and the scorer

struct PyModel {
  ServedModel m;
  std::shared_ptr<const Tokenizer> tok;
  int32_t max_seqs = 32;
  std::unique_ptr<Engine> engine;  // planned for engine_seqs sequences
  int32_t engine_seqs = 0;
  std::unique_ptr<SequenceScorer> scorer;
  std::string scorer_precision;
  bool batch_invariant = false;  // lmforge.load(batch_invariant=...): the engine's and the scorer's plans
  std::mutex mu;  // one engine call at a time (Python threads may share a Model)

  Engine& engine_for(int32_t seqs) {
    if (!engine || engine_seqs != seqs) {
      engine.reset();  // one KV pool at a time
      EngineOptions eo;
      eo.max_seqs = seqs;
      // as `lmforge generate`: a single prompt runs through the very engine the CLI plans
      eo.max_prefill_tokens = std::min<int64_t>(m.cfg.context_length, 512);
      eo.max_top_logprobs = 20;
      eo.batch_invariant = batch_invariant;
      engine = std::make_unique<Engine>(m.cfg, *m.params, eo);
      engine_seqs = seqs;
    }
    return *engine;
  }
  SequenceScorer& scorer_for(const std::string& precision) {
    if (!scorer || scorer_precision != precision) {
      scorer.reset();
      scorer = std::make_unique<SequenceScorer>(m.cfg, *m.params, precision, batch_invariant);
      scorer_precision = precision;
    }
    return *scorer;
  }
};

std::unique_ptr<PyModel> load_model(const std::string& path, const std::string& device, const std::string& tokenizer,
                                    bool allow_nonfinite, int32_t max_seqs, bool batch_invariant) {
  if (max_seqs < 1 || max_seqs > 1024) fail("max_seqs=", max_seqs, " must be in [1, 1024]");
  auto pm = std::make_unique<PyModel>();
  {
    nb::gil_scoped_release nogil;
    pm->m = load_served_model(path, device, allow_nonfinite, tokenizer);
  }
  pm->tok = std::shared_ptr<const Tokenizer>(std::move(pm->m.tok));
  pm->max_seqs = max_seqs;
  pm->batch_invariant = batch_invariant;
  return pm;
}

nb::list generate(PyModel& pm, const std::vector<std::vector<int32_t>>& prompts, int64_t max_tokens, float temperature,
                  float top_p, int32_t top_k, const std::vector<uint64_t>& seeds, const std::vector<std::string>& stop,
                  bool stop_at_end_token, int64_t top_logprobs) {
  if (prompts.empty()) return nb::list();
  if (seeds.size() != prompts.size()) fail("seeds: ", seeds.size(), " seeds for ", prompts.size(), " prompts");
  std::vector<OfflineRequest> reqs(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    OfflineRequest& r = reqs[i];
    r.prompt = prompts[i];
    r.params.sample = SampleParams{temperature, top_k, top_p, 0, seeds[i], 0};
    r.params.max_tokens = max_tokens;
    r.params.top_logprobs = top_logprobs;
    if (stop_at_end_token) r.params.stop_tokens = pm.tok->end_tokens();
    r.stops = stop;
  }
  if (const std::string sp = sample_params_problem(reqs[0].params.sample); !sp.empty()) fail(sp);
  std::vector<OfflineResult> results;
  SignalCheck check;
  try {
    nb::gil_scoped_release nogil;
    std::lock_guard<std::mutex> lk(pm.mu);
    Engine& engine = pm.engine_for(prompts.size() == 1 ? 1 : pm.max_seqs);
    results = generate_offline(engine, *pm.tok, reqs, [&] { return check(); });
  } catch (const Error&) {
    if (check.raised) throw nb::python_error();  // the KeyboardInterrupt
    throw;
  }
  nb::list out;
  for (const OfflineResult& r : results) {
    nb::list top;
    for (const auto& one : r.top) top.append(nb::cast(one));
    out.append(nb::make_tuple(py_text(r.text), r.tokens, r.logprobs, r.finish_reason, top));
  }
  return out;
}

nb::object logprobs(PyModel& pm, const std::vector<std::vector<int32_t>>& rows, const std::string& precision) {
  std::vector<float> host;
  size_t B = rows.size(), T = rows.empty() ? 0 : rows[0].size() - (rows[0].empty() ? 0 : 1);
  void* dev = nullptr;
  {
    nb::gil_scoped_release nogil;
    std::lock_guard<std::mutex> lk(pm.mu);
    SequenceScorer& s = pm.scorer_for(precision);
    if (const std::string why = s.problem(rows); !why.empty()) fail(why);
    if (s.device() == Device::cpu) {
      host = s.logprobs(rows);
    } else {  // a device buffer handed to PyTorch through DLPack, freed by its capsule
      dev = device_alloc(B * T * sizeof(float), "logprobs");
      try {
        s.logprobs_into(rows, Tensor(dev, DType::f32, {static_cast<int64_t>(B * T)}, "logprobs", Device::cuda));
        device_synchronize();  // the values are final when PyTorch (on its own stream) reads them
      } catch (...) {
        device_free(dev);
        throw;
      }
    }
  }
  if (!dev) return nb::cast(numpy_2d(std::move(host), B, T));
  nb::capsule owner(dev, [](void* p) noexcept { device_free(p); });
  const size_t shape[2] = {B, T};
  return nb::cast(nb::ndarray<nb::pytorch, float, nb::ndim<2>, nb::device::cuda>(dev, 2, shape, owner, nullptr,
                                                                                   nb::dtype<float>(),
                                                                                   nb::device::cuda::value, 0));
}

// ---------------------------------------------------------------------------------------------------
// Training: a Trainer driven on its own thread, in step with its consumer like a Python generator:
// at the end of each step (Trainer::Hooks::stop_requested) the trainer waits until every record has
// been taken and someone waits in next() for more -- or until stop() or save() is asked. So nothing
// trains between two next() calls, save() checkpoints the step of the last record taken, and a run
// whose consumer went away (an exception in the loop body) sits at a step boundary, where stop() or
// the handle's destruction checkpoints it.

class NullBuf : public std::streambuf {
 protected:
  int overflow(int c) override { return c; }
};

struct TrainRun {
  NullBuf null_buf;
  std::ostream null_log{&null_buf};
  std::unique_ptr<Trainer> trainer;
  std::thread thread;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::string> records;
  bool started = false, finished = false;
  bool consumer_waiting = false;  // a next() call waits for a record
  std::exception_ptr error;
  std::atomic<bool> stop_flag{false};
  int64_t saves_asked = 0, saves_done = 0;
  std::string last_checkpoint;

  TrainRun(const std::string& options_json, const std::vector<std::string>& given, bool verbose) {
    TrainOptions o;
    o.progress = false;  // a notebook's stderr is no terminal to redraw
    o.apply_json(options_json, {}, "train() argument");
    if (!o.resume.empty()) restore_run_options(o, given);
    std::ostream& log = verbose ? std::cout : null_log;
    nb::gil_scoped_release nogil;
    trainer = std::make_unique<Trainer>(o, log);
    Trainer::Hooks h;
    h.on_metric = [this](const std::string& line) {
      std::lock_guard<std::mutex> lk(mu);
      records.push_back(line);
      cv.notify_all();
    };
    h.stop_requested = [this] {
      std::unique_lock<std::mutex> lk(mu);
      cv.wait(lk, [this] { return (records.empty() && consumer_waiting) || stop_flag.load() || saves_asked > saves_done; });
      return stop_flag.load();
    };
    h.save_requested = [this] {
      std::lock_guard<std::mutex> lk(mu);
      return saves_asked > saves_done;
    };
    h.on_saved = [this](const std::string& dir) {
      std::lock_guard<std::mutex> lk(mu);
      last_checkpoint = dir;
      saves_done = saves_asked;
      cv.notify_all();
    };
    trainer->set_hooks(std::move(h));
  }
  ~TrainRun() {
    request_stop();
    if (thread.joinable()) {
      nb::gil_scoped_release nogil;
      thread.join();
    }
  }

  void request_stop() {
    std::lock_guard<std::mutex> lk(mu);
    stop_flag = true;
    cv.notify_all();
  }

  void start() {
    std::lock_guard<std::mutex> lk(mu);
    if (started) return;
    started = true;
    thread = std::thread([this] {
      std::exception_ptr err;
      try {
        trainer->run();
      } catch (...) {
        err = std::current_exception();
      }
      std::lock_guard<std::mutex> lk2(mu);
      error = err;
      finished = true;
      cv.notify_all();
    });
  }

  // (0, record) | (1, None) on timeout | (2, None) when the run is over (its error raised once here)
  std::pair<int, std::optional<std::string>> next(double timeout_s) {
    start();
    std::unique_lock<std::mutex> lk(mu, std::defer_lock);
    {
      nb::gil_scoped_release nogil;
      lk.lock();
      if (records.empty()) {
        consumer_waiting = true;
        cv.notify_all();  // the trainer goes on
        cv.wait_for(lk, std::chrono::duration<double>(std::max(0.0, timeout_s)),
                    [this] { return !records.empty() || finished; });
        consumer_waiting = false;
      }
    }
    if (!records.empty()) {
      std::string r = std::move(records.front());
      records.pop_front();
      return {0, std::move(r)};
    }
    if (!finished) return {1, std::nullopt};
    if (error) {
      std::exception_ptr e = error;
      error = nullptr;
      lk.unlock();
      if (thread.joinable()) thread.join();
      std::rethrow_exception(e);
    }
    lk.unlock();
    if (thread.joinable()) thread.join();
    return {2, std::nullopt};
  }

  // A checkpoint now: at the next step boundary while the run is going, at once otherwise.
  std::string save() {
    std::unique_lock<std::mutex> lk(mu);
    if (!started || finished) {
      lk.unlock();
      nb::gil_scoped_release nogil;
      const std::string dir = trainer->save();
      std::lock_guard<std::mutex> lk2(mu);
      last_checkpoint = dir;
      return dir;
    }
    const int64_t want = ++saves_asked;
    cv.notify_all();
    {
      nb::gil_scoped_release nogil;
      cv.wait(lk, [&] { return saves_done >= want || finished; });
    }
    if (saves_done < want) fail("save: the run ended before it could save (", trainer->step_count(), " steps)");
    return last_checkpoint;
  }
};

void register_errors() {
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const Error& e) {
      PyObject* type = e.kind == Error::Kind::not_found ? PyExc_FileNotFoundError
                       : e.kind == Error::Kind::input   ? PyExc_ValueError
                                                        : PyExc_RuntimeError;
      PyErr_SetString(type, e.what());
    }
  });
}

}  // namespace
}  // namespace lmf

NB_MODULE(_core, mod) {
  using namespace lmf;
  mod.doc() = "lmforge's engine (the typed API is the lmforge package; this module is its implementation)";
  mod.attr("__version__") = LMF_VERSION;
  register_errors();
  mod.def("cuda_built", &cuda_built, "True when this build has the CUDA backend");
  mod.def("cuda_device_count", &cuda_device_count, "GPUs this process can use (0 without CUDA)");
  mod.def("config_preset", [](const std::string& name) { return config_to_json(config_preset(name)); }, "name"_a,
          "a preset model config as JSON text");
  mod.def("config_preset_names", &config_preset_names);
  mod.def("train_defaults", [] { return TrainOptions().to_json(); }, "the train flags' defaults as JSON text");

  nb::class_<PyTokenizer>(mod, "Tokenizer")
      .def("__init__",
           [](PyTokenizer* self, const std::string& name_or_path) {
             new (self) PyTokenizer{std::shared_ptr<const Tokenizer>(make_tokenizer(name_or_path))};
           },
           "name_or_path"_a)
      .def_prop_ro("name", [](const PyTokenizer& t) { return std::string(t.tok->name()); })
      .def_prop_ro("vocab_size", [](const PyTokenizer& t) { return t.tok->vocab_size(); })
      .def("encode", &PyTokenizer::encode, "text"_a)
      .def("encode_batch", &PyTokenizer::encode_batch, "texts"_a, "threads"_a = 0)
      .def("decode", [](const PyTokenizer& t, const std::vector<int32_t>& ids) { return py_text(t.decode_bytes(ids)); },
           "ids"_a)
      .def("decode_bytes", [](const PyTokenizer& t, const std::vector<int32_t>& ids) {
             const std::string s = t.decode_bytes(ids);
             return nb::bytes(s.data(), s.size());
           }, "ids"_a)
      .def("special_prefix", [](const PyTokenizer& t) { return t.tok->special_prefix(); })
      .def("end_tokens", [](const PyTokenizer& t) { return t.tok->end_tokens(); })
      .def("is_special", [](const PyTokenizer& t, int32_t id) { return t.tok->is_special(id); }, "id"_a)
      .def("token_id", [](const PyTokenizer& t, const std::string& text) { return t.tok->token_id(text); }, "text"_a);

  nb::class_<PyModel>(mod, "Model")
      .def_prop_ro("path", [](const PyModel& p) { return p.m.dir; })
      .def_prop_ro("source", [](const PyModel& p) { return p.m.what; })
      .def_prop_ro("device", [](const PyModel& p) { return std::string(device_name(p.m.params->device())); })
      .def_prop_ro("config_json", [](const PyModel& p) { return config_to_json(p.m.cfg); })
      .def_prop_ro("chat_template", [](const PyModel& p) { return p.m.assets.chat_template; })
      .def_prop_ro("load_seconds", [](const PyModel& p) { return p.m.load_seconds; })
      .def_prop_ro("summary", [](const PyModel& p) {
        return model_summary(p.m.cfg, !p.m.assets.tokenizer_json.empty(), !p.m.assets.chat_template.empty());
      })
      .def("tokenizer", [](const PyModel& p) { return PyTokenizer{p.tok}; })
      .def("logprobs", &logprobs, "rows"_a, "precision"_a = "auto")
      .def("generate", &generate, "prompts"_a, "max_tokens"_a, "temperature"_a, "top_p"_a, "top_k"_a, "seeds"_a,
           "stop"_a, "stop_at_end_token"_a, "top_logprobs"_a);
  mod.def("load", &load_model, "path"_a, "device"_a = "auto", "tokenizer"_a = "auto", "allow_nonfinite"_a = false,
          "max_seqs"_a = 32, "batch_invariant"_a = false);

  nb::class_<TrainRun>(mod, "TrainRun")
      .def(nb::init<const std::string&, const std::vector<std::string>&, bool>(), "options_json"_a, "given"_a,
           "verbose"_a)
      .def("next", &TrainRun::next, "timeout_s"_a)
      .def("stop", &TrainRun::request_stop)
      .def("save", &TrainRun::save)
      .def_prop_ro("step", [](const TrainRun& r) { return r.trainer->step_count(); })
      .def_prop_ro("stopped_early", [](const TrainRun& r) { return r.trainer->stopped_early(); })
      .def_prop_ro("options_json", [](const TrainRun& r) { return r.trainer->options().to_json(); })
      .def_prop_ro("last_checkpoint", [](TrainRun& r) {
        std::lock_guard<std::mutex> lk(r.mu);
        return r.last_checkpoint;
      })
      .def("losses", [](TrainRun& r) {
        {
          std::lock_guard<std::mutex> lk(r.mu);
          if (r.started && !r.finished) fail("losses: the run is still going (iterate it or call wait() first)");
        }
        return r.trainer->losses();
      });
}
