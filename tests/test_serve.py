"""`deltatune serve` against the official `openai` client over real sockets on 127.0.0.1: every
answer is checked against DeltaModel.generate run offline, for every delta family that generates,
under load, and every bad input gets its 4xx while the server keeps serving. The engine's own
policies (eviction, merged serving) are checked in-process."""
import json
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import openai
import pytest
import torch

import deltatune as dt
from deltatune.serve.deltas import DeltaStore
from deltatune.serve.engine import Engine, Request
from deltatune.serve.sampling import Sampling, TextStream, _nucleus, next_tokens
import serve_setup as S

KEY = "test-key"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return root, S.build(root)


@pytest.fixture(scope="module")
def root(built):
    return built[0]


@pytest.fixture(scope="module")
def refs(built):
    """{(delta or None, prompt or "chat"): greedy text from DeltaModel.generate offline}"""
    return built[1]


@pytest.fixture(scope="module")
def server(root):
    srv = S.Server(root, "--api-key", KEY, "--max-resident", "16", "--max-tokens-cap", "64")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def _model(name):
    return "tiny" if name is None else f"tiny:{name}"


def _ask(client, name, key, **kw):
    """The server's greedy text for a reference key ("chat" or a prompt)."""
    if key == "chat":
        r = client.chat.completions.create(model=_model(name), messages=S.CHAT, max_tokens=S.MAX_NEW, temperature=0,
                                           **kw)
        return r.choices[0].message.content
    r = client.completions.create(model=_model(name), prompt=key, max_tokens=S.MAX_NEW, temperature=0, **kw)
    return r.choices[0].text


def test_models_lists_the_base_and_every_delta(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny"] + [f"tiny:{n}" for n in sorted(S.DELTAS)]


def test_greedy_text_equals_offline_generate_for_every_delta_family(client, refs):
    wrong = {k: (ref, _ask(client, *k)) for k, ref in refs.items()}
    wrong = {k: v for k, v in wrong.items() if v[0] != v[1]}
    assert not wrong
    # the delta's name alone names it too
    assert _ask(client, None, "x") == refs[(None, "x")]
    r = client.completions.create(model="lora3", prompt="x", max_tokens=S.MAX_NEW, temperature=0)
    assert r.choices[0].text == refs[("lora3", "x")]


def test_streaming_gives_the_same_text(client, refs):
    prompts = S.PROMPTS[:2]
    chunks = list(client.completions.create(model="tiny:prefix", prompt=prompts, max_tokens=S.MAX_NEW,
                                            temperature=0, stream=True))
    for i, p in enumerate(prompts):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert "".join(c.text for c in mine) == refs[("prefix", p)]
        assert mine[-1].finish_reason == "length" and all(c.finish_reason is None for c in mine[:-1])
    parts = list(client.chat.completions.create(model="tiny:houlsby", messages=S.CHAT, max_tokens=S.MAX_NEW,
                                                temperature=0, stream=True, stream_options={"include_usage": True}))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == refs[("houlsby", "chat")]
    usage = parts[-1].usage
    assert usage.completion_tokens == S.MAX_NEW and usage.prompt_tokens == len(S.chat_ids(S.tokenizer()))


def test_stop_strings_end_the_text(client, refs):
    ref = refs[("lora1", S.PROMPTS[0])]
    stop = ref[len(ref) // 2: len(ref) // 2 + 3]
    cut = ref.find(stop)
    r = client.completions.create(model="tiny:lora1", prompt=S.PROMPTS[0], max_tokens=S.MAX_NEW, temperature=0,
                                  stop=[stop, "never-there"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (ref[:cut], "stop")
    streamed = client.completions.create(model="tiny:lora1", prompt=S.PROMPTS[0], max_tokens=S.MAX_NEW,
                                         temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == ref[:cut]
    r = client.completions.create(model="tiny:lora1", prompt=S.PROMPTS[0], max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_a_seed_repeats_sampled_text(client):
    def sample(seed):
        r = client.completions.create(model="tiny:lora2", prompt="Once", max_tokens=10, temperature=1.0, top_p=0.9,
                                      seed=seed)
        return r.choices[0].text
    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(4)}) > 1


def _raw(server, method, path, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, server.url + path, headers=headers, timeout=30, **kw)


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"model": "tiny"}), 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": "many"}), 400, "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": "x", "bogus": 1}), 400, "bogus"),
    (json.dumps({"model": "tiny", "prompt": "x", "n": 2}), 400, "n must be 1"),
    (json.dumps({"model": "nope", "prompt": "x"}), 404, "lora0"),
    (json.dumps({"model": "other:lora0", "prompt": "x"}), 404, "serves 'tiny'"),
    (json.dumps({"model": "tiny:../base", "prompt": "x"}), 400, "not a delta name"),
    (json.dumps({"model": "tiny:a/b", "prompt": "x"}), 400, "not a delta name"),
    (json.dumps({"model": "..", "prompt": "x"}), 400, "not a delta name"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 65}), 400, "cap of 64"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 4, "min_tokens": 5}), 400, "min_tokens"),
    (json.dumps({"model": "tiny", "prompt": "word " * 2040, "max_tokens": 16}), 400, "context"),
])
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server, client, body, status, words, refs):
    r = _raw(server, "POST", "/v1/completions", content=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]
    assert _ask(client, "lora0", "x") == refs[("lora0", "x")]


def test_unusable_delta_files_fail_alone(server, client, root, refs):
    deltas = root / "deltas"
    shutil.copytree(deltas / "lora0", deltas / "corrupt")
    data = (deltas / "corrupt" / "adapter_model.safetensors").read_bytes()
    (deltas / "corrupt" / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    other = dt.DeltaModel(S.base_model(S.tokenizer(), layers=3))  # the same family, another body
    other.add_delta("default", dt.LoRAConfig(r=4))
    other.save_pretrained(deltas / "other-base")
    for name, words in (("corrupt", "corrupt"), ("other-base", "base model")):
        with pytest.raises(openai.UnprocessableEntityError) as e:
            client.completions.create(model=f"tiny:{name}", prompt="x", max_tokens=4)
        assert words in str(e.value).lower(), str(e.value)
        with pytest.raises(openai.UnprocessableEntityError):  # streaming: the status, not a 200 stream
            list(client.completions.create(model=f"tiny:{name}", prompt="x", max_tokens=4, stream=True))
    assert _ask(client, "lora0", "x") == refs[("lora0", "x")]


def test_new_delta_folders_are_served_without_a_restart(server, client, root, refs):
    shutil.copytree(root / "deltas" / "lora5", root / "deltas" / "late.v2")
    assert _ask(client, "late.v2", "x") == refs[("lora5", "x")]
    assert "late.v2" in _raw(server, "POST", "/v1/deltas/reload").json()["deltas"]


def test_api_key_is_checked_everywhere_but_health(server):
    assert _raw(server, "GET", "/health", key=None).status_code == 200
    for key in (None, "wrong"):
        assert _raw(server, "GET", "/v1/models", key=key).status_code == 401
        assert _raw(server, "GET", "/metrics", key=key).status_code == 401
        assert _raw(server, "POST", "/v1/completions", key=key, json={"model": "tiny", "prompt": "x"}).status_code == 401


def test_metrics_count_requests_tokens_and_resident_deltas(server, client):
    client.completions.create(model="tiny:lora4", prompt="x", max_tokens=2)
    text = _raw(server, "GET", "/metrics").text
    assert 'deltatune_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'deltatune_request_seconds_bucket{endpoint="/v1/completions",le="+Inf"}' in text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["deltatune_generated_tokens_total"] >= 2 and values["deltatune_resident_deltas"] >= 1
    assert values["deltatune_running_requests"] == 0


def test_32_concurrent_clients_over_8_deltas(client, refs):
    jobs = [(f"lora{i % 8}", S.PROMPTS[i % len(S.PROMPTS)]) for i in range(96)]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda job: _ask(client, *job), jobs))
    assert [a == refs[job] for a, job in zip(answers, jobs)] == [True] * len(jobs)


# -- shutdown, timeouts, disconnects: a server of their own ----------------------------------------
def _running(srv):
    return httpx.get(srv.url + "/health", timeout=5).json()["running"]


def _until(check, timeout=10.0):
    start = time.time()
    while time.time() - start < timeout:
        if check():
            return True
        time.sleep(0.05)
    return False


def test_disconnects_and_timeouts_free_their_slot(root):
    srv = S.Server(root, "--max-tokens-cap", "2000", "--request-timeout", "1.5")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        stream = client.completions.create(model="tiny:lora1", prompt="x", max_tokens=2000, temperature=0,
                                           stream=True)
        next(iter(stream))
        stream.close()  # the client goes away mid-stream
        assert _until(lambda: _running(srv) == 0)
        # min_tokens: a sampled end-of-sequence must not end these requests before the timeouts do
        with pytest.raises(httpx.TimeoutException):  # a non-streaming client that gives up
            httpx.post(srv.url + "/v1/completions", timeout=0.5,
                       json={"model": "tiny", "prompt": "x", "max_tokens": 2000, "min_tokens": 2000})
        assert _until(lambda: _running(srv) == 0)
        with pytest.raises(openai.APIStatusError) as e:  # the server's own request timeout
            client.completions.create(model="tiny:lora2", prompt="x", max_tokens=2000,
                                      extra_body={"min_tokens": 2000})
        assert e.value.status_code == 504 and _until(lambda: _running(srv) == 0)
    finally:
        srv.stop()


def test_sigterm_finishes_in_flight_requests_then_exits_0(root):
    srv = S.Server(root, "--max-tokens-cap", "2000")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        got, at_signal, started = [], [], threading.Event()

        def long_request():
            for chunk in client.completions.create(model="tiny:prompt", prompt="x", max_tokens=1000, stream=True,
                                                   stream_options={"include_usage": True}):
                got.append(chunk)
                started.set()
        reader = threading.Thread(target=long_request)
        reader.start()
        assert started.wait(30)
        at_signal.append(len(got))
        srv.proc.send_signal(signal.SIGTERM)
        reader.join(120)
        finishes = [c.choices[0].finish_reason for c in got if c.choices]
        assert finishes[-1] in ("stop", "length") and got[-1].usage.completion_tokens > 1
        assert len(got) > at_signal[0] + 1  # chunks kept coming after the signal
        assert srv.proc.wait(60) == 0
    finally:
        srv.stop()


# -- the engine in-process ------------------------------------------------------------------------
def _run(engine, jobs):
    """Submit (delta, prompt) jobs at once; {job index: (text, finish or error)}."""
    tok, results = engine.tokenizer, {}
    ids = {"chat": S.chat_ids(tok)}
    for i, (name, key) in enumerate(jobs):
        texts = []

        def emit(kind, *args, i=i, texts=texts):
            if kind == "text":
                texts.append(args[0])
            else:
                results[i] = ("".join(texts), args)
        engine.submit(Request(ids.get(key) or tok(key).input_ids, name, Sampling(max_tokens=S.MAX_NEW, temperature=0),
                              emit))
    assert _until(lambda: len(results) == len(jobs), 120)
    return results


def _engine(root, **kw):
    tok = S.tokenizer()
    base = type(S.base_model(tok)).from_pretrained(root / "base").eval()
    engine = Engine(dt.DeltaModel(base), tok, DeltaStore(root / "deltas"), max_context=2048, **kw)
    engine.start()
    return engine


def test_engine_evicts_least_recently_used_deltas_and_stays_exact(root, refs):
    engine = _engine(root, max_resident=3, max_batch=6)
    try:
        jobs = [k for k in refs if k[0] in S.DELTAS or k[0] is None]
        results = _run(engine, jobs)
        assert {i: r[0] for i, r in results.items()} == {i: refs[j] for i, j in enumerate(jobs)}
        assert len(engine.resident) == 3 and len(engine.model.configs) == 3
    finally:
        engine.stop()


def test_engine_serves_a_lone_mergeable_delta_merged(root, refs):
    engine = _engine(root, max_resident=1, merge_single=True)
    try:
        weight = engine.model.base_model.model.layers[0].self_attn.q_proj.weight  # the same tensor once wrapped
        before = weight.clone()
        results = _run(engine, [("lora1", p) for p in S.PROMPTS])
        assert engine.merged is not None and not torch.equal(weight, before)
        assert [results[i][0] for i in range(len(S.PROMPTS))] == [refs[("lora1", p)] for p in S.PROMPTS]
        results = _run(engine, [(None, "x"), ("lora1", "x")])  # the base model: unmerged, bit for bit
        assert engine.merged is None and torch.equal(weight, before)
        assert (results[0][0], results[1][0]) == (refs[(None, "x")], refs[("lora1", "x")])
    finally:
        engine.stop()


def test_text_stream_holds_back_what_may_become_a_stop_string():
    class Chars:  # one token per character
        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(chr, ids))
    stream = TextStream(Chars(), ["END"])
    out = [stream.add(ord(c)) for c in "abEN"]
    assert out == [("a", False), ("b", False), ("", False), ("", False)]
    assert stream.add(ord("x")) == ("ENx", False)
    assert [stream.add(ord(c)) for c in "yEND"] == [("y", False), ("", False), ("", False), ("", True)]
    assert stream.text == "abENxy" and stream.flush() == ""


def test_min_tokens_rules_out_end_of_sequence_until_reached():
    class Row:
        sampling, generator = Sampling(max_tokens=4, temperature=0, min_tokens=2), None

        def __init__(self, generated):
            self.generated = generated
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]])  # token 1 (end of sequence here) leads
    assert next_tokens(logits, [Row(1), Row(2)], eos=[1]) == [2, 1]


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([0.1, 0.5, 0.3, 0.1])
    assert torch.allclose(_nucleus(probs, 0.7), torch.tensor([0, 0.625, 0.375, 0]))
    assert torch.allclose(_nucleus(probs, 0.5), torch.tensor([0.0, 1.0, 0.0, 0.0]))
