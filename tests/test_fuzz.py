"""Fuzzing the loaders with seeded malformed inputs (random.Random(0)): run configs, delta folders and
data files. Every input must end in a deltatune error (a DeltaError; FileNotFoundError only where a
file was deleted) or load: never another exception, and never a change to the input files. Through
the CLI a rejected config is exit code 2 with 'deltatune: error:' and no traceback. Each family
collects all its failures into one assertion message, naming the input, the exception and where
it was raised."""
import copy
import hashlib
import json
import pickle
import random
import shutil
import traceback
import warnings
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.cli import main
from deltatune.config_file import load_run_config
from deltatune.core.errors import DeltaError
from tiny import bert, llama

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
WEIGHTS, CONFIG, SETUP = "adapter_model.safetensors", "adapter_config.json", "deltatune_setup.json"
WRONG = ["x", 7, [1, "a"], {"k": 1}, None, 10**30, -5, float("nan"), True, 0.5]


# ---- shared: run one input, classify the outcome -----------------------------------------------------
def digest(paths) -> dict:
    files = [f for p in paths for f in ([p] if Path(p).is_file() else sorted(Path(p).rglob("*"))) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def raised_at(e: BaseException) -> str:
    """The innermost deltatune frame of a traceback (else the innermost frame): file:line function."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "/src/deltatune/" in f.filename]
    f = (ours or frames)[-1]
    name = f.filename.split("/src/")[-1] if ours else Path(f.filename).name
    return f"{name}:{f.lineno} {f.name}"


class Tally:
    """Counts valid inputs and errors; records every input that ended any other way."""

    def __init__(self, family):
        self.family, self.valid, self.errors, self.failures = family, 0, 0, []

    def run(self, case: str, load, inputs, allowed=()):
        """Call load(); its DeltaError (or an `allowed` exception) is an error, a return is valid."""
        before = digest(inputs)
        outcome = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                load()
            self.valid += 1
        except (DeltaError, *allowed) as e:
            self.errors += 1
            outcome = e
        except Exception as e:  # noqa: BLE001 - any other exception is what this test looks for
            first = (str(e).strip().splitlines() or [""])[0]
            self.failures.append(f"{case}: {type(e).__name__}: {first[:200]} (raised at {raised_at(e)})")
        if digest(inputs) != before:
            self.failures.append(f"{case}: the input files changed")
        return outcome

    def check(self, total: int):
        print(f"{self.family}: {total} inputs, {self.errors} errors, {self.valid} valid, "
              f"{len(self.failures)} failures")
        assert not self.failures, (f"{len(self.failures)} of {total} malformed {self.family} did not end in a "
                                   "deltatune error:\n" + "\n".join(self.failures))
        assert self.errors > total / 2, f"only {self.errors} of {total} malformed {self.family} were errors"


# ---- family 1: YAML run configs --------------------------------------------------------------------
def slots(node, out=None):
    """Every (container, key) of a parsed YAML document, nested ones included."""
    out = [] if out is None else out
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in list(items):
        out.append((node, k))
        slots(v, out)
    return out


def delete_key(rng, text):
    doc = yaml.safe_load(text)
    node, key = rng.choice([s for s in slots(doc) if isinstance(s[0], dict)])
    del node[key]
    return yaml.safe_dump(doc, sort_keys=False)


def wrong_type(rng, text):
    doc = yaml.safe_load(text)
    node, key = rng.choice(slots(doc))
    node[key] = copy.deepcopy(rng.choice(WRONG))
    return yaml.safe_dump(doc, sort_keys=False)


def unknown_key(rng, text):
    doc = yaml.safe_load(text)
    mappings = [doc] + [n[k] for n, k in slots(doc) if isinstance(n[k], dict)]
    rng.choice(mappings)[rng.choice(["colour", "lr_", "epoch", "methd", "zz"])] = rng.choice(WRONG[:4])
    return yaml.safe_dump(doc, sort_keys=False)


def truncate(rng, text):
    data = text.encode()
    return data[:rng.randrange(len(data))]


def inject_bytes(rng, text):
    data = text.encode()
    at = rng.randrange(len(data) + 1)
    return data[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 8))) + data[at:]


def break_indentation(rng, text):
    lines = text.splitlines()
    i = rng.choice([j for j, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")])
    stripped = lines[i].lstrip()
    lines[i] = rng.choice([" " * rng.randint(1, 3) + lines[i], stripped, "\t" + stripped,
                           lines[i][:len(lines[i]) - len(stripped)] + " " + stripped])
    return "\n".join(lines) + "\n"


YAML_MUTATIONS = [delete_key, wrong_type, unknown_key, truncate, inject_bytes, break_indentation]


def test_fuzz_run_configs(tmp_path, capsys):
    rng, tally, total = random.Random(0), Tally("run configs"), 300
    for i in range(total):
        example = rng.choice(EXAMPLES)
        mutate = YAML_MUTATIONS[i % len(YAML_MUTATIONS)]
        text = mutate(rng, example.read_text())
        path = tmp_path / f"{i:03d}.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        case = f"{example.name} {mutate.__name__} #{i}"
        error = tally.run(case, lambda: load_run_config(path), [path])
        if error is not None and i % 3 == 0:  # the same input through the CLI (rejected inputs only: no training)
            capsys.readouterr()
            code, err = main(["train", str(path)]), capsys.readouterr().err
            if code != 2 or "deltatune: error:" not in err or "Traceback" in err:
                tally.failures.append(f"{case}: CLI exit code {code}, stderr {err[:200]!r}")
    tally.check(total)


# ---- family 2: delta folders -----------------------------------------------------------------------
def saved_deltas(root: Path) -> dict:
    """{name: (folder, base model builder, load with all_deltas)} of small real deltas."""
    out = {}
    specs = {"lora": (bert, dt.LoRAConfig(r=4, targets=["query", "value"])),
             "adapter": (bert, dt.AdapterConfig(kind="houlsby", bottleneck=8)),
             "prompt": (llama, dt.PromptTuningConfig(num_virtual_tokens=3, init="vocab"))}
    for name, (base, config) in specs.items():
        dt.attach(base(), config).save_pretrained(root / name)
        out[name] = (root / name, base, False)
    model = dt.attach(bert(), dt.LoRAConfig(r=4, targets=["query"]))
    model.add_delta("b", dt.AdapterConfig(kind="houlsby", bottleneck=8))
    model.save_pretrained(root / "multi")
    out["multi"] = (root / "multi", bert, True)
    return out


def tensor_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob(WEIGHTS))


def config_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob(CONFIG))


def _truncate(rng, files):
    f = rng.choice(files)
    data = f.read_bytes()
    f.write_bytes(data[:rng.randrange(len(data))])


def truncate_weights(rng, folder):
    _truncate(rng, tensor_files(folder))


def flip_bytes(rng, folder):
    f = rng.choice(tensor_files(folder))
    data = bytearray(f.read_bytes())
    for _ in range(rng.randint(1, 16)):
        i = rng.randrange(min(len(data), 200) if rng.random() < 0.5 else len(data))  # often in the header
        data[i] ^= 1 << rng.randrange(8)
    f.write_bytes(bytes(data))


def random_weights(rng, folder):
    rng.choice(tensor_files(folder)).write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(0, 3000))))


def _resave(rng, folder, change):
    f = rng.choice(tensor_files(folder))
    tensors = load_file(str(f))
    change(rng, tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def wrong_shape(rng, folder):
    def change(rng, t):
        k = rng.choice(sorted(t))
        v = t[k]
        t[k] = rng.choice([torch.zeros(v.shape[0] + 1, *v.shape[1:]), v.reshape(-1), v.reshape(-1, 1),
                           torch.zeros(2, 3, 4), torch.zeros(())])
    _resave(rng, folder, change)


def missing_key(rng, folder):
    _resave(rng, folder, lambda rng, t: t.pop(rng.choice(sorted(t))) if len(t) > 1 else t.clear())


def extra_key(rng, folder):
    def change(rng, t):
        k = rng.choice(sorted(t))
        extra = rng.choice([k + "_extra", k.rsplit(".", 1)[0] + ".bogus", "base_model.model.nowhere.weight", "zz"])
        t[extra] = torch.zeros(3)
    _resave(rng, folder, change)


def wrong_dtype(rng, folder):
    def change(rng, t):
        k = rng.choice(sorted(t))
        t[k] = t[k].to(rng.choice([torch.int64, torch.float16, torch.bool, torch.uint8]))
    _resave(rng, folder, change)


def pickle_weights(rng, folder):
    f = rng.choice(tensor_files(folder))
    data = pickle.dumps(load_file(str(f)))
    if rng.random() < 0.5:
        f.write_bytes(data)  # a pickle under the safetensors name
    else:
        f.unlink()
        (f.parent / "adapter_model.bin").write_bytes(data)


def truncate_config(rng, folder):
    _truncate(rng, config_files(folder))


def garbage_config(rng, folder):
    f = rng.choice(config_files(folder))
    f.write_bytes(rng.choice([bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))),
                              b"[1, 2]", b"null", b'"text"', b"{'r': 8}", b"\xff\xfe{}", b"[" * 5000]))


CONFIG_FIELDS = ["r", "lora_alpha", "target_modules", "num_virtual_tokens", "bottleneck", "kind", "modules_to_save",
                 "layers_to_transform", "rank_pattern", "dropout", "lora_dropout", "placement", "task_type"]
CONFIG_VALUES = ["x", 5, [1], {"a": 1}, None, -3, 0, True, 2.5, "NOPE", 123, [], ""]


def wrong_config_value(rng, folder):
    f = rng.choice(config_files(folder))
    d = json.loads(f.read_text())
    key = rng.choice([k for k in CONFIG_FIELDS if k in d] + ["method" if "method" in d else "peft_type"])
    d[key] = rng.choice(CONFIG_VALUES)
    f.write_text(json.dumps(d))


def named_config_value(rng, folder):
    """The cases named in the issue: r: "x", target_modules: 5, peft_type: "NOPE", method: 123."""
    f = rng.choice(config_files(folder))
    d = json.loads(f.read_text())
    key, value = rng.choice([("r", "x"), ("target_modules", 5), ("peft_type", "NOPE"), ("method", 123),
                             ("bottleneck", "x"), ("num_virtual_tokens", "x")])
    d[key] = value
    f.write_text(json.dumps(d))


def missing_method(rng, folder):
    f = rng.choice(config_files(folder))
    d = json.loads(f.read_text())
    d.pop("method", None), d.pop("peft_type", None)
    f.write_text(json.dumps(d))


def corrupt_setup(rng, folder):
    f = folder / SETUP
    if not f.exists():
        return truncate_config(rng, folder)
    d = json.loads(f.read_text())
    choice = rng.randrange(6)
    if choice == 0:
        f.write_bytes(f.read_bytes()[:rng.randrange(f.stat().st_size)])
    elif choice == 1:
        f.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))))
    else:
        key = rng.choice(sorted(d))
        d[key] = rng.choice([5, None, "x", [1], {"b": "../elsewhere"}, {"x": "x"}, ["nope"], {"type": "Nope"}])
        f.write_text(json.dumps(d))


def delete_file(rng, folder):
    rng.choice([f for f in folder.rglob("*") if f.is_file()]).unlink()


DELTA_MUTATIONS = [truncate_weights, flip_bytes, random_weights, wrong_shape, missing_key, extra_key, wrong_dtype,
                   pickle_weights, truncate_config, garbage_config, wrong_config_value, named_config_value,
                   missing_method, corrupt_setup, delete_file]


def test_fuzz_delta_folders(tmp_path):
    rng, tally, total = random.Random(0), Tally("delta folders"), 300
    sources = saved_deltas(tmp_path / "saved")
    for name, (folder, base, all_deltas) in sources.items():  # the unmutated deltas load
        dt.DeltaModel.from_pretrained(base(), folder, all_deltas=all_deltas)
    for i in range(total):
        name = rng.choice(sorted(sources))
        folder, base, all_deltas = sources[name]
        mutate = DELTA_MUTATIONS[i % len(DELTA_MUTATIONS)]
        case_dir = tmp_path / f"{i:03d}"
        shutil.copytree(folder, case_dir)
        mutate(rng, case_dir)
        allowed = (FileNotFoundError,) if mutate is delete_file else ()
        tally.run(f"{name} {mutate.__name__} #{i}",
                  lambda: dt.DeltaModel.from_pretrained(base(), case_dir, all_deltas=all_deltas), [case_dir], allowed)
        shutil.rmtree(case_dir)
    tally.check(total)


# ---- family 3: data files --------------------------------------------------------------------------
ROWS = [{"text": f"message number {i} {'win money now' if i % 3 == 0 else 'see you later'}",
         "label": "spam" if i % 3 == 0 else "ham"} for i in range(12)]


def render(rows, fmt) -> bytes:
    if fmt == "jsonl":
        return "\n".join(json.dumps(r) for r in rows).encode() + b"\n"
    sep = "\t" if fmt == "tsv" else ","
    keys = list(rows[0]) if rows else ["text", "label"]
    cell = lambda v: "" if v is None else (f'"{v}"' if sep in str(v) else str(v))  # noqa: E731
    return ("\n".join([sep.join(keys)] + [sep.join(cell(r.get(k)) for k in keys) for r in rows]) + "\n").encode()


def data_truncate(rng, rows, fmt):
    data = render(rows, fmt)
    return data[:rng.randrange(len(data))]


def data_random_bytes(rng, rows, fmt):
    data = render(rows, fmt)
    if rng.random() < 0.3:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
    at = rng.randrange(len(data))
    return data[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 8))) + data[at:]


def data_empty(rng, rows, fmt):
    return rng.choice([b"", b"\n", b"\n\n\n", b"   "])


def data_header_only(rng, rows, fmt):
    return render([], fmt) if fmt != "jsonl" else rng.choice([b"{}\n", b"[]\n", b"{}\n{}\n"])


def data_wrong_columns(rng, rows, fmt):
    old, new = rng.choice([("label", "lbl"), ("text", "txt"), ("label", "text ")])
    return render([{(new if k == old else k): v for k, v in r.items()} for r in rows], fmt)


def data_none_labels(rng, rows, fmt):
    rows = [dict(r) for r in rows]
    for r in rng.sample(rows, rng.randint(1, len(rows))):
        r["label"] = None
    return render(rows, fmt)


def data_mixed_types(rng, rows, fmt):
    rows = [dict(r) for r in rows]
    for r in rng.sample(rows, rng.randint(1, 4)):
        key = rng.choice(["text", "label"])
        r[key] = rng.choice([1, 2.5, True, [1, 2], {"a": 1}, "", -1, 10**30])
    return render(rows, fmt)


DATA_MUTATIONS = [data_truncate, data_random_bytes, data_empty, data_header_only, data_wrong_columns,
                  data_none_labels, data_mixed_types]


def test_fuzz_data_files(tmp_path):
    from deltatune.data import sources, tasks, validate

    rng, tally, total = random.Random(0), Tally("data files"), 150
    task = tasks.TaskConfig(type="classification")

    def load(path):
        splits = sources.load_examples(sources.DataConfig(train=str(path)))
        validate.prepare_splits(task, splits)

    for fmt in ("jsonl", "csv", "tsv"):  # the unmutated files load
        good = tmp_path / f"good.{fmt}"
        good.write_bytes(render(ROWS, fmt))
        load(good)
    for i in range(total):
        fmt = ("jsonl", "csv", "tsv")[i % 3]
        mutate = DATA_MUTATIONS[(i // 3) % len(DATA_MUTATIONS)]
        path = tmp_path / f"{i:03d}.{fmt}"
        path.write_bytes(mutate(rng, ROWS, fmt))
        tally.run(f"{fmt} {mutate.__name__} #{i}", lambda: load(path), [path])
    tally.check(total)
