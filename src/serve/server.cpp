// server.cpp: the OpenAI-compatible HTTP server (server.h).
//
// Threads: cpp-httplib's workers run the handlers; one engine thread owns the Engine. They meet in
// two places: the engine's inbox (adds and cancels, under `mu`) and each request's Channel (its
// events, under the channel's own mutex). Handlers never touch the Engine except Engine::problem(),
// which reads only what never changes after set-up.
#include "serve/server.h"

#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <iostream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>
#include <vector>

#include "core/check.h"
#include "serve/request.h"
#include "serve/text_stream.h"

namespace lmf {

namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// --- errors ------------------------------------------------------------------------------------

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

void send_error(httplib::Response& res, const HttpError& e) {
  json err = {{"message", e.message}, {"type", e.type}, {"param", e.param.empty() ? json() : json(e.param)},
              {"code", json()}};
  res.status = e.status;
  res.set_content(dump(json{{"error", err}}), "application/json");
}

// --- the engine thread's side ------------------------------------------------------------------

// One request's events, from the engine thread to its handler.
struct Channel {
  std::mutex m;
  std::condition_variable cv;
  std::deque<EngineEvent> events;
  std::string error;  // the engine failed this request
  bool closed = false;
  // Waits up to `timeout` for events; moves them out. False when nothing came.
  bool wait(std::deque<EngineEvent>& out, std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lk(m);
    cv.wait_for(lk, timeout, [&] { return !events.empty() || closed; });
    if (events.empty()) return false;
    out.swap(events);
    events.clear();
    return true;
  }
};

// Prometheus histogram with fixed buckets (seconds).
struct Histogram {
  std::vector<double> bounds{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
  std::vector<uint64_t> counts = std::vector<uint64_t>(bounds.size() + 1, 0);
  double sum = 0;
  uint64_t n = 0;
  void observe(double v) {
    size_t i = 0;
    while (i < bounds.size() && v > bounds[i]) ++i;
    ++counts[i];
    sum += v;
    ++n;
  }
  void write(std::ostringstream& o, const char* name, const char* help) const {
    o << "# HELP " << name << " " << help << "\n# TYPE " << name << " histogram\n";
    uint64_t cum = 0;
    for (size_t i = 0; i < bounds.size(); ++i) {
      cum += counts[i];
      o << name << "_bucket{le=\"" << bounds[i] << "\"} " << cum << "\n";
    }
    o << name << "_bucket{le=\"+Inf\"} " << n << "\n" << name << "_sum " << sum << "\n" << name << "_count " << n << "\n";
  }
};

}  // namespace

struct Server::Impl {
  Engine& engine;
  const Tokenizer& tok;
  ServerOptions opt;
  httplib::Server http;
  std::thread engine_thread;
  std::atomic<bool> draining{false};
  std::atomic<int64_t> next_id{1};
  std::atomic<int64_t> live{0};  // requests between admission and their last byte

  // the engine's inbox and state (mu)
  std::mutex mu;
  std::condition_variable cv;
  struct Add {
    int64_t id;
    std::vector<int32_t> prompt;
    RequestParams rp;
    std::shared_ptr<Channel> ch;
  };
  std::vector<Add> adds;
  std::vector<int64_t> cancels;
  bool quit = false;
  // metrics (mu)
  EngineStats stats;
  size_t inbox_waiting = 0;
  std::map<std::string, uint64_t> finished;  // by reason: length, stop, cancelled, error
  uint64_t bad_requests = 0;
  Histogram ttft, tpot;
  std::deque<std::pair<Clock::time_point, int64_t>> rate;  // (time, generated tokens so far) over 10 s

  CompletionLimits limits;  // what parse_completion checks requests against
  std::unique_ptr<ChatTemplate> chat;  // parsed once; null when the model has none or it does not parse
  std::string chat_problem;            // why /v1/chat/completions is refused when chat is null

  Impl(Engine& e, const Tokenizer& t, const ServerOptions& o)
      : engine(e), tok(t), opt(o),
        limits{o.model_name, e.config().vocab_size, e.options().max_top_logprobs,
               [&e](const std::vector<int32_t>& prompt, const RequestParams& rp) { return e.problem(prompt, rp); }} {
    if (o.chat_template.empty()) {
      chat_problem = "this model has no chat template; use /v1/completions";
      return;
    }
    try {
      chat = std::make_unique<ChatTemplate>(o.chat_template);
    } catch (const Error& err) {  // the server still serves completions
      chat_problem = std::string("this model's chat template is not supported (") + err.what() + "); use /v1/completions";
      std::cerr << "[serve] warning: " << chat_problem << "\n";
    }
  }

  void engine_loop();
  void submit(Add a) {
    {
      std::lock_guard<std::mutex> lk(mu);
      adds.push_back(std::move(a));
    }
    cv.notify_one();
  }
  void cancel(int64_t id) {
    {
      std::lock_guard<std::mutex> lk(mu);
      cancels.push_back(id);
    }
    cv.notify_one();
  }
  void count_finished(const std::string& reason) {
    std::lock_guard<std::mutex> lk(mu);
    ++finished[reason];
  }
  void observe(Clock::time_point start, Clock::time_point first, int64_t tokens) {
    std::lock_guard<std::mutex> lk(mu);
    ttft.observe(std::chrono::duration<double>(first - start).count());
    if (tokens > 1) tpot.observe(seconds_since(first) / static_cast<double>(tokens - 1));
  }

  void handle_completion(const httplib::Request& req, httplib::Response& res, bool chat_endpoint);
  void routes();
  std::string metrics_text();
};

void Server::Impl::engine_loop() {
  std::map<int64_t, std::shared_ptr<Channel>> channels;
  auto close = [&](int64_t id, const std::string& error) {
    auto it = channels.find(id);
    if (it == channels.end()) return;
    {
      std::lock_guard<std::mutex> lk(it->second->m);
      it->second->closed = true;
      it->second->error = error;
    }
    it->second->cv.notify_all();
    channels.erase(it);
  };
  for (;;) {
    {
      std::unique_lock<std::mutex> lk(mu);
      cv.wait(lk, [&] { return quit || !adds.empty() || !cancels.empty() || !engine.idle(); });
      for (int64_t id : cancels) {
        engine.cancel(id);
        close(id, "");
      }
      cancels.clear();
      for (Add& a : adds) {
        try {
          engine.add(a.id, std::move(a.prompt), a.rp);
          channels[a.id] = a.ch;
        } catch (const std::exception& e) {
          channels[a.id] = a.ch;
          close(a.id, e.what());
        }
      }
      adds.clear();
      if (quit && engine.idle()) return;
    }
    std::vector<EngineEvent> events;
    try {
      events = engine.step();
    } catch (const std::exception& e) {  // never crash: fail the live requests, keep serving
      std::vector<int64_t> ids;
      for (auto& kv : channels) ids.push_back(kv.first);
      for (int64_t id : ids) {
        engine.cancel(id);
        close(id, std::string("the engine failed: ") + e.what());
      }
      continue;
    }
    {  // the stats before the events go out: a client that has its answer sees its blocks freed
      std::lock_guard<std::mutex> lk(mu);
      stats = engine.stats();
      rate.emplace_back(Clock::now(), stats.generated_tokens);
      while (rate.size() > 2 && seconds_since(rate.front().first) > 10) rate.pop_front();
    }
    for (EngineEvent& e : events) {
      auto it = channels.find(e.id);
      if (it == channels.end()) continue;
      const bool done = e.finish != FinishReason::none;
      {
        std::lock_guard<std::mutex> lk(it->second->m);
        it->second->events.push_back(std::move(e));
      }
      it->second->cv.notify_all();
      if (done) close(it->first, "");
    }
  }
}

void Server::Impl::handle_completion(const httplib::Request& req, httplib::Response& res, bool chat_endpoint) {
  const Clock::time_point start = Clock::now();
  if (draining) {
    send_error(res, {503, "the server is shutting down", "", "server_error"});
    return;
  }
  Completion c;
  try {
    if (chat_endpoint && !chat) throw bad_request(chat_problem);
    c = chat_endpoint ? parse_chat_completion(req.body, limits, tok, *chat) : parse_completion(req.body, limits, tok);
  } catch (const HttpError& e) {
    {
      std::lock_guard<std::mutex> lk(mu);
      ++bad_requests;
    }
    send_error(res, e);
    return;
  }
  {
    std::lock_guard<std::mutex> lk(mu);
    if (stats.waiting + adds.size() >= opt.max_waiting) {
      send_error(res, {503, "too many requests are waiting (" + std::to_string(opt.max_waiting) + "); retry later", "",
                       "server_error"});
      return;
    }
  }
  const int64_t id = next_id.fetch_add(1);
  const std::string cmpl_id = (c.chat ? "chatcmpl-" : "cmpl-") + std::to_string(id);
  const int64_t created = std::chrono::duration_cast<std::chrono::seconds>(
                              std::chrono::system_clock::now().time_since_epoch()).count();
  auto ch = std::make_shared<Channel>();
  ++live;
  submit({id, c.prompt, c.rp, ch});

  // One token's log-probabilities: the completions format ({tokens, token_logprobs, top_logprobs,
  // text_offset}, one entry each) or the chat one ({token, logprob, bytes, top_logprobs: [...]}).
  const bool chat_format = c.chat;
  auto logprob_json = [this, chat_format](const EngineEvent& e, const std::string& text, size_t offset) {
    if (chat_format) {
      auto item = [](const std::string& t, float lp) {
        return json{{"token", t}, {"logprob", lp}, {"bytes", std::vector<int>(t.begin(), t.end())}};
      };
      json one = item(text, e.out.logprob);
      one["top_logprobs"] = json::array();
      for (const auto& [t, lp] : e.out.top) one["top_logprobs"].push_back(item(token_text(tok, t), lp));
      return one;
    }
    json top = json::object();
    for (const auto& [t, lp] : e.out.top) top[token_text(tok, t)] = lp;
    return json{{"tokens", {text}}, {"token_logprobs", {e.out.logprob}}, {"top_logprobs", {top}}, {"text_offset", {offset}}};
  };

  if (!c.stream) {
    TextStream ts(tok, c.stops);
    std::string text = c.echo ? c.prompt_text : "";
    json lp = c.chat ? json{{"content", json::array()}}
                     : json{{"tokens", json::array()}, {"token_logprobs", json::array()}, {"top_logprobs", json::array()},
                            {"text_offset", json::array()}};
    std::string reason;
    int64_t n = 0;
    Clock::time_point first;
    std::deque<EngineEvent> events;
    while (reason.empty()) {
      if (!ch->wait(events, std::chrono::milliseconds(100))) {
        std::lock_guard<std::mutex> lk(ch->m);
        if (ch->closed && ch->events.empty()) reason = ch->error.empty() ? "cancelled" : "error";
        continue;
      }
      for (const EngineEvent& e : events) {
        if (n++ == 0) first = Clock::now();
        const size_t offset = text.size();
        text += ts.push(e.out.token);
        if (c.logprobs >= 0) {
          const json one = logprob_json(e, ts.token_text(e.out.token), offset);
          if (c.chat) lp["content"].push_back(one);
          else for (const char* k : {"tokens", "token_logprobs", "top_logprobs", "text_offset"}) lp[k].push_back(one[k][0]);
        }
        if (ts.stopped()) {
          reason = "stop";
          cancel(id);
          break;
        }
        if (e.finish != FinishReason::none) reason = finish_reason_name(e.finish);
      }
      events.clear();
    }
    text += ts.finish();
    --live;
    if (reason == "error" || reason == "cancelled") {
      count_finished(reason);
      std::lock_guard<std::mutex> lk(ch->m);
      send_error(res, {500, ch->error.empty() ? "the request was cancelled" : ch->error, "", "server_error"});
      return;
    }
    count_finished(reason);
    if (n > 0) observe(start, first, n);
    const int64_t pt = static_cast<int64_t>(c.prompt.size());
    json choice = {{"index", 0}, {"text", text}, {"logprobs", c.logprobs >= 0 ? lp : json()}, {"finish_reason", reason}};
    if (c.chat) {
      choice.erase("text");
      choice["message"] = {{"role", "assistant"}, {"content", text}};
    }
    json body = {{"id", cmpl_id},
                 {"object", c.chat ? "chat.completion" : "text_completion"},
                 {"created", created},
                 {"model", opt.model_name},
                 {"choices", json::array({choice})},
                 {"usage", {{"prompt_tokens", pt}, {"completion_tokens", n}, {"total_tokens", pt + n}}}};
    res.set_content(dump(body), "application/json");
    return;
  }

  // streaming: server-sent events, one chunk per token (text held back by stop strings / UTF-8 may
  // come later), then a chunk with the finish reason, then [DONE]
  struct StreamState {
    TextStream ts;
    std::string reason;
    int64_t n = 0;
    size_t offset = 0;
    bool echoed = false, done = false, role_sent = false;
    Clock::time_point first;
  };
  auto st = std::make_shared<StreamState>(StreamState{TextStream(tok, c.stops), "", 0, 0, false, false, false, {}});
  const bool echo = c.echo;
  const std::string prompt_text = c.prompt_text;
  const int64_t logprobs = c.logprobs;
  res.set_header("Cache-Control", "no-cache");
  res.set_chunked_content_provider(
      "text/event-stream",
      [this, st, ch, id, cmpl_id, created, echo, prompt_text, logprobs, start, logprob_json, chat_format](
          size_t, httplib::DataSink& sink) {
        auto chunk = [&](const std::string& text, const json& lp, const json& reason) {
          json choice = {{"index", 0}, {"text", text}, {"logprobs", lp}, {"finish_reason", reason}};
          if (chat_format) {  // a delta; the first one names the role; the last one (a reason) carries no text
            choice.erase("text");
            json delta = json::object();
            if (!st->role_sent) delta["role"] = "assistant";
            st->role_sent = true;
            if (!text.empty() || reason.is_null()) delta["content"] = text;
            choice["delta"] = delta;
            if (!lp.is_null()) choice["logprobs"] = json{{"content", json::array({lp})}};
          }
          const std::string data = "data: " + dump(json{{"id", cmpl_id},
                                                        {"object", chat_format ? "chat.completion.chunk" : "text_completion"},
                                                        {"created", created},
                                                        {"model", opt.model_name},
                                                        {"choices", json::array({choice})}}) + "\n\n";
          return sink.write(data.data(), data.size());
        };
        if (st->done) return false;
        if (echo && !st->echoed) {
          st->echoed = true;
          st->offset = prompt_text.size();
          if (!chunk(prompt_text, json(), json())) return false;
        }
        std::deque<EngineEvent> events;
        if (!ch->wait(events, std::chrono::milliseconds(100))) {
          bool closed;
          std::string error;
          {
            std::lock_guard<std::mutex> lk(ch->m);
            closed = ch->closed && ch->events.empty();
            error = ch->error;
          }
          if (!closed) return sink.is_writable();  // nothing yet: keep the connection while the client is there
          st->reason = error.empty() ? "cancelled" : "error";
          const std::string data = "data: " + dump(json{{"error", {{"message", error.empty() ? "cancelled" : error},
                                                                   {"type", "server_error"}}}}) + "\n\ndata: [DONE]\n\n";
          sink.write(data.data(), data.size());
          st->done = true;
          sink.done();
          return true;
        }
        for (const EngineEvent& e : events) {
          if (st->n++ == 0) st->first = Clock::now();
          const std::string piece = st->ts.push(e.out.token);
          json lp;
          if (logprobs >= 0) lp = logprob_json(e, st->ts.token_text(e.out.token), st->offset);
          st->offset += piece.size();
          if (st->ts.stopped()) {
            st->reason = "stop";
            cancel(id);
          } else if (e.finish != FinishReason::none) {
            st->reason = finish_reason_name(e.finish);
          }
          if (!chunk(piece, lp, json())) return false;  // the client went away: the releaser cancels
          if (!st->reason.empty()) break;
        }
        if (st->reason.empty()) return true;
        const std::string rest = st->ts.finish();
        if (!chunk(rest, json(), st->reason)) return false;
        const std::string done = "data: [DONE]\n\n";
        sink.write(done.data(), done.size());
        st->done = true;
        sink.done();
        return true;
      },
      [this, st, id, start](bool) {
        if (st->reason.empty()) {  // the client disconnected before the end: free the sequence
          cancel(id);
          st->reason = "cancelled";
        } else if (st->n > 0 && st->reason != "error" && st->reason != "cancelled") {
          observe(start, st->first, st->n);
        }
        count_finished(st->reason);
        --live;
      });
}

std::string Server::Impl::metrics_text() {
  std::lock_guard<std::mutex> lk(mu);
  std::ostringstream o;
  auto gauge = [&](const char* name, const char* help, double v, const char* type = "gauge") {
    o << "# HELP " << name << " " << help << "\n# TYPE " << name << " " << type << "\n" << name << " " << v << "\n";
  };
  gauge("lmforge_requests_running", "Sequences the engine is computing.", static_cast<double>(stats.running));
  gauge("lmforge_requests_waiting", "Requests waiting for a sequence slot or KV blocks.",
        static_cast<double>(stats.waiting + adds.size()));
  gauge("lmforge_kv_blocks_used", "KV-cache blocks held by sequences.",
        static_cast<double>(stats.blocks_total - stats.blocks_free));
  gauge("lmforge_kv_blocks_total", "KV-cache blocks in the pool.", static_cast<double>(stats.blocks_total));
  double tps = 0;
  if (rate.size() >= 2) {
    const double dt = std::chrono::duration<double>(rate.back().first - rate.front().first).count();
    if (dt > 0) tps = static_cast<double>(rate.back().second - rate.front().second) / dt;
  }
  gauge("lmforge_generation_tokens_per_second", "Generated tokens per second over the last 10 s.", tps);
  gauge("lmforge_generation_tokens_total", "Tokens generated.", static_cast<double>(stats.generated_tokens), "counter");
  gauge("lmforge_prompt_tokens_total", "Prompt tokens admitted.", static_cast<double>(stats.prompt_tokens), "counter");
  gauge("lmforge_engine_steps_total", "Engine steps run.", static_cast<double>(stats.steps), "counter");
  gauge("lmforge_preemptions_total", "Sequences preempted for KV blocks (recomputed later).",
        static_cast<double>(stats.preemptions), "counter");
  gauge("lmforge_bad_requests_total", "Requests refused with HTTP 400.", static_cast<double>(bad_requests), "counter");
  o << "# HELP lmforge_requests_finished_total Requests finished, by reason.\n"
    << "# TYPE lmforge_requests_finished_total counter\n";
  for (const char* r : {"length", "stop", "cancelled", "error"})
    o << "lmforge_requests_finished_total{reason=\"" << r << "\"} " << (finished.count(r) ? finished.at(r) : 0) << "\n";
  ttft.write(o, "lmforge_time_to_first_token_seconds", "Time from a request's arrival to its first token.");
  tpot.write(o, "lmforge_time_per_output_token_seconds", "Mean time per output token after the first, per request.");
  return o.str();
}

void Server::Impl::routes() {
  http.new_task_queue = [this] { return new httplib::ThreadPool(static_cast<size_t>(std::max(opt.threads, 4))); };
  for (const bool chat_endpoint : {false, true})
    http.Post(chat_endpoint ? "/v1/chat/completions" : "/v1/completions",
              [this, chat_endpoint](const httplib::Request& req, httplib::Response& res) {
                try {
                  handle_completion(req, res, chat_endpoint);
                } catch (const std::exception& e) {  // never crash on a request
                  send_error(res, {500, std::string("internal error: ") + e.what(), "", "server_error"});
                }
              });
  http.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
    json m = {{"id", opt.model_name}, {"object", "model"}, {"created", 0}, {"owned_by", "lmforge"},
              {"max_model_len", engine.config().context_length},
              {"batch_invariant", engine.options().batch_invariant}};
    res.set_content(dump(json{{"object", "list"}, {"data", json::array({m})}}), "application/json");
  });
  http.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    res.status = draining ? 503 : 200;
    res.set_content(draining ? "{\"status\":\"draining\"}" : "{\"status\":\"ok\"}", "application/json");
  });
  http.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(metrics_text(), "text/plain; version=0.0.4");
  });
  http.set_error_handler([](const httplib::Request&, httplib::Response& res) {
    if (!res.body.empty()) return;
    const bool not_found = res.status == 404;
    send_error(res, {res.status, not_found ? "no such endpoint" : "HTTP error " + std::to_string(res.status), "",
                     "invalid_request_error"});
  });
  http.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string what = "unknown";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    send_error(res, {500, "internal error: " + what, "", "server_error"});
  });
  http.set_payload_max_length(16 << 20);
}

Server::Server(Engine& engine, const Tokenizer& tok, const ServerOptions& o)
    : impl_(std::make_unique<Impl>(engine, tok, o)) {
  impl_->routes();
}

Server::~Server() {
  stop();
  if (impl_->engine_thread.joinable()) {
    {
      std::lock_guard<std::mutex> lk(impl_->mu);
      impl_->quit = true;
    }
    impl_->cv.notify_all();
    impl_->engine_thread.join();
  }
}

void Server::run(const std::function<void(int port)>& on_listening) {
  Impl& s = *impl_;
  int port = s.opt.port;
  if (port == 0) port = s.http.bind_to_any_port(s.opt.host);
  else if (!s.http.bind_to_port(s.opt.host, port)) port = -1;
  if (port < 0) fail("cannot listen on ", s.opt.host, ":", s.opt.port, " (in use, or not an address of this host)");
  s.stats = s.engine.stats();
  s.engine_thread = std::thread([&s] { s.engine_loop(); });
  if (on_listening) on_listening(port);
  s.http.listen_after_bind();
  // stop() was called: the listener is closed; let the live requests finish, then the engine thread
  while (s.live > 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  {
    std::lock_guard<std::mutex> lk(s.mu);
    s.quit = true;
  }
  s.cv.notify_all();
  s.engine_thread.join();
}

void Server::stop() {
  Impl& s = *impl_;
  if (s.draining.exchange(true)) return;
  // let the requests in flight finish before the listener goes (new ones get 503 meanwhile)
  for (int i = 0; i < 6000 && s.live > 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  s.http.stop();
}

}  // namespace lmf
