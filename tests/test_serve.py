"""The OpenAI-compatible server end to end: the official `openai` client against a server started here on a free
127.0.0.1 port (tiny Llama, two adapters), plus the engine's adapter eviction and a real `qlora-kit serve` process
drained by SIGTERM. Greedy completions must equal `qlora-kit generate` however the requests were batched."""

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
import uvicorn
from safetensors.torch import load_file

from qlora_kit.adapters import adapter_names, save_adapter
from qlora_kit.cli import main
from qlora_kit.engine import Engine, Finished, Sampling, Sequence
from qlora_kit.generate import Request, generate, render
from qlora_kit.loader import load_quantized
from qlora_kit.lora import LoraConfig, lora_parameters
from qlora_kit.serve import Server, build_app
from qlora_kit.traces import TraceLog

from conftest import REPO, make_tokenizer

KEY = "test-key"
PROMPTS = ["the user asks", "Below is an instruction", "answers the assistant and", "x"]
BOUND_S = 20  # every wait below gives up after this long


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, llama_dir):
    """A model directory with a tokenizer, and two PEFT adapters on it with different ranks and targets."""
    root = tmp_path_factory.mktemp("serve")
    model_dir = root / "tiny"
    model_dir.mkdir()
    for f in llama_dir.iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    make_tokenizer().save_pretrained(model_dir)
    adapters = {}
    configs = {"a": LoraConfig(r=4, alpha=8), "b": LoraConfig(r=2, alpha=8, target_modules=["q_proj", "down_proj"])}
    for seed, (name, lora) in enumerate(configs.items()):
        model = load_quantized(model_dir, lora=lora)
        torch.manual_seed(seed)
        for key, p in lora_parameters(model).items():
            torch.nn.init.normal_(p, std=0.3 if ".lora_B." in key else 0.1)
        save_adapter(model, root / name, lora, str(model_dir))
        adapters[name] = root / name
    return model_dir, adapters


def _socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held until uvicorn takes it: no race with other tests
    return sock


class Running:
    """A server on a thread; `stop()` asks uvicorn to drain and exit, as a signal would."""

    def __init__(self, model_dir, adapters, trace: Path | None = None, **app) -> None:
        # fp32 compute: in bf16, rounding that differs between batch shapes flips near-tied argmaxes of this
        # random-weight model within a few tokens; the bf16 server is compared to `qlora-kit generate` alone below
        self.model = load_quantized(model_dir, dtype=torch.float32).eval()
        self.tokenizer = make_tokenizer()
        self.engine = Engine(self.model, self.tokenizer, max_batch=8)
        for name, path in adapters.items():
            self.engine.register(name, path).result()
        self.traces = TraceLog(trace) if trace else None
        app = build_app(Server(self.engine, model_dir.name, root=str(model_dir), traces=self.traces), **app)
        sock = _socket()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + BOUND_S
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(BOUND_S)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def server(workspace, tmp_path_factory):
    model_dir, adapters = workspace
    running = Running(model_dir, adapters, trace=tmp_path_factory.mktemp("trace") / "trace.jsonl", api_key=KEY)
    yield running
    running.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=BOUND_S)


def _post(url: str, body: bytes | dict, key: str | None = KEY) -> tuple[int, dict | str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=BOUND_S) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def _requests(server, jobs) -> list[Request]:
    """`qlora_kit.generate`'s requests for (prompt, adapter, chat endpoint) jobs, rendered as the server does."""
    out = []
    for prompt, adapter, chat in jobs:
        text, templated = render(server.tokenizer, {"prompt": prompt}) if chat else (prompt, False)
        out.append(Request(text, adapter, templated))
    return out


def test_models_lists_the_base_and_every_adapter(client, workspace):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny", "a", "b"}
    assert models["a"].parent == "tiny" and models["a"].root == str(workspace[1]["a"])


def test_concurrent_mixed_adapter_requests_equal_generate_alone(server, client):
    """Both endpoints, three adapters (base included), sent at once, more than --max-batch: they decode together
    (peak batch > 1), late ones join a running batch, and every greedy text equals `qlora-kit generate`'s, both
    for all of them in its one batched pass and for a request generated alone (fp32 compute, see `Running`)."""
    jobs = [(p, a, chat) for p in PROMPTS[:2] for a in ("a", "b", None) for chat in (False, True)]
    requests = _requests(server, jobs)
    expected = generate(server.model, server.tokenizer, requests, max_new_tokens=8)
    assert [generate(server.model, server.tokenizer, [r], max_new_tokens=8)[0] for r in requests[:3]] == expected[:3]

    def ask(job):
        prompt, adapter, chat = job
        model = adapter or "tiny"
        if chat:
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=8, temperature=0)
            return r.choices[0].message.content, r.usage
        r = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
        return r.choices[0].text, r.usage

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(ask, jobs))
    assert [text for text, _ in got] == expected
    assert server.engine.peak_batch > 1
    assert all(0 < u.completion_tokens <= 8 and u.total_tokens == u.prompt_tokens + u.completion_tokens
               for _, u in got)
    assert len(set(expected)) > 2  # the adapters really change the output


def test_chat_equals_the_generate_command(server, client, workspace, tmp_path, capsys):
    model_dir, adapters = workspace
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:2]))
    argv = ["generate", str(model_dir), "--file", str(prompts), "--max-new-tokens", "8"]
    assert main(argv + [f"--adapter={n}={d}" for n, d in adapters.items()]) == 0
    lines = capsys.readouterr().out.splitlines()
    for i, prompt in enumerate(PROMPTS[:2]):
        for name in adapters:
            r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=8, temperature=0)
            assert f"[{i + 1}/{name}] {r.choices[0].message.content.strip()}" in lines


def test_streaming_sends_openai_chunks_ending_with_done(server, client):
    kwargs = dict(max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(model="a", prompt="the user asks", **kwargs).choices[0].text
    chunks = list(client.completions.create(model="a", prompt="the user asks", stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    chat = list(client.chat.completions.create(model="b", messages=[{"role": "user", "content": "hi"}], stream=True,
                                               stream_options={"include_usage": True}, **kwargs))
    assert chat[0].choices[0].delta.role == "assistant"
    assert chat[-2].choices[0].finish_reason == "length" and chat[-1].usage.completion_tokens == 12
    text = "".join(c.choices[0].delta.content or "" for c in chat if c.choices)
    assert text == client.chat.completions.create(model="b", messages=[{"role": "user", "content": "hi"}],
                                                  **kwargs).choices[0].message.content
    raw = urllib.request.Request(server.url + "/completions", json.dumps(
        {"model": "a", "prompt": "hi", "max_tokens": 2, "stream": True}).encode(),
        {"content-type": "application/json", "authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(raw, timeout=BOUND_S) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.read().decode().rstrip().endswith("data: [DONE]")


def test_stop_seed_and_n(client):
    base = dict(model="a", prompt="the user asks", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**base).choices[0].text
    stop = whole[3:5]
    cut = client.completions.create(**base, stop=[stop]).choices[0]
    assert cut.text == whole[:whole.index(stop)] and cut.finish_reason == "stop"
    sampled = dict(base, temperature=1.0, top_p=0.9, seed=7, n=2)
    one, two = (client.completions.create(**sampled).choices for _ in range(2))
    assert [c.text for c in one] == [c.text for c in two]  # a seed makes sampling reproducible
    assert one[0].text != one[1].text  # the n choices are different samples


def test_load_and_unload_adapters_at_runtime(server, client, workspace, tmp_path):
    _, adapters = workspace
    url = server.url
    assert _post(url + "/load_lora_adapter", {"lora_name": "c", "lora_path": str(adapters["a"])})[0] == 200
    same = [client.completions.create(model=m, prompt="hi", max_tokens=6, temperature=0).choices[0].text
            for m in ("a", "c")]
    assert same[0] == same[1] and "c" in {m.id for m in client.models.list().data}
    status, body = _post(url + "/load_lora_adapter", {"lora_name": "c", "lora_path": str(adapters["b"])})
    assert status == 400 and "already loaded" in body["error"]["message"]
    assert _post(url + "/unload_lora_adapter", {"lora_name": "c"})[0] == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="c", prompt="hi", max_tokens=2)
    assert _post(url + "/unload_lora_adapter", {"lora_name": "c"})[0] == 404
    # an adapter that fails to load is refused with the reason; the others keep serving
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapters["a"] / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes((adapters["a"] / "adapter_model.safetensors").read_bytes()[:60])
    for path, reason in ((broken, "corrupt or truncated"), (tmp_path / "nope", "no such adapter directory")):
        status, body = _post(url + "/load_lora_adapter", {"lora_name": "d", "lora_path": str(path)})
        assert status == 400 and reason in body["error"]["message"] and body["error"]["param"] == "lora_path"
    assert "d" not in adapter_names(server.model)
    assert client.completions.create(model="a", prompt="hi", max_tokens=6, temperature=0).choices[0].text == same[0]


_LONG = "the user asks " * 800
BAD_REQUESTS = {  # id -> (route, body, status, param)
    "unknown-model": ("completions", {"model": "zz", "prompt": "hi"}, 404, "model"),
    "malformed-json": ("completions", b'{"model": "a", "prompt": ', 400, None),
    "not-an-object": ("completions", b'["a"]', 400, None),
    "missing-prompt": ("completions", {"model": "a"}, 400, "prompt"),
    "prompt-type": ("completions", {"model": "a", "prompt": 3}, 400, "prompt"),
    "max-tokens-string": ("completions", {"model": "a", "prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    "max-tokens-zero": ("completions", {"model": "a", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    "max-tokens-negative": ("chat/completions", {"model": "a", "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": -1}, 400, "max_tokens"),
    "temperature-type": ("completions", {"model": "a", "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    "top-p-range": ("completions", {"model": "a", "prompt": "hi", "top_p": 0}, 400, "top_p"),
    "stream-type": ("completions", {"model": "a", "prompt": "hi", "stream": "yes"}, 400, "stream"),
    "stop-type": ("completions", {"model": "a", "prompt": "hi", "stop": 5}, 400, "stop"),
    "prompt-too-long": ("completions", {"model": "a", "prompt": _LONG}, 400, "prompt"),
    "completion-too-long": ("completions", {"model": "a", "prompt": "hi", "max_tokens": 4096}, 400, "max_tokens"),
    "messages-empty": ("chat/completions", {"model": "a", "messages": []}, 400, "messages"),
    "message-content-type": ("chat/completions", {"model": "a", "messages": [{"role": "user", "content": 5}]},
                             400, "messages[0].content"),
    "message-role": ("chat/completions", {"model": "a", "messages": [{"role": "wizard", "content": "x"}]},
                     400, "messages[0].role"),
    "chat-too-long": ("chat/completions", {"model": "a", "messages": [{"role": "user", "content": _LONG}]},
                      400, "messages"),
    "load-missing-path": ("load_lora_adapter", {"lora_name": "x"}, 400, "lora_path"),
    "unload-unknown": ("unload_lora_adapter", {"lora_name": "zz"}, 404, "lora_name"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_get_an_openai_error_naming_the_field(server, client, case):
    route, body, status, param = BAD_REQUESTS[case]
    got, reply = _post(f"{server.url}/{route}", body)
    assert got == status, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["param"] == param
    assert param is None or reply["error"]["message"].startswith(param) or param == "model"
    assert client.completions.create(model="b", prompt="hi", max_tokens=1).usage.completion_tokens == 1


def test_api_key_is_checked_on_every_request(server):
    for key in (None, "wrong"):
        for route in ("/models", "/completions", "/load_lora_adapter"):
            status, body = _post(server.url + route, {"model": "a", "prompt": "hi"}, key=key)
            assert status == 401 and body["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list()


def test_a_client_leaving_mid_stream_frees_its_slot(server, client):
    stream = client.completions.create(model="a", prompt="hi", max_tokens=2000, stream=True, temperature=0,
                                       extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    deadline = time.monotonic() + BOUND_S
    while server.engine.busy():
        assert time.monotonic() < deadline, "the abandoned sequence is still decoding"
        time.sleep(0.02)
    while not (cancelled := [json.loads(line) for line in server.traces.path.read_text().splitlines()
                             if "cancelled" in line]):  # traced on the event loop, just after the row is freed
        assert time.monotonic() < deadline, "the abandoned stream was not traced"
        time.sleep(0.02)
    assert len(cancelled) == 1 and cancelled[0]["completion_tokens"] < 200
    assert client.completions.create(model="a", prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_traces_one_line_per_request_and_their_summary(server, client, tmp_path, capsys):
    for model in ("a", "b", "tiny"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    records = [json.loads(line) for line in server.traces.path.read_text().splitlines()]
    labels = {r["adapter"] or "(base)" for r in records}
    assert labels >= {"a", "b", "(base)"}
    assert {"time", "adapter", "prompt_tokens", "completion_tokens", "queue_s", "ttft_s", "latency_s",
            "tokens_per_s", "finish_reason"} <= records[-1].keys() and "prompt" not in records[-1]
    assert all(r["latency_s"] >= r["ttft_s"] >= r["queue_s"] >= 0 for r in records
               if r["choices"] == 1 and r["ttft_s"] is not None)
    png = tmp_path / "t.png"
    assert main(["traces", str(server.traces.path), "--png", str(png)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["adapter", "requests"] and png.stat().st_size > 1000
    rows = {line.split()[0]: line.split() for line in out[2:]}
    assert set(rows) == labels
    for label, row in rows.items():
        mine = [r for r in records if (r["adapter"] or "(base)") == label]
        assert int(row[1]) == len(mine) and int(row[-2]) == sum(r["completion_tokens"] for r in mine)
        assert int(row[-1]) == sum(r["finish_reason"] not in ("stop", "length") for r in mine)
    assert main(["traces", str(tmp_path / "none.jsonl")]) == 2


def test_trace_text_only_when_asked(tmp_path):
    for with_text in (False, True):
        log = TraceLog(tmp_path / f"{with_text}.jsonl", with_text=with_text)
        log.write({"adapter": "a"}, {"prompt": "secret"}, started=time.perf_counter())
        log.close()
        assert ("secret" in (tmp_path / f"{with_text}.jsonl").read_text()) is with_text


def test_engine_evicts_least_recently_used_adapters_and_reloads_them(workspace):
    model_dir, adapters = workspace
    model, tok = load_quantized(model_dir).eval(), make_tokenizer()
    engine = Engine(model, tok, max_adapters=1)
    for name, path in adapters.items():
        engine.register(name, path).result()
    assert adapter_names(model) == ["b"] and set(engine.adapters()) == {"a", "b"}
    ids = tok("hi")["input_ids"]
    expected = {n: generate(model, tok, [Request("hi", n, False)], max_new_tokens=5)[0] for n in ("b",)}
    engine.start()
    results: dict[int, Finished] = {}

    def sink(i):
        return lambda event: results.__setitem__(i, event) if isinstance(event, Finished) else None

    for i, name in enumerate(["a", "b", "a", None]):
        engine.submit(Sequence(ids, name, Sampling(5, temperature=0.0), sink(i)))
    engine.stop()  # returns once every queued sequence has finished
    assert results[1].text == expected["b"] and results[0].text == results[2].text != expected["b"]
    assert len(adapter_names(model)) == 1


def test_engine_holds_each_adapter_once_and_frees_it_on_unload(workspace):
    """The model's adapter tensors are the files' tensors, once each (fp32, as saved: no stacked or cast copies);
    after unload nothing keeps them alive (no cache of gathered factors)."""
    model_dir, adapters = workspace
    model = load_quantized(model_dir).eval()
    engine = Engine(model, make_tokenizer(), max_adapters=2)
    for name, path in adapters.items():
        engine.register(name, path).result()
    held = {k: p for k, p in model.named_parameters() if ".lora_" in k}
    files = [load_file(path / "adapter_model.safetensors") for path in adapters.values()]
    on_disk = sum(t.nbytes for tensors in files for t in tensors.values())
    assert sum(p.nbytes for p in held.values()) == on_disk
    assert len({p.untyped_storage().data_ptr() for p in held.values()}) == len(held)
    a_params = [weakref.ref(p) for k, p in held.items() if k.endswith(".a.weight")]
    del held
    engine.unregister("a").result()
    gc.collect()
    assert a_params and all(ref() is None for ref in a_params)


def test_the_server_imports_no_dataset_library():
    """Serving renders prompts and never reads a dataset; `datasets` (pyarrow, pandas) cost it 80 MB of RSS."""
    code = ("import sys, qlora_kit.cli, qlora_kit.serve\n"
            "print(sorted({'datasets', 'pyarrow', 'pandas'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_serve_command_drains_in_flight_requests_on_sigterm(workspace):
    """A real `qlora-kit serve` process: a stream in flight when SIGTERM arrives runs to its last token."""
    model_dir, adapters = workspace
    sock = _socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "qlora_kit.cli", "serve", str(model_dir), "--port", str(port),
                             "--adapter", f"a={adapters['a']}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.monotonic() + 3 * BOUND_S
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.1)
        stream = client.completions.create(model="a", prompt="hi", max_tokens=200, stream=True, temperature=0,
                                           extra_body={"ignore_eos": True})
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 2:
                proc.send_signal(signal.SIGTERM)
        assert chunks[-1].choices[0].finish_reason == "length" and len(chunks) > 100
        assert proc.wait(BOUND_S) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has drained
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_refuses_an_adapter_that_does_not_load(workspace, tmp_path, capsys):
    model_dir, _ = workspace
    assert main(["serve", str(model_dir), "--adapter", f"x={tmp_path / 'nope'}"]) == 2
    assert "nope: no such adapter directory" in capsys.readouterr().err
