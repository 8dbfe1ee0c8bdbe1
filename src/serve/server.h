// server.h: the OpenAI-compatible HTTP server (docs/SERVING.md) over the serving engine.
//
// cpp-httplib serves HTTP on a pool of worker threads; one engine thread owns the Engine
// (serve/engine.h) and runs its steps while any request is live. A request is parsed and validated on
// its worker thread (bad input: an OpenAI-style JSON error, HTTP 400), handed to the engine thread
// through a queue, and its tokens come back through the request's own channel: a blocking wait for a
// plain response, server-sent events for "stream": true. A client that goes away mid-stream cancels its
// sequence (its KV blocks go back to the pool). stop() (SIGINT/SIGTERM in `lmforge serve`) refuses
// new requests, lets the live ones finish, and returns from run().
//
// Endpoints: POST /v1/completions, GET /v1/models, GET /health, GET /metrics (Prometheus text).
#pragma once
#include <cstddef>
#include <functional>
#include <memory>
#include <string>

#include "data/tokenizer.h"
#include "serve/engine.h"

namespace lmf {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8000;                   // 0: any free port (run()'s callback gets the one bound)
  std::string model_name = "lmforge";
  int threads = 128;                 // HTTP worker threads; each open request holds one
  size_t max_waiting = 4096;         // requests waiting for the engine beyond this get HTTP 503
  std::string chat_template;         // the model's Jinja chat template (/v1/chat/completions); "" when none
};

class Server {
 public:
  Server(Engine& engine, const Tokenizer& tok, const ServerOptions& o);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds (throws one line naming host:port when it cannot), then serves until stop(); on_listening
  // gets the bound port. Returns after the live requests have finished.
  void run(const std::function<void(int port)>& on_listening = nullptr);
  // Thread-safe and async-signal-unsafe (call it from a normal thread): stop accepting, drain, return.
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace lmf
