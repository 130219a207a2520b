"""MegaContextEngine and Session: ingest -> refocus -> decode, with a hard position budget.

    engine = MegaContextEngine(store="memory", working_budget=1024)
    s = engine.session("user-42")
    s.append("user", "My locker code is 4417.")
    print(s.generate(max_new_tokens=64))

Every message is stored durably and never forgotten; the frozen model only ever sees the
working context: recent and relevant spans as raw tokens, the rest as gists.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .config import Config
from .focus import FocusAllocator, HeuristicScorer, WorkingContext
from .focus.scorers import LensScorer
from .gisting import Gister, release_freed_memory
from .models.base import ROLES, BaseModel, pick_device, resolve_dtype
from .models.checkpoint import LENS_SHIPPED, SHIPPED, load_gist_stack, load_lensnet
from .models.gistnet import GistStack
from .prefill import prefill
from .store import Message, Store
from .telemetry import TurnTelemetry
from .tree import MegaContextTree

IMPORT_CHUNK_TOKENS = 65536  # `Session.extend` commits in chunks of about this many tokens


def _shared_base(name: str, device: str | None, dtype: str) -> BaseModel:
    """Engines in one process share the frozen model (it is never modified); "auto" and
    the dtype it stands for share one copy."""
    return _load_base(name, device, resolve_dtype(pick_device(device), dtype))


@functools.lru_cache(maxsize=4)
def _load_base(name: str, device: str | None, dtype: str) -> BaseModel:
    return BaseModel.load(name, device, dtype)


def _load_gister(config: Config, base: BaseModel) -> Gister:
    refine = (config.gist_refine_steps, config.gist_refine_lr, config.gist_refine_tokens)
    return _shared_gister(
        base,
        config.gist_checkpoint,
        config.position_convention,
        config.seed,
        refine,
        config.gist_dtype,
    )


@functools.lru_cache(maxsize=8)
def _shared_gister(base, ckpt, convention, seed, refine, dtype) -> Gister:
    """Engines of one process with the same gisting settings share one Gister, so their
    sessions' blocks are gisted in shared batches."""
    if ckpt == "default":
        ckpt = str(SHIPPED) if SHIPPED.with_suffix(".safetensors").exists() else None
    if ckpt is None:
        torch.manual_seed(seed)
        stack = GistStack(base.width, embed_rms=base.embed_rms)
        version = f"untrained-seed{seed}"
    else:
        stack, meta = load_gist_stack(ckpt, base, convention)
        version = meta["version"]
    # On a CPU the refinement is bound by arithmetic beyond 32 blocks a batch, and larger
    # batches only raise peak memory; a GPU keeps gaining from larger ones.
    batch = 256 if base.device.type == "cuda" else 32
    return Gister(base, stack, version, dtype, refine, batch)


def make_scorer(config: Config, base: BaseModel):
    """The scorer `config.scorer` names: the heuristic, or LensNet from its checkpoint
    (a checkpoint made for another base model raises CheckpointMismatch)."""
    if config.scorer == "lensnet":
        path = LENS_SHIPPED if config.lens_checkpoint == "default" else config.lens_checkpoint
        return LensScorer(_shared_lens(str(path), base), base)
    return HeuristicScorer(
        recency_scale=float(config.recency_tokens),
        relevance_floor=config.relevance_floor,
        prefer_latest=config.prefer_latest,
    )


@functools.lru_cache(maxsize=4)
def _shared_lens(path: str, base: BaseModel):
    return load_lensnet(path, base)[0]


class MegaContextEngine:
    """A frozen LLM with unbounded, persistent memory per session."""

    def __init__(
        self,
        store: str | Path = "megacontext-store",
        working_budget: int = 1024,
        model: str = "default",
        device: str | None = None,
        *,
        config: Config | None = None,
        **overrides,
    ):
        """Open (or create) the store at `store`; load the model and the GistNet checkpoint.

        `config` gives every knob at once; keyword `overrides` change single fields of it.
        A GistNet checkpoint made for another base model raises CheckpointMismatch.
        """
        base_cfg = config or Config()
        if config is None or working_budget != 1024:
            overrides.setdefault("working_budget", working_budget)
        if config is None or model != "default":
            overrides.setdefault("model", model)
        if device is not None:
            overrides.setdefault("device", device)
        self.config = base_cfg.with_(**overrides)
        self.base = _shared_base(self.config.model, self.config.device, self.config.model_dtype)
        self.gister = _load_gister(self.config, self.base)
        self.store = Store(store)
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recent first
        self._lock = threading.Lock()

    def session(self, session_id: str) -> Session:
        """The session `session_id`, created on first use and persistent across processes.

        A handle whose session was deleted since (here or by another process, even if the
        id was created again) is replaced by a fresh one; the old handle raises
        SessionDeleted. A session whose gists another GistNet version made raises
        GistVersionMismatch (`megacontext reindex` re-gists it).
        """
        if not isinstance(session_id, str):
            raise TypeError(f"session id must be a str, got {type(session_id).__name__}")
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None or not s._is_current():
                s = self._sessions[session_id] = Session(self, session_id)
            self._sessions.move_to_end(session_id)
            self._release_idle()
            return s

    def _release_idle(self) -> None:
        """Past `max_open_sessions`, release the least recently used sessions that no turn
        or append is using (the newest, just asked for, stays)."""
        limit = self.config.max_open_sessions
        for sid in list(self._sessions)[:-1]:
            if limit is None or len(self._sessions) <= limit:
                return
            s = self._sessions[sid]
            if s._lock.acquire(blocking=False):  # idle
                try:
                    del self._sessions[sid]
                finally:
                    s._lock.release()

    def sessions(self) -> list[str]:
        """Ids of every session in the store, oldest first."""
        return self.store.sessions()

    def release(self, session_id: str) -> bool:
        """Drop this engine's hold on session `session_id`: its KV cache (some 20 MB at the
        default budget), token array and working context are freed once no one else holds
        the handle, so a process serving many sessions can bound its memory. Nothing stored
        changes; the next `session(session_id)` reopens it from the store and prefills its
        window afresh. A handle kept elsewhere goes on working, as one in another process
        would. False if the session was not open here."""
        with self._lock:
            return self._sessions.pop(session_id, None) is not None

    def delete_session(self, session_id: str) -> bool:
        """Delete a session's messages, tree and files. False if it did not exist."""
        with self._lock:
            self._sessions.pop(session_id, None)
        return self.store.delete_session(session_id)

    def close(self) -> None:
        """Close the store (its sessions then raise StoreError); call it when no turn is
        running. The model stays loaded for other engines. `with MegaContextEngine(...) as
        engine:` closes on leaving the block."""
        with self._lock:
            self._sessions.clear()
        self.store.close()

    def __enter__(self) -> MegaContextEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Session:
    """One conversation: a durable tree on disk and a working context in memory."""

    def __init__(self, engine: MegaContextEngine, session_id: str):
        self.engine, self.id, self.config = engine, session_id, engine.config
        base = engine.base
        self.store = engine.store.session(
            session_id,
            model=base.name,
            width=base.width,
            block_size=self.config.block_size,
            gist_dtype=self.config.gist_dtype,
            gist_version=engine.gister.version,
        )
        self.tree = MegaContextTree(self.store, engine.gister)
        self.allocator = FocusAllocator(self.config)
        self.scorer = make_scorer(self.config, engine.base)
        self.wc = WorkingContext(shown_levels=self.config.shown_levels)
        self.telemetry: list[TurnTelemetry] = []
        self._pending = TurnTelemetry()
        self._kv = None
        self._kv_keys: list[tuple] = []
        self._kv_exact = 0  # leading cache positions as a fresh prefill would make them
        self._stale_turns = 0  # turns since the cache was last exact throughout
        self._reply_start: int | None = None  # cache positions before the last reply
        self._query: list[int] | None = None
        self._lock = threading.RLock()
        self._turn: _Handoff | None = None  # the streamed turn holding the lock, if any
        self._catch_up()

    # ---- ingest -----------------------------------------------------------------------
    def append(self, role: str, content: str, metadata: dict | None = None) -> Message:
        """Store one message durably and return once it is committed.

        Its gists are made later, with those of every other new block, when the next turn
        (or `make_gists`) needs them. Raises ValueError/TypeError (and stores nothing) for
        an unknown role, non-string or empty content, metadata that is not a JSON object,
        or a message longer than the working budget.
        """
        validate_message(role, content, metadata)
        return self._append([(role, content, metadata or {})])[0]

    def extend(self, messages: Iterable, *, progress: bool = False) -> list[Message]:
        """Store many messages at once: dicts with "role", "content" and optionally
        "metadata", or (role, content) pairs.

        Every message is checked and tokenised before anything is stored: a bad one
        anywhere raises ValueError/TypeError naming its index, and the session is left as
        it was. Messages are then committed in chunks of about `IMPORT_CHUNK_TOKENS`
        tokens (an interruption keeps whole chunks; `megacontext import --resume` goes on
        from there). `progress` shows a progress bar.
        """
        batch = []
        for i, m in enumerate(messages):
            try:
                role, content, metadata = _unpack(m)
                validate_message(role, content, metadata)
            except (TypeError, ValueError) as e:
                raise type(e)(f"message {i}: {e}") from None
            batch.append((role, content, metadata or {}))
        out = self._append(batch, progress)
        release_freed_memory()  # the token lists of a long import, freed but still resident
        return out

    def _is_current(self) -> bool:
        row = self.engine.store._row(self.store.key)
        return row is not None and row["incarnation"] == self.store.incarnation

    @contextlib.contextmanager
    def _held(self) -> Iterator[None]:
        """The session's lock. The thread reading a streamed reply of this session may not
        wait for it: the turn holding it waits for that very thread to take its pieces."""
        if not self._lock.acquire(blocking=False):
            turn = self._turn
            if turn is not None and turn.reader == threading.get_ident():
                raise RuntimeError(
                    f"session {self.id!r}: a streamed reply is being read in this thread; "
                    "read it to the end or close() it before using the session again"
                )
            self._lock.acquire()
        try:
            yield
        finally:
            self._lock.release()

    def _append(self, batch: list[tuple], progress: bool = False) -> list[Message]:
        """Tokenise and check every message, then commit them in chunks."""
        tel, base, limit = self._pending, self.engine.base, self.config.working_budget
        with tel.timed("ingest"):
            encoded = base.encode_messages([(role, content) for role, content, _ in batch])
        for i, ids in enumerate(encoded):
            if len(ids) > limit:
                where = f"message {i}: " if len(batch) > 1 else ""
                raise ValueError(
                    f"{where}message is {len(ids)} tokens, longer than the working budget "
                    f"({limit}); split it or raise working_budget"
                )
        out: list[Message] = []
        bar = tqdm(total=sum(map(len, encoded)), unit="tok", disable=not progress)
        with self._held(), bar:
            start = 0
            while start < len(batch):
                end, size = start, 0
                while end < len(batch) and (end == start or size < IMPORT_CHUNK_TOKENS):
                    size, end = size + len(encoded[end]), end + 1
                chunk = [(*batch[k], encoded[k], None) for k in range(start, end)]
                with tel.timed("ingest"):
                    out += self.tree.extend(chunk)
                bar.update(size)
                start = end
            tel.new_tokens += sum(m.token_end - m.token_start for m in out)
            users = [m for m in out if m.role == "user"]
            if users:
                self._query = base.encode(users[-1].content)
        return out

    def make_gists(self, progress: bool = False) -> int:
        """Gist every block completed since the last gisting now (a turn does it anyway);
        returns how many gists were made. `progress` shows a progress bar."""
        with self._held():
            self.tree.sync()
            todo = (self.tree.n_tokens // self.config.block_size - self.tree.count(1)) * 32
            with tqdm(total=todo, unit="tok", desc="gisting", disable=not progress) as bar:
                return self.tree.make_gists(bar.update)

    def _pins(self) -> list[tuple[int, int]]:
        """The token spans that stay raw: the newest system message of each slot (metadata
        "slot"; one slot when unnamed), the first `pin_system_tokens` tokens of each,
        newest first, at most a quarter of the budget in all. Instructions steer every
        reply, and a changed prompt takes over from the one before it."""
        newest = {m.metadata.get("slot", ""): m for m in self.store.messages(role="system")}
        spans, left = [], self.config.working_budget // 4
        for m in sorted(newest.values(), key=lambda m: -m.seq):
            n = min(m.token_end - m.token_start, self.config.pin_system_tokens, left)
            if n > 0:
                spans.append((m.token_start, m.token_start + n))
                left -= n
        return sorted(spans)

    def _fit(self, budget: int, tel: TurnTelemetry) -> None:
        """Keep the budget; when over it, free some slack so the next turns reuse the KV.
        What goes is what the newest question needs least: unscored, the oldest spans went
        first, and once the recently moved ones were all that was left, that was the old
        note the focus had just opened for the question (asked again, it churned)."""
        if len(self.wc) > budget:
            with tel.timed("score"):
                scores = self.scorer.score(self.wc, self.tree, self._query_ids())
            with tel.timed("allocate"):
                self.allocator.fit(self.wc, self.tree, budget - budget // 8, scores)

    def _catch_up(self, tel: TurnTelemetry | None = None) -> None:
        """Bring the working context up to the committed history (ours and what other
        processes appended): make the gists the new blocks need, in one batch, and keep
        the budget. Raises SessionDeleted or GistVersionMismatch when the session is no
        longer what this handle holds."""
        n_before = self.tree.n_tokens
        self.tree.sync()
        if self.tree.n_tokens > n_before:
            self._query = None  # the newest user message may be one of theirs
        with (tel or self._pending).timed("gist"):
            self.tree.make_gists()
        grown = self.tree.n_tokens - self.wc.n_tokens
        if grown or not self.wc.entries:
            self.allocator.pinned = self._pins()
        pins = self.allocator.pinned
        hidden = any(e.level and lo < e.end and e.start < hi for e in self.wc for lo, hi in pins)
        if not self.wc.entries or grown > self.config.working_budget or hidden:
            # (Re)build in one pass rather than collapsing a long all-raw history block by block.
            raw = self.config.working_budget // 2
            self.wc = WorkingContext.coarse(self.tree, raw, pins, self.config.shown_levels)
            self._fit(self.config.working_budget, tel or self._pending)
        elif grown:
            self.wc.extend(self.tree.n_tokens)
            self._fit(self.config.working_budget, tel or self._pending)

    def _refine_shown(self) -> None:
        """Fit the level-1 gists shown for the first time, at most `gist_refine_per_turn`
        of them, the newest first: they sit nearest the question. The rest are shown
        plain (`WorkingContext.plain`) until the focus moves them."""
        shown = [e.index for e in self.wc if e.level == 1]
        self.wc.plain.intersection_update(shown)
        todo = self.tree.unrefined([i for i in shown if i not in self.wc.plain])
        self.wc.plain.update(todo[: max(0, len(todo) - self.config.gist_refine_per_turn)])
        self.tree.shown_gists(1, shown, self.wc.plain)

    # ---- reads ------------------------------------------------------------------------
    def messages(self, role: str | None = None) -> list[Message]:
        """The lossless message log (only `role`'s messages when given), oldest first."""
        return self.store.messages(role=role)

    def token_count(self) -> int:
        return self.tree.n_tokens

    def working_context(self) -> WorkingContext:
        """The current working context (brought up to date); `len()` of it is the
        positions in use."""
        with self._held():
            self._catch_up()
            return self.wc

    # ---- focus and decode -------------------------------------------------------------
    def refocus(
        self,
        budget: int | None = None,
        query: list[int] | None = None,
        tel: TurnTelemetry | None = None,
    ) -> int:
        """Refocus for `query` (default: the newest user message) until no move is worth
        making, `refocus_rounds` passes are done or, with a KV cache held, the moves newly
        show `open_per_turn` positions; returns the moves made."""
        budget = self.config.working_budget if budget is None else budget
        query = self._query_ids() if query is None else query
        moves = 0
        # A session without a KV cache prefills the whole window anyway: no allowance.
        self.allocator.new_event(None if self._kv is None else self.config.open_per_turn)
        for _ in range(self.config.refocus_rounds):
            made = self._refocus_round(budget, query, tel or self._pending)
            moves += made
            if not made:
                break
        return moves

    def _refocus_round(
        self, budget: int, query: list[int], tel: TurnTelemetry, fill: bool = True
    ) -> int:
        with tel.timed("score"):
            scores = self.scorer.score(self.wc, self.tree, query)
        with tel.timed("allocate"):
            made = self.allocator.refocus(self.wc, self.tree, scores, budget, fill=fill)
        tel.moves += len(made)
        tel.expands += sum(m.kind == "expand" for m in made)
        tel.collapses += sum(m.kind == "collapse" for m in made)
        return len(made)

    def _query_ids(self) -> list[int]:
        """Token ids of the newest user message: what the scorer focuses for."""
        if self._query is None:
            last = self.store.last_message("user")
            self._query = self.engine.base.encode(last.content) if last else []
        return self._query

    def generate(
        self,
        max_new_tokens: int = 64,
        *,
        stream: bool = False,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        seed: int | None = None,
        prefix: str = "",
        logits_processor=None,
    ) -> str | Iterator[str]:
        """Refocus, then write the assistant's reply; the reply is appended to the history.

        Greedy by default; `temperature > 0` samples. With `stream=True` returns an iterator
        of text pieces that any thread may pull; the turn holds the session (other calls on
        it wait) until the iterator is read to the end or closed. The reply is stored when
        decoding ends normally; a stream closed early stores what was read, with metadata
        `{"truncated": true}`; nothing is stored when decoding raised (the error reaches
        the caller, or the reader of the stream).
        `prefix` forces the start of the reply (prefilled with the prompt, yielded first and
        stored with the reply); `logits_processor(ids, logits) -> logits` sees each decode
        step (ids generated after the prefix) and may mask or force tokens.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        prompt = self.engine.base.encode(self.engine.base.generation_prompt())
        if prefix:
            prompt += self.engine.base.encode(prefix)
        budget = self.config.working_budget - max_new_tokens - len(prompt)
        if budget < self.config.recent_raw + 2 * self.config.block_size:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} leaves only {budget} positions of the "
                f"working budget ({self.config.working_budget}) for the history"
            )
        args = (prompt, budget, max_new_tokens, temperature, top_p, stop, seed, prefix)
        if stream:
            return self._stream(args, logits_processor)
        out: list[str] = []
        self._turn_body(*args, logits_processor, lambda piece: out.append(piece) is None)
        return "".join(out)

    def _stream(self, args: tuple, proc) -> Iterator[str]:
        """The turn runs on a worker thread that holds the session; its pieces come through
        a handoff, so any thread may pull them and no lock is held across a `yield`."""
        handoff = _Handoff()
        handoff.reader = threading.get_ident()

        def work() -> None:
            try:
                self._turn_body(*args, proc, handoff.put, handoff)
            except BaseException as e:  # handed to the reader, raised there
                handoff.finish(e)
            else:
                handoff.finish(None)

        threading.Thread(target=work, name=f"megacontext-turn-{self.id[:32]}", daemon=True).start()
        try:
            while True:
                handoff.reader = threading.get_ident()
                piece = handoff.take()
                if piece is None:
                    return
                yield piece
        finally:
            handoff.close()
            handoff.wait()  # the turn is over (its reply stored) when the stream is closed

    def _turn_body(
        self,
        prompt,
        budget,
        max_new_tokens,
        temperature,
        top_p,
        stop,
        seed,
        prefix,
        proc,
        emit: Callable[[str], bool],
        handoff: _Handoff | None = None,
    ) -> None:
        """Refocus, prefill, decode; pieces go to `emit` (False: the reader is gone). The
        reply is stored on normal completion, marked truncated when the reader left early
        (as far as it read), and not at all when anything raised."""
        base = self.engine.base
        with self._held():
            self._turn = handoff
            try:
                tel, self._pending = self._pending, TurnTelemetry()
                self._catch_up(tel)
                self.refocus(budget, tel=tel)
                with tel.timed("allocate"):
                    self.allocator.fit(self.wc, self.tree, budget)
                n = self.tree.n_tokens
                with tel.timed("gist"):  # with a refinement set: newly shown level-1 gists
                    self._refine_shown()
                with tel.timed("prefill"):
                    gister = self.engine.gister
                    version = f"{gister.version}+{gister.refine_version}@{self.store.incarnation}"
                    keys = self.wc.position_keys(self.tree, version)
                    keys += [(0, n + i, t) for i, t in enumerate(prompt)]
                    embeds = torch.cat([self.wc.embeddings(self.tree, base), base.embed(prompt)])
                    refresh = self._stale_turns >= self.config.kv_refresh_turns
                    mode = "prefix" if refresh else self.config.kv_reuse
                    with torch.no_grad():
                        logits, self._kv, kept, self._kv_exact = prefill(
                            base, self._kv, self._kv_keys, keys, embeds, mode, self._kv_exact
                        )
                exact = self._kv_exact == len(keys)  # then so is the reply decoded after it
                self._stale_turns = 0 if exact else self._stale_turns + 1
                tel.prefill_tokens, tel.reused_positions = len(keys) - kept, kept
                self._kv_keys, self._reply_start = keys, len(keys)
                out: list[str] = []
                truncated = False
                try:
                    with tel.timed("decode"):
                        steps = base.stream(
                            logits[0, -1],
                            self._kv,
                            len(keys),
                            max_new_tokens,
                            temperature,
                            top_p,
                            stop,
                            seed,
                            proc,
                        )
                        if prefix:
                            truncated = not emit(prefix)
                            out += [] if truncated else [prefix]
                        for step in [] if truncated else steps:
                            if step.token_id >= 0:
                                pos = n + len(prompt) + len(self._kv_keys) - len(keys)
                                self._kv_keys.append((0, pos, step.token_id))
                            if step.text:
                                if not emit(step.text):
                                    truncated = True
                                    break
                                out.append(step.text)
                finally:
                    self._kv_keys = self._kv_keys[: self._kv.get_seq_length()]
                    self._kv_exact = len(self._kv_keys) if exact else self._kv_exact
                reply = "".join(out)
                if not truncated or reply.strip():
                    self._finish_turn(tel, reply, {"truncated": True} if truncated else {})
            except BaseException:
                self._kv, self._kv_keys, self._reply_start = None, [], None  # stopped halfway
                self._kv_exact = self._stale_turns = 0
                raise
            finally:
                self._turn = None
                # The prefill's activations are freed into the allocator's arenas, which
                # would keep the largest turn's worth resident for good (a stream's pieces
                # are all handed over by now: this runs on the turn's thread).
                release_freed_memory()

    def reply_logprobs(self, candidates: list[str], lead: str = "") -> list[float]:
        """How likely the reader found each candidate as the last reply's text after
        `lead`: summed log-probabilities, read from the very context that reply was
        prefilled from (the turn's KV cache). For evaluations: which answer the reader
        preferred, not only the one greedy decoding wrote. Once per reply: the next turn
        re-reads that reply instead of reusing its cache."""
        base = self.engine.base
        with self._held():
            if self._kv is None or self._reply_start is None:
                raise RuntimeError("no reply to score against: call generate() first")
            start = self._reply_start - 1
            last = self._kv_keys[start][2]  # the prompt's last token: its logits lead
            self._kv.crop(start - self._kv.get_seq_length())  # keep the prompt less one
            self._kv_keys, self._reply_start = self._kv_keys[:start], None
            self._kv_exact = min(self._kv_exact, start)
            ids = [base.encode(c) for c in candidates]
            return base.continuation_logprobs(self._kv, [last, *base.encode(lead)], ids)

    def _finish_turn(self, tel: TurnTelemetry, reply: str, metadata: dict) -> None:
        tel.turn = len(self.telemetry)
        tel.history_tokens = self.tree.n_tokens
        tel.budget = self.config.working_budget
        tel.positions_used = len(self.wc)
        tel.entries_per_level = self.wc.per_level()
        tel.swap_rate = tel.moves * self.config.block_size / max(1, len(self.wc))
        self.telemetry.append(tel)
        self._append([("assistant", reply, {"generated": True, **metadata})])

    def level_map(self) -> np.ndarray:
        """The level each history token is shown at right now (0 = raw)."""
        return self.working_context().level_map(self.tree.n_tokens)


def _unpack(m) -> tuple:
    """(role, content, metadata) of a message given as a dict or a (role, content) pair."""
    if isinstance(m, dict):
        unknown = set(m) - {"role", "content", "metadata"}
        if unknown:
            raise ValueError(f"unknown message field(s) {sorted(unknown)}")
        if "role" not in m or "content" not in m:
            raise ValueError("a message needs 'role' and 'content'")
        return m["role"], m["content"], m.get("metadata")
    if isinstance(m, tuple | list) and len(m) == 2:
        return m[0], m[1], None
    raise TypeError(f"a message must be a dict or a (role, content) pair, got {type(m).__name__}")


def validate_message(role, content, metadata) -> None:
    """Raise ValueError/TypeError naming what is wrong with a message to append."""
    if not isinstance(role, str) or role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
    if not isinstance(content, str):
        raise TypeError(f"message content must be a str, got {type(content).__name__}")
    if not content.strip():
        raise ValueError("message content is empty")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as e:
            raise ValueError(f"metadata is not JSON-serialisable: {e}") from None


class _Handoff:
    """Pieces of one streamed turn, from its worker thread to whichever thread reads them.

    The worker puts a piece only once the previous one was taken, so when the reader
    closes the stream the reply stored is what it read (at most one piece was made
    in vain)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._pieces: deque[str] = deque()
        self._done = self._closed = False
        self._error: BaseException | None = None
        self.reader = 0  # thread id of the last thread that pulled a piece

    def put(self, piece: str) -> bool:
        """Worker: hand over `piece`; False when the reader closed the stream."""
        with self._cond:
            while self._pieces and not self._closed:
                self._cond.wait()
            if self._closed:
                return False
            self._pieces.append(piece)
            self._cond.notify_all()
            return True

    def finish(self, error: BaseException | None) -> None:
        """Worker: the turn is over (the session is released), with `error` if it raised."""
        with self._cond:
            self._done, self._error = True, error
            self._cond.notify_all()

    def take(self) -> str | None:
        """Reader: the next piece, None at the end; raises what the turn raised."""
        with self._cond:
            while not self._pieces and not self._done:
                self._cond.wait()
            if self._pieces:
                piece = self._pieces.popleft()
                self._cond.notify_all()
                return piece
            if self._error is not None:
                raise self._error
            return None

    def close(self) -> None:
        """Reader: no more pieces will be taken."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait(self) -> None:
        """Until the worker has finished the turn."""
        with self._cond:
            while not self._done:
                self._cond.wait()


def split_text(base: BaseModel, text: str, limit: int) -> list[str]:
    """`text` cut at character offsets into parts of at most `limit` tokens each, so that
    `"".join(parts) == text` byte for byte (a token-boundary cut decoded part by part
    would not round-trip). Cuts prefer whitespace; no part is whitespace only."""
    if limit < 8:
        raise ValueError(f"split limit must be at least 8 tokens, got {limit}")
    parts: list[str] = []
    start = 0
    while start < len(text):
        hi = min(len(text), start + 32 * limit)  # no token spans more than 32 characters
        if len(base.encode(text[start:hi])) <= limit:
            end = hi
        else:  # the longest prefix of text[start:hi] that fits
            lo = start + 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if len(base.encode(text[start:mid])) <= limit:
                    lo = mid
                else:
                    hi = mid - 1
            end = lo
            space = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
            if space >= start + (end - start) * 3 // 4:
                end = space + 1
        parts.append(text[start:end])
        start = end
    merged: list[str] = []
    for part in parts:  # a whitespace-only part joins its neighbour
        if merged and (not part.strip() or not merged[-1].strip()):
            merged[-1] += part
        else:
            merged.append(part)
    return merged
