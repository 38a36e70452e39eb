"""`DeltaModel`: a frozen Hugging Face model carrying named deltas. It injects pieces
(core/layer.py), chooses which deltas act, merges them and runs the model; files are
core/files.py's job, the task-head policy core/heads.py's."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from . import files, setup
from .call_args import check_forward_kwargs, shows_base_signature
from .config import DeltaConfig
from .copy import TrainableCopy
from .errors import ConfigError, IncompatibleDeltaError, TargetNotFoundError
from .files import config_from_file
from .heads import default_heads
from .io import read_delta
from .layer import DeltaLayer, unwrap
from .mixed import MixedBatch
from .overlap import check_active
from .pieces import MODEL_LEVEL, ComputesOutput, ModelPiece, check_piece
from .registry import method_of
from .targets import find_targets, named_base_modules

__all__ = ["DeltaModel", "ModelPiece", "MODEL_LEVEL", "attach", "config_from_file"]


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
        for path, mod in named_base_modules(self.base_model, wrapped=True):  # base paths, as files key them
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
        enabled = self._enabled
        self._set_enabled(False)  # build against the base: attributes would fall through to an active trained copy
        try:
            pieces = dict(method_of(config).build(self.base_model, config))
        finally:
            self._set_enabled(enabled)
        where = dict(named_base_modules(self.base_model, wrapped=True))  # {base path: module or its wrapper}
        heads = default_heads(self.base_model, config) if config.modules_to_save is None else config.modules_to_save
        if heads:  # like PEFT, a listed name may be absent (["classifier", "score"]) but not all of them
            for path in find_targets(self.base_model, list(heads), types=None):
                if not any(path == q or path.startswith(q + ".") for q in pieces if q):
                    pieces[path] = TrainableCopy(where[path])
        for path, piece in pieces.items():
            self._install(name, path, piece, where)
        self.configs[name] = config
        for other in config.frozen_deltas():
            if other in self.configs:
                self.set_trainable(other, False)
        self.set_trainable(name, trainable)
        self.set_active(self.active or [name])  # the first delta becomes active; others wait for set_active
        return self

    def _install(self, name, path, piece, where):
        if path == MODEL_LEVEL:
            self.model_pieces[name] = piece
            return
        check_piece(piece, path)
        mod = where[path]
        if not isinstance(mod, DeltaLayer):
            mod = where[path] = DeltaLayer(mod)
            self._put(path, mod, where)
        ref = next(mod.base_layer.parameters(), None)
        if ref is not None:
            piece.to(device=ref.device)
        piece.train(mod.base_layer.training)  # a new piece follows the model's train/eval mode (dropout, gates)
        mod.deltas[name] = piece

    def _put(self, path, module, where=None):
        """Register `module` at base path `path` (inside the module a wrapper of its parent wraps)."""
        where = dict(named_base_modules(self.base_model, wrapped=True)) if where is None else where
        parent, _, child = path.rpartition(".")
        setattr(unwrap(where[parent]), child, module)

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
                layer.deltas[name].restore_base(layer.base_layer)  # a PiSSA/OLoRA LoRA gives the weight back
                del layer.deltas[name]
            if not len(layer.deltas):  # put the original module back
                self._put(path, layer.base_layer)
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
        check_active(self, self._names(active))  # a trained copy shadows other deltas' pieces inside it
        self.active = active
        for _, layer in self.delta_layers():
            layer.active = active

    @property
    def active_names(self) -> list[str]:
        return self._names(self.active)

    @contextlib.contextmanager
    def disabled(self):
        """Base-model behaviour inside the block: merged deltas are unmerged for it, and weights a delta
        changed when attached (a PiSSA/OLoRA residual) are the original ones, the changed values kept
        on the CPU and put back bit for bit when the block ends."""
        merged = {path: (list(layer.merged), bool(layer.originals)) for path, layer in self.delta_layers()}
        self._set_enabled(False)
        for path, layer in self.delta_layers():
            for n in list(layer.merged):
                layer.unmerge(n)
        changed = self._restore_changed_bases()
        try:
            yield self
        finally:
            with torch.no_grad():
                for param, data in changed:
                    param.data.copy_(data)
            self._set_enabled(True)
            for path, layer in self.delta_layers():
                names, exact = merged.get(path, ([], False))
                for n in names:
                    layer.merge(n, exact=exact)

    def _restore_changed_bases(self) -> list:
        """Give base layers whose weights a piece changed at attach time (`changes_base`) their
        original weights; returns [(parameter, its changed value on the CPU)] to put back."""
        kept = []
        for _, layer in self.delta_layers():
            changers = [p for p in layer.deltas.values() if p.changes_base]
            if changers:
                kept += [(p, p.data.to("cpu", copy=True)) for p in layer.base_layer.parameters(recurse=False)]
                for piece in changers:
                    piece.restore_base(layer.base_layer)
        return kept

    def _set_enabled(self, flag: bool) -> None:
        self._enabled = flag
        for _, layer in self.delta_layers():
            layer.enabled = flag

    # -- merging -------------------------------------------------------------
    def merge(self, names=None, exact: bool = False) -> None:
        """Fold deltas (default: the active ones) into the base weights, in place; idempotent.
        unmerge() subtracts them again (float rounding aside); exact=True keeps a copy of the
        weights it changes (on the CPU) so that unmerge() restores them bit for bit."""
        names = self.active_names if names is None else self._names(names)
        self._check_names(names)
        for n in names:
            fixed = [p for p in self.pieces_of(n).values() if not p.mergeable]
            if fixed:
                raise ConfigError(f"Delta {n!r} ({self.configs[n].method}) adds modules or inputs, not weight "
                                  f"changes ({type(fixed[0]).__name__} cannot be folded into weights), so it cannot "
                                  "be merged; keep it attached.")
        for n in names:  # additive pieces fold into the weights (DeltaLayer.merge); trained copies stay
            try:             # until merge_and_unload
                for _, layer in self.delta_layers():
                    layer.merge(n, exact=exact)
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
        for path, layer in reversed(list(self.delta_layers())):  # inner wrappers first, while their parents are base
            copies = [layer.live(n) for n in self.active_names if isinstance(layer.live(n), ComputesOutput)]
            self._put(path, copies[-1].module if copies else layer.base_layer)
        base = self.base_model
        for p in base.parameters():
            p.requires_grad_(False)
        return base

    # -- running -------------------------------------------------------------
    def _model_pieces(self):
        if not self._enabled:
            return []
        return [self.model_pieces[n] for n in self.active_names if n in self.model_pieces]

    @shows_base_signature  # inspect.signature(model.forward) is the base model's (transformers.Trainer reads it)
    def forward(self, *args, delta_names=None, **kwargs):
        """The base model's forward under the active deltas; with delta_names (one delta name or None per
        sample), sample i runs with delta delta_names[i] instead (core/mixed.py)."""
        if delta_names is not None:
            return MixedBatch(self, delta_names, args, kwargs).run(self.base_model, args, kwargs)
        pieces = self._model_pieces()
        check_forward_kwargs(self.base_model, kwargs, pieces)  # an unknown keyword raises, not vanishes
        posts = []
        for piece in pieces:
            kwargs, post = piece.prepare(self, kwargs)
            posts.append(post)
        out = self.base_model(*args, **kwargs)
        for post in reversed(posts):
            out = post(out) if post else out
        return out

    def generate(self, *args, delta_names=None, **kwargs):
        """The base model's generate; delta_names as in forward (beams and returned sequences of a sample
        keep its delta)."""
        if delta_names is not None:
            return MixedBatch(self, delta_names, args, kwargs).run(self.base_model.generate, args, kwargs,
                                                                   generating=True)
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
        # real module paths (a wrapper nested in another's base_layer has ".base_layer." in its key)
        layers = tuple(f"base_model.{path}.deltas." for path, mod in self.base_model.named_modules()
                       if isinstance(mod, DeltaLayer))
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

    # -- files (core/files.py) -------------------------------------------------
    def delta_state(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of one delta under their file keys."""
        return files.delta_state(self, name)

    def file_config(self, name: str) -> dict:
        """adapter_config.json of one delta (see files.file_config)."""
        return files.file_config(self, name)

    def save_pretrained(self, path, names=None) -> None:
        """Write each delta: the first (or "default") in `path`, others in `path/<name>/`; plus
        `path/deltatune_setup.json` (folders and active composition) for from_pretrained(all_deltas=True)."""
        requested, names = names, list(self.configs) if names is None else self._names(names)
        self._check_names(names)
        root = files.write(self, path, names)
        setup.write_setup(self, path, requested, names, root)

    @classmethod
    def from_pretrained(cls, base_model, path, name: str = "default", trainable: bool = False,
                        all_deltas: bool = False) -> "DeltaModel":
        """Load the delta in `path` as `name`; with all_deltas=True every delta save_pretrained wrote
        there (root and subfolders, under their saved names) with the saved active composition."""
        model = base_model if isinstance(base_model, DeltaModel) else cls(base_model)
        if all_deltas:
            folders, active = setup.read_setup(path)
            for delta, folder in folders.items():
                model.load_delta(Path(path) / folder, name=delta, trainable=trainable)
            model.set_active(active)
            return model
        model.load_delta(path, name=name, trainable=trainable)
        model.set_active(name)
        return model

    def load_delta(self, path, name: str = "default", trainable: bool = False) -> "DeltaModel":
        """Load the delta in `path` as `name`. A delta saved with the facts of its base model
        (deltatune_setup.json) is refused up front when this base model has another body; for
        one that records only the base's name (PEFT's files), a failed load names both models."""
        cfg_dict, tensors = read_delta(path)
        config = config_from_file(cfg_dict, where=str(Path(path) / "adapter_config.json"))
        recorded = setup.read_base(path)
        if recorded is not None:  # before any target lookup, whose error would hide the real cause
            setup.check_base(recorded, self.base_model, source=path)
        try:
            self.add_delta(name, config, trainable=trainable)
            try:
                files.load_tensors(self, name, tensors, source=path, task_type=cfg_dict.get("task_type"))
            except Exception:
                self.delete_delta(name)
                raise
        except (TargetNotFoundError, IncompatibleDeltaError) as e:
            hint = None if recorded else setup.other_base_hint(path, cfg_dict.get("base_model_name_or_path"),
                                                               self.base_model)
            if hint is None:
                raise
            raise type(e)(hint + str(e)) from None
        return self


    def hotswap_delta(self, path, name: str = "default") -> "DeltaModel":
        """Replace the tensors of the attached delta `name` by those saved in `path`, in place.

        The file must be of the same method with the same targets and shapes; options that only
        scale (LoRA's alpha, rsLoRA, dropout: `DeltaConfig.swappable`) may differ. No module is
        re-wrapped and no tensor replaced (values are copied into the existing ones), so a
        `torch.compile`d model runs on without recompiling. A file that does not fit changes
        nothing. PEFT's `hotswap_adapter` is the counterpart."""
        self._check_names([name])
        cfg_dict, tensors = read_delta(path)
        config = config_from_file(cfg_dict, where=str(Path(path) / "adapter_config.json"))
        recorded = setup.read_base(path)
        if recorded is not None:
            setup.check_base(recorded, self.base_model, source=path)
        old = self.configs[name]
        if type(config) is not type(old):
            raise IncompatibleDeltaError(f"Cannot hot-swap {str(path)!r} ({config.method}) into delta {name!r} "
                                         f"({old.method}): the method differs. Use load_delta for a new delta.")
        new_d, old_d = config.to_dict(), old.to_dict()
        differ = sorted(k for k in new_d if new_d[k] != old_d.get(k) and k not in config.swappable)
        problem = None if differ else config.swap_problem(old)
        if problem:
            raise IncompatibleDeltaError(f"Cannot hot-swap {str(path)!r} into delta {name!r}: {problem}. "
                                         "Use delete_delta and load_delta instead.")
        if differ:
            raise IncompatibleDeltaError(
                f"Cannot hot-swap {str(path)!r} into delta {name!r}: "
                f"{', '.join(f'{k} {old_d.get(k)!r} -> {new_d[k]!r}' for k in differ)} would change its modules "
                "or shapes; a hot-swap keeps both. Use delete_delta and load_delta instead.")
        if any(name in layer.merged for _, layer in self.delta_layers()):
            raise ConfigError(f"Delta {name!r} is merged into the weights; unmerge it before a hot-swap.")
        files.load_tensors(self, name, tensors, source=path, task_type=cfg_dict.get("task_type"))
        config.swap_into(self.pieces_of(name))
        self.configs[name] = config
        return self


def default_loss(model, batch):
    """The model's own loss (HF models compute it from `labels`): the Trainer's default objective."""
    return model(**batch).loss


def attach(model: nn.Module, config: DeltaConfig, name: str = "default") -> DeltaModel:
    """Wrap a Hugging Face model and attach one delta; the main entry point."""
    dm = model if isinstance(model, DeltaModel) else DeltaModel(model)
    return dm.add_delta(name, config)
