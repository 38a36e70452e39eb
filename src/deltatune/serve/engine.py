"""The serving engine: one thread owns the model and runs continuous batching at token granularity.

Each loop: admit waiting requests (their deltas made resident: loaded on first use, least recently
used unused ones evicted beyond `max_resident`), prefill them (requests on layer deltas or the base
together in one mixed-delta batch, requests on prompt or prefix deltas one by one, as those deltas
change the inputs), join them to the running rows, then decode one token for every running row in
one forward with `MixedBatch(decoding=True)` (each row its own delta). Finished, cancelled and
timed-out rows leave after any step, so a long request never holds up short ones.

Requests talk to the engine through `Request.emit`, called on the engine thread with events:
("text", str), ("done", finish_reason, usage dict), ("error", http status, message)."""
from __future__ import annotations

import inspect
import itertools
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..core.errors import DeltaError
from ..core.hf_cache import cache_kwarg, get_cache
from ..core.mixed import MixedBatch
from .batch import Rows, join, keep, layers_of
from .deltas import DeltaStore, Unusable
from .sampling import Sampling, TextStream, next_tokens


@dataclass(eq=False)
class Request:
    """One completion: prompt tokens, the delta folder name (None: the base model), how to decode,
    and where its events go."""
    prompt_ids: list[int]
    delta: str | None
    sampling: Sampling
    emit: Callable[..., None]
    cancelled: bool = False
    id: int = field(default_factory=itertools.count().__next__)


class _Seq:
    """A running request: its row in the batch."""

    def __init__(self, req: Request, slot: str | None, tokenizer, device):
        self.req, self.slot = req, slot
        self.sampling = req.sampling
        self.generator = req.sampling.generator(device)
        self.stream = TextStream(tokenizer, req.sampling.stop)
        self.generated = 0
        self.next_id: int | None = None


@dataclass
class _Resident:
    slot: str          # the delta's name inside the DeltaModel
    signature: tuple   # the folder's files when loaded
    users: int = 0     # running or admitted requests on it
    at_once: bool = False  # a prompt or prefix delta: prefilled alone


class Engine:
    def __init__(self, model, tokenizer, store: DeltaStore, max_batch: int = 32, max_resident: int = 8,
                 max_context: int = 2048, merge_single: bool = False):
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.max_batch, self.max_resident, self.max_context = max_batch, max_resident, max_context
        self.merge_single = merge_single
        self.device = next(model.base_model.parameters()).device
        eos = model.base_model.generation_config.eos_token_id
        self.eos = sorted(set(eos if isinstance(eos, list) else [] if eos is None else [eos])
                          | ({tokenizer.eos_token_id} - {None}))
        self.keeps_logits = "logits_to_keep" in inspect.signature(type(model.base_model).forward).parameters
        self.cache_name = cache_kwarg(model.base_model)
        self.waiting: deque[Request] = deque()
        self.running = Rows([], None, None)
        self.resident: OrderedDict[str, _Resident] = OrderedDict()  # least recently used first
        self.merged: str | None = None
        self.tokens_generated = self.tokens_prefilled = 0
        self._slots = itertools.count()
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="deltatune-engine", daemon=True)

    # -- from other threads -----------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, req: Request) -> None:
        with self._wake:
            if self._stop:
                req.emit("error", 503, "The server is shutting down.")
                return
            self.waiting.append(req)
            self._wake.notify()

    def cancel(self, req: Request) -> None:
        """The client went away or timed out: the request leaves at the next step."""
        req.cancelled = True
        with self._wake:
            self._wake.notify()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def counts(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting), "resident": len(self.resident)}

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self.waiting and not len(self.running):
                    self._wake.wait()
                if self._stop:
                    break
            try:
                self._admit()
                self._drop_cancelled()
                if len(self.running):
                    self._decode()
            except Exception as e:  # noqa: BLE001 - a failed step fails its rows, never the server
                self._fail_running(e)
        for seq in self.running.seqs:
            seq.req.emit("error", 503, "The server shut down before this request finished.")
        for req in self.waiting:
            req.emit("error", 503, "The server shut down before this request started.")

    # -- admission ---------------------------------------------------------------------------
    def _admit(self) -> None:
        room = self.max_batch - len(self.running)
        together, alone = [], []
        with self._wake:
            candidates = list(self.waiting)
        for req in candidates:
            if room <= 0:
                break
            if req.cancelled:
                self._unwait(req)
                continue
            try:
                resident = self._make_resident(req.delta)
            except Unusable as e:
                self._unwait(req)
                req.emit("error", e.status, str(e))
                continue
            if resident is False:  # no room for its delta yet: it waits, others go on
                continue
            self._unwait(req)
            room -= 1
            if resident is not None:
                resident.users += 1
            (alone if resident is not None and resident.at_once else together).append((req, resident))
        if not together and not alone:
            return
        try:
            self._choose_merge([r for _, r in together + alone])
        except Exception as e:  # noqa: BLE001 - the admitted requests fail, the engine goes on
            self._reject(together + alone, e)
            return
        groups = ([together] if together else []) + [[item] for item in alone]
        for group in groups:
            try:
                rows = self._prefill(group)
            except Exception as e:  # noqa: BLE001 - e.g. a prompt too long with a delta's virtual tokens
                self._reject(group, e)
                continue
            self.running = join(self.running, rows)

    def _reject(self, admitted, error: Exception) -> None:
        """Fail admitted requests [(request, resident delta or None)] that never reached the batch."""
        for req, resident in admitted:
            self._release(resident)
            req.emit("error", *_status(error))

    def _unwait(self, req: Request) -> None:
        with self._wake:
            self.waiting.remove(req)

    def _make_resident(self, name: str | None):
        """The resident delta for `name` (None for the base model), loading it if needed; False when
        every resident delta is in use and there is no room for another yet."""
        if name is None:
            return None
        signature = self.store.signature(name)  # raises Unusable for a folder that is gone
        have = self.resident.get(name)
        if have is not None and have.signature != signature:  # the folder changed since it was loaded
            if have.users:
                return False
            self._evict(name)
            have = None
        if have is not None:
            self.resident.move_to_end(name)
            return have
        while len(self.resident) >= self.max_resident:
            idle = next((n for n, r in self.resident.items() if not r.users), None)
            if idle is None:
                return False
            self._evict(idle)
        slot = f"d{next(self._slots)}"
        try:
            self.model.load_delta(self.store.path(name), name=slot)
        except (DeltaError, OSError, ValueError, KeyError, RuntimeError) as e:
            raise Unusable(f"Delta {name!r} cannot be served: {e}", 422) from None
        pieces = self.model.model_pieces
        at_once = slot in pieces and not pieces[slot].mergeable
        self.resident[name] = _Resident(slot, signature, at_once=at_once)
        return self.resident[name]

    def _evict(self, name: str) -> None:
        resident = self.resident.pop(name)
        if self.merged == resident.slot:
            self._unmerge()
        self.model.delete_delta(resident.slot)

    def _release(self, resident) -> None:
        if resident is not None:
            resident.users -= 1

    # -- merged serving ------------------------------------------------------------------------
    def _choose_merge(self, incoming) -> None:
        """With merge_single: while every row uses the one resident delta (and it folds into the
        weights), run it merged; any other request unmerges it first."""
        if not self.merge_single:
            return
        slots = {s.slot for s in self.running.seqs} | {r.slot if r else None for r in incoming}
        only = next(iter(slots)) if len(slots) == 1 and len(self.resident) == 1 else None
        mergeable = only is not None and all(p.mergeable for p in self.model.pieces_of(only).values())
        if mergeable and self.merged != only:
            self._unmerge()
            self.model.set_active(only)
            self.model.merge([only], exact=True)  # exact: serving may merge and unmerge many times
            self.merged = only
        elif not mergeable:
            self._unmerge()

    def _unmerge(self) -> None:
        if self.merged is not None:
            self.model.unmerge([self.merged])
            self.merged = None

    # -- prefill and decoding -----------------------------------------------------------------
    def _forward(self, names: list, **kwargs):
        if self.keeps_logits:
            kwargs["logits_to_keep"] = 1
        with torch.no_grad():
            if self.merged is not None:  # every row runs the merged delta: the plain model
                return self.model.base_model(**kwargs)
            return MixedBatch(self.model, names, (), kwargs, decoding=True).run(self.model.base_model, (), kwargs)

    def _prefill(self, group) -> Rows:
        seqs = [_Seq(req, r.slot if r else None, self.tokenizer, self.device) for req, r in group]
        lengths = torch.tensor([len(s.req.prompt_ids) for s in seqs], device=self.device)
        width = int(lengths.max())
        mask = (torch.arange(width, device=self.device) >= width - lengths[:, None]).long()  # left padding
        if len(group) == 1 and group[0][1] is not None and group[0][1].at_once:
            out = self._prefill_alone(seqs[0])
        else:
            out = self._prefill_together(seqs, mask)
        cache, logits = get_cache(out), out.logits[:, -1]
        layers_of(cache)  # refuses caches that cannot be padded and joined
        virtual = cache.get_seq_length() - width  # a prompt's or prefix's positions, in front
        mask = torch.cat([mask.new_ones(len(seqs), virtual), mask], dim=1)
        for seq in seqs:
            total = virtual + len(seq.req.prompt_ids) + seq.sampling.max_tokens
            if total > self.max_context:
                raise Unusable(f"The prompt ({len(seq.req.prompt_ids)} tokens, plus {virtual} virtual tokens of its "
                               f"delta) and max_tokens ({seq.sampling.max_tokens}) exceed the context of "
                               f"{self.max_context} tokens; shorten the prompt or lower max_tokens.", 400)
        self.tokens_prefilled += int(lengths.sum())
        rows = Rows(seqs, cache, mask)
        self._take(rows, next_tokens(logits, seqs, self.eos))
        return rows

    def _prefill_together(self, seqs, mask):
        """One forward over the prompts, left-padded as `mask` says."""
        ids = torch.full(mask.shape, self.tokenizer.pad_token_id or 0, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, mask.shape[1] - len(s.req.prompt_ids):] = torch.tensor(s.req.prompt_ids)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return self._forward([s.slot for s in seqs], input_ids=ids.to(self.device), attention_mask=mask,
                             position_ids=positions, use_cache=True)

    def _prefill_alone(self, seq):
        """A prompt or prefix delta changes the inputs: prefilled with it active, as generate would."""
        ids = torch.tensor([seq.req.prompt_ids], device=self.device)
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": True}
        if self.keeps_logits:
            kwargs["logits_to_keep"] = 1
        before = self.model.active
        self.model.set_active(seq.slot)
        try:
            with torch.no_grad():
                return self.model(**kwargs)
        finally:
            self.model.set_active(before)

    def _decode(self) -> None:
        rows = self.running
        out = self._forward([s.slot for s in rows.seqs], **rows.step_inputs([s.next_id for s in rows.seqs]),
                            **{self.cache_name: rows.cache}, use_cache=True)
        rows.advance(get_cache(out))
        self._take(rows, next_tokens(out.logits[:, -1], rows.seqs, self.eos))

    def _take(self, rows: Rows, tokens: list[int]) -> None:
        """Give each row its token; rows that finish leave the batch."""
        stay = []
        for i, (seq, token) in enumerate(zip(rows.seqs, tokens)):
            finish = self._add_token(seq, token)
            if finish is None and not seq.req.cancelled:
                stay.append(i)
            else:
                self._finish(seq, finish)
        kept = keep(rows, stay)
        rows.seqs, rows.cache, rows.mask = kept.seqs, kept.cache, kept.mask

    def _add_token(self, seq: _Seq, token: int) -> str | None:
        seq.generated += 1
        self.tokens_generated += 1
        seq.next_id = token
        if token in self.eos:
            piece, finish = seq.stream.flush(), "stop"
        else:
            piece, stopped = seq.stream.add(token)
            finish = "stop" if stopped else "length" if seq.generated >= seq.sampling.max_tokens else None
            if finish == "length":
                piece += seq.stream.flush()
        if piece and not seq.req.cancelled:
            seq.req.emit("text", piece)
        return finish

    def _finish(self, seq: _Seq, finish: str | None) -> None:
        resident = self.resident.get(seq.req.delta) if seq.req.delta is not None else None
        self._release(resident)
        if finish is not None and not seq.req.cancelled:
            seq.req.emit("done", finish, {"prompt_tokens": len(seq.req.prompt_ids),
                                          "completion_tokens": seq.generated,
                                          "total_tokens": len(seq.req.prompt_ids) + seq.generated})

    def _drop_cancelled(self) -> None:
        rows = self.running
        stay = [i for i, s in enumerate(rows.seqs) if not s.req.cancelled]
        if len(stay) < len(rows):
            for s in rows.seqs:
                if s.req.cancelled:
                    self._finish(s, None)
            self.running = keep(rows, stay)

    def _fail_running(self, error: Exception) -> None:
        status, message = _status(error)
        for seq in self.running.seqs:
            self._finish(seq, None)
            seq.req.emit("error", status, message)
        self.running = Rows([], None, None)


def _status(error: Exception) -> tuple[int, str]:
    if isinstance(error, Unusable):
        return error.status, str(error)
    if isinstance(error, DeltaError):
        return 422, str(error)
    return 500, f"Internal error while generating ({type(error).__name__}: {error})."
