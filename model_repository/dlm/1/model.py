"""Triton glue for the `dlm` model (DESIGN §5): parse and check each request, hand it to the scheduler, send its
responses, record metrics. The decoding itself lives in the `dlm` package beside this file."""

from __future__ import annotations

import dataclasses
import json
import queue
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

# the package beside this file, also when this repository is copied into a stock Triton container
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dlm.delayed import DelayedCalls  # noqa: E402
from dlm.deployment import load_deployment  # noqa: E402
from dlm.grammar import GrammarError  # noqa: E402
from dlm.inputs import InvalidInput, parse_request  # noqa: E402
from dlm.scheduler import Cancelled, Job, QueueFull, Scheduler, ShuttingDown  # noqa: E402
from dlm.text import TextCodec, TextStream  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# seconds: per-request latencies, from a request's queue wait to its first block
LATENCY_BUCKETS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]


def error_response(error: Exception) -> Any:
    if isinstance(error, InvalidInput):
        code = pb_utils.TritonError.INVALID_ARG
    elif isinstance(error, (QueueFull, ShuttingDown)):
        code = pb_utils.TritonError.UNAVAILABLE
    elif isinstance(error, Cancelled):
        code = pb_utils.TritonError.CANCELLED
    else:
        code = pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error), code))


class Metrics:
    """The model's custom metrics on Triton's metrics port; also the scheduler's observer."""

    def __init__(self) -> None:
        family = pb_utils.MetricFamily
        self.requests = family("dlm_requests_total", "Requests by mode and outcome", family.COUNTER)
        self.tokens = family("dlm_generated_tokens_total", "Tokens generated, by mode", family.COUNTER)
        self.tokens_per_forward = family(
            "dlm_tokens_per_forward", "Committed tokens per engine pass after the prefill, per request",
            family.HISTOGRAM)
        # a family must outlive its metrics, so every family stays an attribute
        self.passes_family = family("dlm_engine_passes_total", "Engine passes run", family.COUNTER)
        self.step_family = family("dlm_step_latency_seconds", "Wall time of one scheduler step (one engine pass)",
                                  family.HISTOGRAM)
        self.live_family = family("dlm_live_slots", "Requests being decoded (KV-cache slots in use)", family.GAUGE)
        self.queue_family = family("dlm_queue_depth", "Requests waiting for a slot", family.GAUGE)
        self.prompt_tokens = family("dlm_prompt_tokens_total", "Prompt tokens of requests that took a slot, by mode",
                                    family.COUNTER)
        self.queue_wait_family = family("dlm_queue_wait_seconds", "Time from submission to a KV-cache slot",
                                        family.HISTOGRAM)
        self.first_block_family = family(
            "dlm_time_to_first_block_seconds",
            "Time from submission to the first committed block (a streaming client's first response), per request",
            family.HISTOGRAM)
        self.pass_tokens_family = family(
            "dlm_pass_tokens_total", "Tokens of engine passes as padded (B x T): the rows' own (kind real) and padding",
            family.COUNTER)
        self.padding_family = family("dlm_pass_padding_ratio", "Share of an engine pass's tokens that is padding",
                                     family.HISTOGRAM)
        self.kv_family = family("dlm_kv_positions", "KV-cache positions held by live requests (their cache lengths)",
                                family.GAUGE)
        # vLLM's prefix_cache_queries / prefix_cache_hits: prompt tokens looked up, and those found (not prefilled)
        self.prefix_queries_family = family("dlm_prefix_cache_queries_total",
                                            "Prompt tokens of admitted requests looked up in the prefix cache",
                                            family.COUNTER)
        self.prefix_hits_family = family("dlm_prefix_cache_hits_total",
                                         "Prompt tokens found in the prefix cache, whose prefill was skipped",
                                         family.COUNTER)
        self.prefix_queries = self.prefix_queries_family.Metric(labels={})
        self.prefix_hits = self.prefix_hits_family.Metric(labels={})
        # the model-server protocol's gauges (GIE proposal 003) come from these: the gateway beside Triton re-exports
        # dlm_queue_depth, dlm_live_slots and dlm_kv_cache_usage on the port the router scrapes
        self.kv_usage_family = family(
            "dlm_kv_cache_usage", "KV-cache utilisation: positions held by live requests / (slots x context), 0 to 1",
            family.GAUGE)
        self.capacity_family = family("dlm_kv_capacity_positions", "KV-cache positions of all slots (slots x context)",
                                      family.GAUGE)
        self.slots_family = family("dlm_slots", "KV-cache slots: requests decoded at once at most", family.GAUGE)
        self.resident_family = family(
            "dlm_prefix_cache_capacity_positions",
            "KV-cache positions whose content prefix caching may keep for later requests (slots x context; 0: off)",
            family.GAUGE)
        self.passes = self.passes_family.Metric(labels={})
        self.real_tokens = self.pass_tokens_family.Metric(labels={"kind": "real"})
        self.padding_tokens = self.pass_tokens_family.Metric(labels={"kind": "padding"})
        self.padding_ratio = self.padding_family.Metric(labels={}, buckets=[0, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9])
        self.kv = self.kv_family.Metric(labels={})
        self.kv_usage = self.kv_usage_family.Metric(labels={})
        self.kv_capacity = 0  # positions; set by capacity()
        self.step_latency = self.step_family.Metric(
            labels={}, buckets=[0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0])
        self.live = self.live_family.Metric(labels={})
        self.queue = self.queue_family.Metric(labels={})
        self._metrics: dict[tuple, Any] = {}
        self._metrics_lock = threading.Lock()
        # each metric update is a round trip to the Triton process: the scheduler thread's go through a thread of
        # their own, so they overlap the next engine pass instead of delaying it; counters are summed over what
        # queued up meanwhile
        self._events: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        threading.Thread(target=self._record, name="dlm-metrics", daemon=True).start()

    def _record(self) -> None:
        while True:
            events = [self._events.get()]
            while True:
                try:
                    events.append(self._events.get_nowait())
                except queue.Empty:
                    break
            try:
                self._apply(events)
            except Exception as e:  # noqa: BLE001 - a metric that cannot be updated must not end the thread
                pb_utils.Logger.log_warn(f"dlm: metrics not updated: {e}")

    def _apply(self, events: list[tuple]) -> None:
        passes = real = padding = queried = hit = 0
        prompt: dict[str, int] = {}
        kv = None
        for kind, *args in events:
            if kind == "step":
                seconds, step_real, step_padding = args
                passes, real, padding = passes + 1, real + step_real, padding + step_padding
                self.step_latency.observe(seconds)
                self.padding_ratio.observe(step_padding / max(step_real + step_padding, 1))
            elif kind == "admitted":
                mode, tokens, wait, cached = args
                prompt[mode] = prompt.get(mode, 0) + tokens
                if cached is not None:  # None: prefix caching is off, nothing was looked up
                    queried, hit = queried + tokens, hit + cached
                self._metric(self.queue_wait_family, LATENCY_BUCKETS, mode=mode).observe(wait)
            elif kind == "first_block":
                mode, seconds = args
                self._metric(self.first_block_family, LATENCY_BUCKETS, mode=mode).observe(seconds)
            elif kind == "kv":
                kv = args[0]
        if passes:
            self.passes.increment(passes)
            self.real_tokens.increment(real)
            if padding:
                self.padding_tokens.increment(padding)
        for mode, tokens in prompt.items():
            self._metric(self.prompt_tokens, mode=mode).increment(tokens)
        if queried:
            self.prefix_queries.increment(queried)
            if hit:
                self.prefix_hits.increment(hit)
        if kv is not None:
            self.kv.set(kv)
            self.kv_usage.set(kv / self.kv_capacity if self.kv_capacity else 0.0)

    def _metric(self, family: Any, buckets: list[float] | None = None, **labels: str) -> Any:
        key = (id(family), *sorted(labels.items()))
        with self._metrics_lock:  # request threads, the scheduler's and the metrics thread
            if key not in self._metrics:
                extra = {"buckets": buckets} if buckets is not None else {}
                self._metrics[key] = family.Metric(labels=labels, **extra)
            return self._metrics[key]

    def capacity(self, slots: int, context: int, prefix_caching: bool = False) -> None:
        """The KV cache's size: `slots` requests of `context` positions each (the denominator of the usage), all of
        which prefix caching may keep resident when it is on."""
        self.kv_capacity = slots * context
        self.slots = self.slots_family.Metric(labels={})  # kept: a metric lives as long as its reference
        self.slots.set(slots)
        self.capacity_positions = self.capacity_family.Metric(labels={})
        self.capacity_positions.set(self.kv_capacity)
        self.resident = self.resident_family.Metric(labels={})
        self.resident.set(self.kv_capacity if prefix_caching else 0)
        self.kv_usage.set(0.0)

    def request(self, mode: str, outcome: str) -> None:
        self._metric(self.requests, mode=mode, outcome=outcome).increment(1)

    # Observer
    def step(self, seconds: float, rows: int, real_tokens: int, padding_tokens: int) -> None:
        self._events.put(("step", seconds, real_tokens, padding_tokens))

    def admitted(self, job: Job) -> None:
        wait = (job.admitted_at or job.submitted) - job.submitted
        self._events.put(("admitted", job.seq.params.mode, len(job.seq.prompt), wait, job.seq.cached_tokens))

    def first_block(self, job: Job) -> None:
        self._events.put(("first_block", job.seq.params.mode, (job.first_block_at or job.submitted) - job.submitted))

    def kv_positions(self, positions: int) -> None:
        self._events.put(("kv", positions))

    def occupancy(self, live: int, waiting: int) -> None:
        self.live.set(live)
        self.queue.set(waiting)

    def finished(self, job: Job) -> None:
        mode, seq = job.seq.params.mode, job.seq
        self.request(mode, job.outcome or "length")
        self._metric(self.tokens, mode=mode).increment(len(seq.tokens))
        if seq.forwards > 1:
            buckets = [1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32]
            self._metric(self.tokens_per_forward, buckets, mode=mode).observe(len(seq.tokens) / (seq.forwards - 1))

    def rejected(self, params: Any) -> None:
        self.request(params.mode, "rejected")


def log_prob_tensors(codec: TextCodec, seq: Any, start: int, end: int, alternatives: int) -> list[Any]:
    """`output_log_probs` and `output_tokens` (raw bytes) for the committed tokens [start, end), and with
    `alternatives` > 0 their best alternatives: `output_top_log_probs` and `output_top_tokens` [n, alternatives]."""
    tokens = seq.tokens[start:end]
    out = [
        pb_utils.Tensor("output_log_probs", np.array(seq.logprobs[start:end], dtype=np.float32).reshape(-1)),
        pb_utils.Tensor("output_tokens", np.array([codec.token_bytes(t) for t in tokens], dtype=np.object_)),
    ]
    if alternatives > 0:
        top_log_probs = np.zeros((len(tokens), alternatives), dtype=np.float32)
        top_tokens = np.full((len(tokens), alternatives), b"", dtype=np.object_)
        for i, row in enumerate(seq.top_logprobs[start:end]):
            for j, (token, log_prob) in enumerate(row[:alternatives]):
                top_log_probs[i, j], top_tokens[i, j] = log_prob, codec.token_bytes(token)
        out += [pb_utils.Tensor("output_top_log_probs", top_log_probs),
                pb_utils.Tensor("output_top_tokens", top_tokens)]
    return out


class Responder:
    """One request's responses (the scheduler's consumer): deltas when streaming, else the whole text at the end.
    With `logprobs` set, each response also carries the log probs of the tokens its text delivered. `prefix` (the
    prompt, when the request set exclude_input_in_output false) comes before the text: the first delta streamed."""

    def __init__(self, sender: Any, codec: TextCodec, stream: bool, stop_words: list[str], later: DelayedCalls,
                 logprobs: int | None = None, prefix: str = ""):
        self.sender = sender
        self.later = later
        self.stream = stream
        self.codec = codec
        self.text = TextStream(codec, stop_words)
        self.prefix = prefix
        self.unsent = prefix if stream else ""  # text decoded but not yet sent
        self.logprobs = logprobs  # alternatives per token, or None for no log probs
        self.tokens_sent = 0  # tokens whose log probs have been sent

    def cancelled(self) -> bool:
        return self.sender.is_cancelled()

    def update(self, job: Job) -> bool:
        if not (job.finished or self.stream or self.text.stop_words):
            return False  # nothing to send or to watch for before the end: skip decoding the text
        delta, stopped = self.text.update(job.seq.output, job.finished)
        self.unsent += delta
        if stopped and not job.finished:
            return True  # the scheduler ends the job and calls back for the final response
        if job.finished or (self.stream and self.unsent):
            text = self.unsent if self.stream else self.prefix + self.text.text
            self.unsent = ""
            seq = job.seq
            outputs = [
                pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
                pb_utils.Tensor("num_forwards", np.array([seq.forwards], dtype=np.int32)),
                pb_utils.Tensor("num_tokens", np.array([len(seq.tokens)], dtype=np.int32)),
            ]
            if self.logprobs is not None:
                start, end = self.tokens_sent, max(self.tokens_sent, self.text.delivered_tokens(seq.output))
                self.tokens_sent = end
                outputs += log_prob_tensors(self.codec, seq, start, end, self.logprobs)
            if job.finished:
                reason = "length" if job.outcome == "length" else "stop"  # OpenAI's words, as vLLM's backend uses
                outputs.append(pb_utils.Tensor("finish_reason", np.array([reason.encode()], dtype=np.object_)))
                cached = np.array([seq.cached_tokens or 0], dtype=np.int32)  # prefix caching's share of the prompt
                outputs.append(pb_utils.Tensor("num_cached_tokens", cached))
            self.sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL if job.finished else 0)
        return False

    def fail(self, job: Job, error: Exception) -> None:
        if isinstance(error, Cancelled):
            self.later.call_later(lambda: self.sender.send(error_response(error), flags=FINAL))
        else:
            self.sender.send(error_response(error), flags=FINAL)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]

        def integer(key: str) -> int | None:
            return int(parameters[key]) if parameters.get(key, "").strip() else None

        # kind GPU: one GPU per model instance, the one Triton names (one instance per GPU); KIND_CPU: the host
        kind = args.get("model_instance_kind", "CPU")
        device = f"cuda:{int(args.get('model_instance_device_id') or 0)}" if kind == "GPU" else None
        loaded = load_deployment(version_dir, parameters, device, log=pb_utils.Logger.log_info,
                                 warn=pb_utils.Logger.log_warn)
        self.codec, self.spec, self.defaults, self.limits = loaded.codec, loaded.spec, loaded.defaults, loaded.limits
        runtime, name, context, max_live = loaded.runtime, loaded.runtime_name, loaded.context, loaded.max_live
        model_config, limits = loaded.model_config, loaded.pass_limits
        self.drain_seconds = float(parameters.get("drain_seconds") or 0)
        self._compiler: Any = None  # dlm.grammar.Compiler, made at the first guided request
        self._vocab_size = int(model_config["vocab_size"])
        eos = model_config["eos_token_id"]
        self._eos_token_id = eos[0] if isinstance(eos, list) else eos
        self.metrics = Metrics()
        # The last response of a cancelled request waits `cancelled_final_delay` seconds (its slot is free at once).
        # Triton's gRPC frontend before the fix of triton-inference-server/server#8078 (2.51 included) frees a
        # stream's state twice, and crashes, when that response arrives before it has processed the write the
        # cancellation cut short.
        delay = float(parameters.get("cancelled_final_delay") or 0)
        self.cancelled_finals = DelayedCalls(delay, name="dlm-cancelled-finals")
        self.scheduler = Scheduler(
            runtime, self.spec, max_live=max_live, max_queue=integer("max_queue") or 0, context=context,
            observer=self.metrics, pad_token_id=int(model_config.get("pad_token_id") or 0), limits=limits,
            prefix_caching=loaded.prefix_caching,
        )
        self.metrics.capacity(max_live, context, loaded.prefix_caching)
        pb_utils.Logger.log_info(
            f"dlm: {name} runtime over {version_dir / parameters.get('artifact', 'engine')}, {max_live} slots of {context} positions, "
            f"default mode {self.defaults.mode}"
        )

    def execute(self, requests: list[Any]) -> None:
        # never raises: once a request is queued, an exception here would make Triton release it under the
        # scheduler's feet
        for request in requests:
            self._accept(request)

    def _accept(self, request: Any) -> None:
        """Queue one request, or answer it at once with the error that names what is wrong."""
        mode = self.defaults.mode
        sender = request.get_response_sender()
        try:
            def get(name: str) -> np.ndarray | None:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                return None if tensor is None else tensor.as_numpy()

            parsed = parse_request(get, self.defaults, self.limits, self.spec.block_size)
            mode = parsed.params.mode
            if parsed.guide is not None:
                parsed.params = dataclasses.replace(parsed.params, guide=self._grammar(*parsed.guide))
            responder = Responder(sender, self.codec, parsed.stream, parsed.stop_words, self.cancelled_finals,
                                  parsed.params.logprobs, parsed.text if parsed.echo else "")
            try:
                self.scheduler.submit(self.codec.encode(parsed.text, parsed.add_special_tokens), parsed.params,
                                      responder)
            except ValueError as e:  # the prompt does not fit the context
                raise InvalidInput(f"input 'text_input': {e}") from e
        except (InvalidInput, QueueFull, ShuttingDown) as error:
            if not isinstance(error, QueueFull):  # a full queue is counted by the scheduler
                self.metrics.request(mode, "invalid" if isinstance(error, InvalidInput) else "rejected")
            sender.send(error_response(error), flags=FINAL)
        except Exception as error:  # noqa: BLE001 - an unexpected input must not take the instance down
            self.metrics.request(mode, "error")
            sender.send(error_response(error), flags=FINAL)

    def _grammar(self, guide_type: str, guide: str) -> Any:
        """The request's guide compiled against the tokenizer (compilers' refusals are the request's error); an
        artifact of engine contract version 2 refuses it with the command that rebuilds it."""
        runtime = self.scheduler.runtime
        if not getattr(runtime, "structured", False):
            refusal = getattr(runtime, "rebuild_structured", lambda: "this engine takes no allowed-token mask")
            raise InvalidInput(refusal())
        if self._compiler is None:
            from dlm.grammar import Compiler

            self._compiler = Compiler(self.codec, self._vocab_size, int(self._eos_token_id), self.spec.mask_token_id)
        try:
            return self._compiler.compile(guide_type, guide)
        except GrammarError as e:
            raise InvalidInput(str(e)) from e

    def finalize(self) -> None:
        """On unload or SIGTERM: running and queued requests get `drain_seconds` to finish, the rest an error."""
        self.scheduler.stop(drain=self.drain_seconds)
        self.cancelled_finals.close()
