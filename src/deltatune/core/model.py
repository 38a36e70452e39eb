"""`DeltaModel`: a frozen Hugging Face model carrying named deltas."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .config import DeltaConfig, config_from_dict
from .copy import TrainableCopy
from .errors import ConfigError, IncompatibleDeltaError
from .io import PREFIX, read_delta, write_delta
from .layer import DeltaLayer
from .registry import get_method, method_of
from .targets import find_targets

MODEL_LEVEL = ""  # key of a model-level piece in a method's build() result


class ModelPiece(nn.Module):
    """The part of a delta that acts on the model's inputs/outputs (soft prompts).

    `prepare(model, kwargs)` returns new forward kwargs and a function applied to
    the outputs; `prepare_generate` does the same for `generate`."""

    # True only for a piece that changes no inputs/outputs and holds parameters its layer
    # pieces share (intrinsic's theta_d): merging the layer pieces then captures the delta
    mergeable = False

    def prepare(self, model, kwargs):  # pragma: no cover - interface
        raise NotImplementedError

    def prepare_generate(self, model, kwargs):
        return self.prepare(model, kwargs)

    def file_state(self):
        return dict(self.state_dict())

    def load_file_state(self, state):
        self.load_state_dict(state, strict=True)

    def file_config(self, cfg: dict) -> dict:
        """The saved adapter_config.json, completed with facts about the model this piece
        was built for (e.g. PEFT's task_type and token_dim); unchanged by default."""
        return cfg

    # key root of the delta's module tensors (task heads): PEFT writes prompt-learning deltas'
    # modules under "base_model.<path>" rather than "base_model.model.<path>"
    file_key_root = PREFIX


class DeltaModel(nn.Module):
    def __init__(self, base_model: nn.Module):
        super().__init__()
        if isinstance(base_model, DeltaModel):
            raise ConfigError("This model already is a DeltaModel: use model.add_delta(name, config).")
        if not isinstance(base_model, nn.Module) or not base_model._modules:
            what = type(base_model).__name__
            raise ConfigError(f"A delta attaches to a model (a torch nn.Module with submodules, e.g. a Hugging Face "
                              f"model), not a {what}: load it first, e.g. "
                              "AutoModelForCausalLM.from_pretrained(path), then dt.attach(model, config).")
        self.base_model = base_model
        self.model_pieces = nn.ModuleDict()
        self.configs: dict[str, DeltaConfig] = {}
        self.active: list = []
        self._enabled = True
        for p in base_model.parameters():
            p.requires_grad_(False)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base_model"], name)

    # -- deltas --------------------------------------------------------------
    def delta_layers(self) -> Iterable[tuple[str, DeltaLayer]]:
        for path, mod in self.base_model.named_modules():
            if isinstance(mod, DeltaLayer):
                yield path, mod

    def add_delta(self, name: str, config: DeltaConfig, trainable: bool = True) -> "DeltaModel":
        if not isinstance(config, DeltaConfig):
            raise ConfigError(f"Expected a delta config (e.g. dt.LoRAConfig(...)), got {type(config).__name__}.")
        if name in self.configs:
            raise ConfigError(f"A delta named {name!r} is already attached; delete_delta({name!r}) first "
                              "or choose another name.")
        if "." in name or not name:
            raise ConfigError(f"Delta name {name!r} must be non-empty and contain no '.'.")
        pieces = dict(method_of(config).build(self.base_model, config))
        heads = default_heads(self.base_model) if config.modules_to_save is None else config.modules_to_save
        if heads:  # like PEFT, a listed name may be absent (["classifier", "score"]) but not all of them
            for path in find_targets(self.base_model, list(heads), types=None):
                if not any(path == q or path.startswith(q + ".") for q in pieces if q):
                    pieces[path] = TrainableCopy(self._unwrap(path))
        for path, piece in pieces.items():
            self._install(name, path, piece)
        self.configs[name] = config
        self.set_trainable(name, trainable)
        self.set_active(self.active or [name])  # the first delta becomes active; others wait for set_active
        return self

    def _unwrap(self, path):
        mod = self.base_model.get_submodule(path)
        return mod.base_layer if isinstance(mod, DeltaLayer) else mod

    def _install(self, name, path, piece):
        if path == MODEL_LEVEL:
            self.model_pieces[name] = piece
            return
        mod = self.base_model.get_submodule(path)
        if not isinstance(mod, DeltaLayer):
            wrapper = DeltaLayer(mod)
            parent, _, child = path.rpartition(".")
            setattr(self.base_model.get_submodule(parent) if parent else self.base_model, child, wrapper)
            mod = wrapper
        ref = next(mod.base_layer.parameters(), None)
        if ref is not None:
            piece.to(device=ref.device)
        piece.train(mod.base_layer.training)  # a new piece follows the model's train/eval mode (dropout, gates)
        mod.deltas[name] = piece

    def pieces_of(self, name: str) -> dict[str, nn.Module]:
        """{module path: piece} of one delta ("" for its model-level piece)."""
        out = {path: layer.deltas[name] for path, layer in self.delta_layers() if name in layer.deltas}
        if name in self.model_pieces:
            out[MODEL_LEVEL] = self.model_pieces[name]
        return out

    def delta_parameters(self, name: str):
        for piece in self.pieces_of(name).values():
            yield from piece.parameters()

    def set_trainable(self, name: str, trainable: bool = True) -> None:
        self._check_names([name])
        for p in self.delta_parameters(name):
            p.requires_grad_(trainable and p.is_floating_point())

    def delete_delta(self, name: str) -> None:
        self._check_names([name])
        self.unmerge([name])
        for path, layer in list(self.delta_layers()):
            if name in layer.deltas:
                del layer.deltas[name]
            if not len(layer.deltas):  # put the original module back
                parent, _, child = path.rpartition(".")
                setattr(self.base_model.get_submodule(parent) if parent else self.base_model, child, layer.base_layer)
        if name in self.model_pieces:
            del self.model_pieces[name]
        del self.configs[name]
        self.set_active([n for n in self._names(self.active) if n != name])

    # -- which deltas act ----------------------------------------------------
    @staticmethod
    def _names(active) -> list[str]:
        if isinstance(active, str):
            return [active]
        names = getattr(active, "names", None)
        return list(names() if callable(names) else active)

    def _check_names(self, names):
        for n in names:
            if n not in self.configs:
                raise ConfigError(f"No delta named {n!r}; attached deltas: {sorted(self.configs) or 'none'}.")

    def set_active(self, names) -> None:
        """Activate one delta, a list (their effects add) or a composition (dt.Stack, ...)."""
        active = [names] if isinstance(names, str) else names
        self._check_names(self._names(active))
        if callable(getattr(active, "check", None)):  # a composition checks that its deltas combine
            active.check(self)
        self.active = active
        for _, layer in self.delta_layers():
            layer.active = active

    @property
    def active_names(self) -> list[str]:
        return self._names(self.active)

    @contextlib.contextmanager
    def disabled(self):
        """Base-model behaviour inside the block (merged deltas are unmerged for it)."""
        merged = {path: list(layer.merged) for path, layer in self.delta_layers()}
        self._set_enabled(False)
        for path, layer in self.delta_layers():
            for n in list(layer.merged):
                layer.unmerge(n)
        try:
            yield self
        finally:
            self._set_enabled(True)
            for path, layer in self.delta_layers():
                for n in merged.get(path, []):
                    layer.merge(n)

    def _set_enabled(self, flag: bool) -> None:
        self._enabled = flag
        for _, layer in self.delta_layers():
            layer.enabled = flag

    # -- merging -------------------------------------------------------------
    def merge(self, names=None) -> None:
        """Fold deltas (default: the active ones) into the base weights; idempotent."""
        names = self.active_names if names is None else self._names(names)
        self._check_names(names)
        for n in names:
            pieces = self.pieces_of(n)
            # a model-level piece may be mergeable when it only holds parameters its layer pieces share
            if not all(getattr(p, "mergeable", False) or getattr(p, "replaces_base", False)
                       for p in pieces.values()):
                raise ConfigError(f"Delta {n!r} ({self.configs[n].method}) adds modules or inputs, not weight "
                                  "changes, so it cannot be merged into the weights; keep it attached.")
        for n in names:
            try:
                for _, layer in self.delta_layers():
                    if n in layer.deltas and not layer.deltas[n].replaces_base:
                        layer.merge(n)
            except Exception:
                self.unmerge([n])  # all or nothing
                raise

    def unmerge(self, names=None) -> None:
        names = list(self.configs) if names is None else self._names(names)
        for n in names:
            for _, layer in self.delta_layers():
                layer.unmerge(n)

    def merge_and_unload(self) -> nn.Module:
        """The plain HF model with the active deltas folded in (trained copies take their module's place)."""
        self.merge()
        for path, layer in list(self.delta_layers()):
            copies = [layer.deltas[n] for n in self.active_names if n in layer.deltas and layer.deltas[n].replaces_base]
            plain = copies[-1].module if copies else layer.base_layer
            parent, _, child = path.rpartition(".")
            setattr(self.base_model.get_submodule(parent) if parent else self.base_model, child, plain)
        base = self.base_model
        for p in base.parameters():
            p.requires_grad_(False)
        return base

    # -- running -------------------------------------------------------------
    def _model_pieces(self):
        if not self._enabled:
            return []
        return [self.model_pieces[n] for n in self.active_names if n in self.model_pieces]

    def forward(self, *args, **kwargs):
        posts = []
        for piece in self._model_pieces():
            kwargs, post = piece.prepare(self, kwargs)
            posts.append(post)
        out = self.base_model(*args, **kwargs)
        for post in reversed(posts):
            out = post(out) if post else out
        return out

    def generate(self, *args, **kwargs):
        posts = []
        for piece in self._model_pieces():
            kwargs, post = piece.prepare_generate(self, kwargs)
            posts.append(post)
        out = self.base_model.generate(*args, **kwargs)
        for post in reversed(posts):
            out = post(out) if post else out
        return out

    # -- parameters ----------------------------------------------------------
    def trainable_summary(self) -> dict:
        """Trainable parameters against the model's size: base parameters plus added ones,
        where trained copies of base modules (full/partial, task heads) count once."""
        copies = {id(p) for m in self.modules() if isinstance(m, TrainableCopy) for p in m.parameters()}
        seen, trainable, total = set(), 0, 0
        for p in self.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += 0 if id(p) in copies else p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}

    def print_trainable_parameters(self) -> None:
        s = self.trainable_summary()
        print(f"trainable params: {s['trainable']:,} || all params: {s['total']:,} || "
              f"trainable%: {s['percent']:.4f}")

    # -- torch state dicts: the deltas only ------------------------------------
    def _is_delta_key(self, key: str) -> bool:
        layers = tuple(f"base_model.{path}.deltas." for path, _ in self.delta_layers())
        return key.startswith(("model_pieces.",) + layers)

    def state_dict(self, *args, **kwargs):
        """The deltas' tensors only (every piece's parameters and buffers, under their module keys):
        the frozen base model comes from its own checkpoint. So trainers that save `model.state_dict()`
        (transformers.Trainer with a model that is not a PreTrainedModel) write only the delta."""
        out = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        for k in [k for k in out if k.startswith(prefix) and not self._is_delta_key(k[len(prefix):])]:
            del out[k]
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads the deltas' tensors; base-model tensors may be present or not (state_dict() leaves them out)."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if self._is_delta_key(k)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"Error loading a DeltaModel state dict: missing delta keys {missing[:5]}, "
                               f"unexpected keys {result.unexpected_keys[:5]}.")
        return type(result)(missing, result.unexpected_keys)

    # -- files ---------------------------------------------------------------
    def delta_state(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of one delta under their file keys."""
        out, pieces = {}, self.pieces_of(name)
        root = getattr(pieces.get(MODEL_LEVEL), "file_key_root", PREFIX)
        for path, piece in pieces.items():
            prefix = "" if path == MODEL_LEVEL else root + path + "."
            for k, v in piece.file_state().items():
                out[prefix + k] = v
        return out

    def save_pretrained(self, path, names=None) -> None:
        """Write each delta: the first (or "default") in `path`, others in `path/<name>/`; plus
        `path/deltatune_setup.json` (folders and active composition) for from_pretrained(all_deltas=True)."""
        requested, names = names, list(self.configs) if names is None else self._names(names)
        self._check_names(names)
        root = "default" if "default" in names else names[0]
        for n in names:
            write_delta(Path(path) if n == root else Path(path) / n, self.file_config(n), self.delta_state(n))
        from ..compose import write_setup
        write_setup(self, path, requested, names, root)

    def file_config(self, name: str) -> dict:
        """adapter_config.json of one delta. Besides the method's options it records facts about the
        base model: PEFT's `task_type` (the auto class to load it with) and, in PEFT-style files,
        `modules_to_save` = the task heads this delta trained, so peft restores them too."""
        cfg = self.configs[name]
        to_file = getattr(cfg, "to_file_dict", None)
        d = to_file() if callable(to_file) else cfg.to_dict()
        if name in self.model_pieces:
            d = self.model_pieces[name].file_config(d)
        if d.get("task_type") is None:
            d["task_type"] = peft_task_type(self.base_model)
        if "peft_type" in d and d.get("modules_to_save") is None and cfg.modules_to_save is None:
            pieces = self.pieces_of(name)
            heads = [h for h in default_heads(self.base_model) if isinstance(pieces.get(h), TrainableCopy)]
            d["modules_to_save"] = heads or None
        d.setdefault("base_model_name_or_path", getattr(self.base_model.config, "_name_or_path", None))
        return d

    @classmethod
    def from_pretrained(cls, base_model, path, name: str = "default", trainable: bool = False,
                        all_deltas: bool = False) -> "DeltaModel":
        """Load the delta in `path` as `name`; with all_deltas=True every delta save_pretrained wrote
        there (root and subfolders, under their saved names) with the saved active composition."""
        if all_deltas:
            from ..compose import load_setup
            return load_setup(base_model, path, trainable=trainable)
        model = base_model if isinstance(base_model, DeltaModel) else cls(base_model)
        model.load_delta(path, name=name, trainable=trainable)
        model.set_active(name)
        return model

    def load_delta(self, path, name: str = "default", trainable: bool = False) -> "DeltaModel":
        cfg_dict, tensors = read_delta(path)
        config = config_from_file(cfg_dict)
        self.add_delta(name, config, trainable=trainable)
        try:
            self._load_tensors(name, tensors, source=path)
        except Exception:
            self.delete_delta(name)
            raise
        return self

    def _load_tensors(self, name, tensors, source):
        pieces = self.pieces_of(name)
        by_piece = {path: {} for path in pieces}
        for key, value in tensors.items():
            path, sub = _split_key(key, pieces)
            if ".base_layer." in key:  # PEFT also stores the untouched base weights of targeted embeddings
                continue
            if path is None:
                raise IncompatibleDeltaError(
                    f"Delta {str(source)!r} has weights for {key!r}, which this {type(self.base_model).__name__} "
                    "has no place for: the delta was made for another architecture or target set.")
            by_piece[path][sub] = value
        for path, piece in pieces.items():
            expected = piece.file_state()
            got = by_piece[path]
            missing = sorted(set(expected) - set(got))
            if missing:
                raise IncompatibleDeltaError(
                    f"Delta {str(source)!r} lacks {missing} for module {path or '(model level)'!r}; "
                    "the file is incomplete or belongs to another method.")
            for k, v in got.items():
                if k not in expected:
                    raise IncompatibleDeltaError(f"Delta {str(source)!r} has unexpected weights {k!r} "
                                                 f"for module {path!r}.")
                if not getattr(piece, "sparse_file", False) and tuple(expected[k].shape) != tuple(v.shape):
                    raise IncompatibleDeltaError(
                        f"Delta {str(source)!r} does not fit this base model: module {path!r} weight {k!r} has "
                        f"shape {tuple(v.shape)} in the file but {tuple(expected[k].shape)} here "
                        "(the delta was trained on another base model).")
            ref = next(iter(expected.values()), None)
            piece.load_file_state({k: v.to(ref.device if ref is not None else "cpu") for k, v in got.items()})


def default_heads(model: nn.Module) -> list[str]:
    """The freshly initialised task head of a *ForSequenceClassification-style model,
    trained and saved with every delta unless modules_to_save says otherwise (PEFT's task_type)."""
    name = type(model).__name__
    if not name.endswith(("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                          "ForMultipleChoice")):
        return []
    return [n for n in ("classifier", "score", "qa_outputs") if hasattr(model, n)]


def peft_task_type(model) -> str:
    """PEFT's task_type for a Hugging Face model class (it picks PEFT's wrapper class on load, and
    `deltatune merge` the auto class the base model loads with)."""
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False) and name.endswith(("ForConditionalGeneration",
                                                                             "ForSeq2SeqLM")):
        return "SEQ_2_SEQ_LM"
    for suffix, kind in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS")):
        if name.endswith(suffix):
            return kind
    return "FEATURE_EXTRACTION"


def _split_key(key: str, pieces: dict) -> tuple[str | None, str]:
    for root in (PREFIX, "base_model."):  # ours/PEFT's, then PEFT's prompt-learning layout
        rest = key[len(root):] if key.startswith(root) else None
        best = None
        for path in pieces if rest is not None else ():
            if path and rest.startswith(path + ".") and (best is None or len(path) > len(best)):
                best = path
        if best is not None:
            return best, rest[len(best) + 1:]
    if key.startswith("base_model."):
        return None, key
    return (MODEL_LEVEL, key) if MODEL_LEVEL in pieces else (None, key)


def config_from_file(d: dict) -> DeltaConfig:
    """A config from adapter_config.json: ours (key "method") or PEFT's (key "peft_type")."""
    if "method" in d:
        d = {k: v for k, v in d.items() if k not in ("base_model_name_or_path", "task_type")}
        return config_from_dict(d)
    if "peft_type" in d:
        from .registry import peft_method
        return peft_method(d["peft_type"]).config_cls.from_peft(d)
    raise ConfigError("adapter_config.json names no method ('method' or PEFT's 'peft_type').")


def attach(model: nn.Module, config: DeltaConfig, name: str = "default") -> DeltaModel:
    """Wrap a Hugging Face model and attach one delta; the main entry point."""
    dm = model if isinstance(model, DeltaModel) else DeltaModel(model)
    return dm.add_delta(name, config)
