"""End-to-end tests of `lmforge serve` on the CPU: a real server process with a tiny trained model,
real clients (OpenAI's Python package and curl). Run by CTest (tests/CMakeLists.txt), one test per
method; LMF_BINARY names the lmforge binary.

What they check: completions (text and token-id prompts) equal `lmforge generate` greedy output;
streaming (server-sent events) equals the plain response; 32 concurrent requests all answered, a
seeded request's text independent of the others; stop strings; logprobs; bad requests get HTTP 400
with OpenAI's error object; a client that disconnects mid-stream frees its sequence; SIGTERM drains
the live requests and exits 0. Chat completions through the model's own template (a tiny Qwen2
directory, and SmolLM2's GGUF where scripts/fetch_smollm2.sh has fetched it) equal `generate --chat`.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.request

try:
    import openai
except ImportError:  # loud: the test needs the client (scripts/install_deps.sh installs it)
    sys.exit("openai is not installed: run scripts/install_deps.sh (it creates third_party/venv)")

BINARY = os.environ.get("LMF_BINARY", "build/lmforge")
MODEL = "run"


def train_checkpoint(root):
    out = os.path.join(root, MODEL)
    subprocess.run([BINARY, "train", "--preset", "tiny", "--steps", "3", "--out-dir", out],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


class ServerProcess:
    """`lmforge serve` on a free port; stdout's "listening on" line gives the port."""

    def __init__(self, checkpoint, *flags):
        self.proc = subprocess.Popen([BINARY, "serve", "--checkpoint", checkpoint, "--port", "0", *flags],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        m = re.search(r"listening on http://([\d.]+):(\d+)", line)
        if not m:
            self.proc.kill()
            raise RuntimeError("server did not start: " + line + self.proc.stderr.read())
        self.base = f"http://{m.group(1)}:{m.group(2)}"
        self.port = int(m.group(2))

    def client(self):
        return openai.OpenAI(base_url=self.base + "/v1", api_key="none", max_retries=0, timeout=120)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.returncode


def curl(url, *args):
    """(HTTP status, body) of a curl call."""
    r = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", url, *args], capture_output=True, text=True, timeout=120)
    body, _, code = r.stdout.rpartition("\n")
    return int(code), body


def metrics(base):
    text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


class Serve(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.ckpt = train_checkpoint(cls.tmp.name)
        cls.server = ServerProcess(cls.ckpt, "--max-seqs", "8", "--max-prefill-tokens", "64")
        cls.client = cls.server.client()

    @classmethod
    def tearDownClass(cls):
        code = cls.server.stop()
        cls.tmp.cleanup()
        assert code == 0, f"the server exited with {code}"

    def generate(self, prompt, n):
        r = subprocess.run([BINARY, "generate", "--checkpoint", self.ckpt, "--prompt", prompt, "--max-new-tokens",
                            str(n), "--temperature", "0", "--device", "cpu"], capture_output=True, check=True)
        return r.stdout.decode("utf-8", "replace")[len(prompt):].rstrip("\n")

    def test_completion_equals_generate(self):
        r = self.client.completions.create(model=MODEL, prompt="And God said", max_tokens=24, temperature=0)
        self.assertEqual(r.choices[0].finish_reason, "length")
        self.assertEqual(r.usage.completion_tokens, 24)
        self.assertEqual(r.usage.prompt_tokens, len("And God said"))
        self.assertEqual(r.choices[0].text, self.generate("And God said", 24))
        # the same prompt as token ids (the byte tokenizer: ids are bytes)
        ids = list("And God said".encode())
        r2 = self.client.completions.create(model=MODEL, prompt=ids, max_tokens=24, temperature=0)
        self.assertEqual(r2.choices[0].text, r.choices[0].text)
        # echo puts the prompt in front
        r3 = self.client.completions.create(model=MODEL, prompt="And God said", max_tokens=24, temperature=0, echo=True)
        self.assertEqual(r3.choices[0].text, "And God said" + r.choices[0].text)

    def test_streaming_equals_plain(self):
        plain = self.client.completions.create(model=MODEL, prompt="In the beginning", max_tokens=30, temperature=0)
        chunks = list(self.client.completions.create(model=MODEL, prompt="In the beginning", max_tokens=30,
                                                     temperature=0, stream=True))
        self.assertEqual("".join(c.choices[0].text for c in chunks), plain.choices[0].text)
        self.assertEqual(chunks[-1].choices[0].finish_reason, "length")
        self.assertTrue(all(c.choices[0].finish_reason is None for c in chunks[:-1]))
        # the raw stream ends with [DONE] (curl)
        code, body = curl(self.server.base + "/v1/completions", "-N", "-d",
                          json.dumps({"model": MODEL, "prompt": "In", "max_tokens": 3, "stream": True}))
        self.assertEqual(code, 200)
        self.assertTrue(body.rstrip().endswith("data: [DONE]"), body)

    def test_32_concurrent_requests(self):
        results, errors = {}, []

        def one(i):
            try:
                r = self.client.completions.create(model=MODEL, prompt="And it came to pass " * (1 + i % 3),
                                                   max_tokens=8 + i, temperature=0.9, top_p=0.95, seed=1000 + i)
                results[i] = r
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertEqual(sorted(results), list(range(32)))
        for i, r in results.items():
            self.assertEqual(r.usage.completion_tokens, 8 + i)
        # request 7 alone: the same text (its draws depend on its seed and positions only)
        alone = self.client.completions.create(model=MODEL, prompt="And it came to pass " * 2, max_tokens=15,
                                               temperature=0.9, top_p=0.95, seed=1007)
        self.assertEqual(alone.choices[0].text, results[7].choices[0].text)
        m = metrics(self.server.base)
        self.assertEqual(m["lmforge_kv_blocks_used"], 0)

    def test_stop_strings_and_logprobs(self):
        full = self.client.completions.create(model=MODEL, prompt="And God said", max_tokens=40, temperature=0).choices[0].text
        stop = full[5:7]
        r = self.client.completions.create(model=MODEL, prompt="And God said", max_tokens=40, temperature=0, stop=[stop])
        self.assertEqual(r.choices[0].finish_reason, "stop")
        self.assertEqual(r.choices[0].text, full[:full.index(stop)])
        chunks = list(self.client.completions.create(model=MODEL, prompt="And God said", max_tokens=40, temperature=0,
                                                     stop=stop, stream=True))
        self.assertEqual("".join(c.choices[0].text for c in chunks), r.choices[0].text)
        self.assertEqual(chunks[-1].choices[0].finish_reason, "stop")
        lp = self.client.completions.create(model=MODEL, prompt="And God", max_tokens=5, temperature=0, logprobs=3)
        L = lp.choices[0].logprobs
        self.assertEqual(len(L.tokens), 5)
        self.assertEqual(len(L.top_logprobs[0]), 3)
        for tok, tlp, top in zip(L.tokens, L.token_logprobs, L.top_logprobs):
            self.assertLess(tlp, 0)
            self.assertAlmostEqual(max(top.values()), tlp, places=5)  # greedy: the chosen token is the top one

    def test_bad_requests(self):
        url = self.server.base + "/v1/completions"
        cases = {
            "malformed": "{not json",
            "unknown model": json.dumps({"model": "nope", "prompt": "a"}),
            "too long": json.dumps({"model": MODEL, "prompt": "a" * 200, "max_tokens": 4}),
            "max_tokens 0": json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 0}),
            "max_tokens string": json.dumps({"model": MODEL, "prompt": "a", "max_tokens": "ten"}),
            "temperature": json.dumps({"model": MODEL, "prompt": "a", "temperature": -1}),
            "top_p": json.dumps({"model": MODEL, "prompt": "a", "top_p": 1.5}),
            "stream type": json.dumps({"model": MODEL, "prompt": "a", "stream": "yes"}),
            "unknown field": json.dumps({"model": MODEL, "prompt": "a", "frobnicate": 1}),
            "empty prompt": json.dumps({"model": MODEL, "prompt": ""}),
            "token out of range": json.dumps({"model": MODEL, "prompt": [1, 99999]}),
            "logprobs": json.dumps({"model": MODEL, "prompt": "a", "logprobs": 99}),
            "not an object": "[1, 2]",
            "nested 30000 deep": json.dumps({"model": MODEL, "prompt": "a"})[:-1] + ', "user": ' + "[" * 30000 + "]" * 30000 + "}",
            "max_tokens beyond int64": json.dumps({"model": MODEL, "prompt": "a"})[:-1] + ', "max_tokens": 18446744073709551615}',
            "temperature beyond a float": json.dumps({"model": MODEL, "prompt": "a", "temperature": 1e300}),
        }
        for name, body in cases.items():
            code, text = curl(url, "-H", "Content-Type: application/json", "-d", body)
            self.assertEqual(code, 400, f"{name}: {text}")
            err = json.loads(text)["error"]
            self.assertEqual(err["type"], "invalid_request_error", name)
            self.assertTrue(err["message"], name)
        with self.assertRaises(openai.BadRequestError):
            self.client.completions.create(model=MODEL, prompt="a", max_tokens=-3)
        code, _ = curl(self.server.base + "/nope")
        self.assertEqual(code, 404)
        code, body = curl(self.server.base + "/health")
        self.assertEqual((code, json.loads(body)["status"]), (200, "ok"))
        models = self.client.models.list()
        self.assertEqual([m.id for m in models.data], [MODEL])
        # the server is still fine
        r = self.client.completions.create(model=MODEL, prompt="a", max_tokens=2)
        self.assertEqual(r.usage.completion_tokens, 2)

    def test_disconnect_mid_stream_frees_the_sequence(self):
        before = metrics(self.server.base).get('lmforge_requests_finished_total{reason="cancelled"}', 0)
        body = json.dumps({"model": MODEL, "prompt": "And", "max_tokens": 120, "stream": True}).encode()
        s = socket.create_connection(("127.0.0.1", self.server.port), timeout=30)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" +
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        got = b""
        while got.count(b"data:") < 3:
            got += s.recv(4096)
        s.close()
        deadline = time.time() + 30
        while time.time() < deadline:
            m = metrics(self.server.base)
            if m['lmforge_requests_finished_total{reason="cancelled"}'] > before and m["lmforge_kv_blocks_used"] == 0 \
                    and m["lmforge_requests_running"] == 0:
                break
            time.sleep(0.1)
        else:
            self.fail(f"the disconnected request still holds its sequence: {m}")



ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QWEN2 = os.path.join(ROOT, "tests", "fixtures", "hf", "qwen2")  # a tiny random Qwen2 with tokenizer + chat template
SMOLLM2 = os.path.join(ROOT, "third_party", "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # scripts/fetch_smollm2.sh


class Chat(unittest.TestCase):
    """/v1/chat/completions: the model's own chat template (a Hugging Face directory served directly)."""

    @classmethod
    def setUpClass(cls):
        cls.server = ServerProcess(QWEN2, "--max-seqs", "4", "--model-name", "qwen2")
        cls.client = cls.server.client()

    @classmethod
    def tearDownClass(cls):
        code = cls.server.stop()
        assert code == 0, f"the server exited with {code}"

    def generate_chat(self, model, prompt, n, system=None):
        cmd = [BINARY, "generate", "--checkpoint", model, "--chat", "--prompt", prompt, "--max-new-tokens", str(n),
               "--temperature", "0", "--device", "cpu"] + (["--system", system] if system else [])
        return subprocess.run(cmd, capture_output=True, check=True).stdout.decode("utf-8", "replace").rstrip("\n")

    def test_chat_equals_generate_chat(self):
        # (the tiny model's context is 48 tokens, its vocabulary nearly bytes: short messages)
        msgs = [{"role": "system", "content": "Hi."}, {"role": "user", "content": "Red?"}]
        r = self.client.chat.completions.create(model="qwen2", messages=msgs, max_tokens=6, temperature=0)
        self.assertEqual(r.object, "chat.completion")
        self.assertEqual(r.choices[0].message.role, "assistant")
        self.assertIn(r.choices[0].finish_reason, ("length", "stop"))
        self.assertEqual(r.choices[0].message.content, self.generate_chat(QWEN2, "Red?", 6, "Hi."))
        # content as a list of text parts is the same conversation
        parts = [msgs[0], {"role": "user", "content": [{"type": "text", "text": "Re"}, {"type": "text", "text": "d?"}]}]
        r2 = self.client.chat.completions.create(model="qwen2", messages=parts, max_tokens=6, temperature=0)
        self.assertEqual(r2.choices[0].message.content, r.choices[0].message.content)

    def test_chat_streaming_and_logprobs(self):
        msgs = [{"role": "user", "content": "Say something."}]
        plain = self.client.chat.completions.create(model="qwen2", messages=msgs, max_tokens=10, temperature=0,
                                                    logprobs=True, top_logprobs=2)
        lp = plain.choices[0].logprobs.content
        self.assertEqual(len(lp), plain.usage.completion_tokens)
        self.assertTrue(all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in lp))
        chunks = list(self.client.chat.completions.create(model="qwen2", messages=msgs, max_tokens=10, temperature=0,
                                                          stream=True))
        self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
        self.assertEqual("".join(c.choices[0].delta.content or "" for c in chunks), plain.choices[0].message.content)
        self.assertEqual(chunks[-1].choices[0].finish_reason, plain.choices[0].finish_reason)
        self.assertTrue(all(c.object == "chat.completion.chunk" for c in chunks))

    def test_chat_bad_requests(self):
        def post(body):
            return curl(self.server.base + "/v1/chat/completions", "-d", json.dumps(body))
        for body, word in [({"model": "qwen2"}, "messages"), ({"model": "qwen2", "messages": []}, "messages"),
                           ({"model": "qwen2", "messages": [{"content": "x"}]}, "role"),
                           ({"model": "qwen2", "messages": [{"role": "user", "content": 5}]}, "content"),
                           ({"model": "qwen2", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "logprobs"),
                           ({"model": "qwen2", "messages": [{"role": "user", "content": "x"}], "prompt": "x"}, "prompt")]:
            code, text = post(body)
            self.assertEqual(code, 400, text)
            self.assertIn(word, json.loads(text)["error"]["message"], text)

    @unittest.skipUnless(os.path.exists(SMOLLM2), "SmolLM2 GGUF absent: run scripts/fetch_smollm2.sh")
    def test_smollm2_answers_through_its_template(self):
        server = ServerProcess(SMOLLM2, "--max-seqs", "2", "--model-name", "smol")
        try:
            r = server.client().chat.completions.create(
                model="smol", messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=32, temperature=0)
            self.assertIn("Paris", r.choices[0].message.content)
            self.assertEqual(r.choices[0].finish_reason, "stop")  # it ends its turn with <|im_end|>
            self.assertEqual(r.choices[0].message.content,
                             self.generate_chat(SMOLLM2, "What is the capital of France?", 32))
        finally:
            self.assertEqual(server.stop(), 0)


class Shutdown(unittest.TestCase):
    def test_sigterm_drains_live_requests(self):
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = train_checkpoint(tmp)
            srv = ServerProcess(ckpt)
            client = srv.client()
            # a streamed request: SIGTERM right after its first token; it must still get all 120
            stream = client.completions.create(model=MODEL, prompt="And", max_tokens=120, temperature=0, stream=True)
            chunks = []
            for c in stream:
                if not chunks:
                    srv.proc.send_signal(signal.SIGTERM)
                chunks.append(c)
            self.assertEqual(chunks[-1].choices[0].finish_reason, "length")
            self.assertEqual(sum(1 for c in chunks if c.choices[0].finish_reason is None), 120)
            self.assertEqual(srv.proc.wait(timeout=60), 0)


if __name__ == "__main__":
    unittest.main()
