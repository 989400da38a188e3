"""HybridClassifier: the device model first, the cloud when the device is unsure, an answer always.

Whatever the cloud does (refuses, hangs, sheds load, answers garbage or another model's
outputs, or the breaker is open), ``predict`` returns the device's answer flagged ``degraded``
with the reason, no later than the deadline plus the time to build the answer. The deadline
counts from the call.

Whatever the device model does (raises, returns NaN or the wrong shape), the input is escalated
with reason ``device_error``; when the cloud cannot answer either, the result is an explicit
error (``error`` set, ``label`` -1, ``source`` ``none``). ``predict`` itself never raises for
either side.

Built on ``edgekit.runtime.load_active`` (or :meth:`HybridClassifier.from_active`), the
classifier follows the agent's model switches between requests: the new model and the policy
in its manifest are taken together, so no request mixes one model with another's policy.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from edgekit.errors import IncompatibleError, InputError
from edgekit.manifest import Manifest, RouterPolicy
from hybrid_router.breaker import BreakerState, CircuitBreaker
from hybrid_router.client import CloudFailure, KServeClient
from hybrid_router.policy import EscalationPolicy, decide_batch

__all__ = ["CloudModel", "DeviceModel", "HybridClassifier", "Prediction", "Recorder"]

log = logging.getLogger(__name__)

Source = Literal["device", "cloud", "none"]


@runtime_checkable
class Recorder(Protocol):
    """Anything that records predictions (``device_agents.telemetry.Recorder`` fits)."""

    def record(self, *, latency_ms: float, confidence: float | None, source: str, error: str | None, escalated: bool,
               degraded: bool) -> None:
        """Record one prediction."""


class DeviceModel(Protocol):
    """The on-device model: float batch in, float batch out (``edgekit.runtime.LocalModel`` fits)."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Outputs for a batch."""


class CloudModel(Protocol):
    """The cloud side: a batch and an absolute ``time.monotonic()`` deadline in, outputs out (``KServeClient`` fits)."""

    def infer(self, x: np.ndarray, deadline: float) -> Any:
        """A result with ``.outputs``; raises ``CloudFailure`` on any failure."""


@dataclass(frozen=True)
class Prediction:
    """One answer.

    ``reason``: ``confident`` or ``escalated`` when all went well; ``device_error`` when the device
    failed and the cloud answered; else why the answer is degraded. ``error`` is set only when
    nobody could answer (then ``label`` is -1 and ``source`` ``none``). ``confidence`` is the
    policy's score of the device output (None when the device gave none).
    """

    label: int
    probs: np.ndarray
    source: Source
    degraded: bool
    reason: str
    latency_ms: float
    confidence: float | None
    escalated: bool
    error: str | None = None
    model_sha256: str | None = None

    @property
    def ok(self) -> bool:
        """Whether there is an answer."""
        return self.error is None


@dataclass(frozen=True)
class _Route:
    """One device model with the policy that belongs to it (swapped as a whole when the agent switches)."""

    model: Any
    policy: EscalationPolicy | None
    classes: int | None
    sha256: str | None
    version: str | None
    no_policy: str = ""
    """Why ``policy`` is None: the device answers alone, flagged degraded ``no_policy``."""


def _as_probs(out: np.ndarray) -> np.ndarray:
    """Cloud outputs as probabilities: kept when they already are, softmaxed when they look like logits."""
    out = np.asarray(out, dtype=np.float64)
    if out.min() >= 0 and abs(out.sum() - 1.0) < 1e-3:
        return out
    e = np.exp(out - out.max())
    return e / e.sum()


def _manifest_classes(manifest: Manifest | None) -> int | None:
    if manifest is None:
        return None
    if manifest.labels:
        return len(manifest.labels)
    shape = manifest.outputs[0].shape if manifest.outputs else ()
    return int(shape[-1]) if len(shape) >= 2 and shape[-1] > 0 else None


def _model_classes(model: Any) -> int | None:
    classes = _manifest_classes(getattr(model, "manifest", None))
    if classes is None:
        outs = getattr(model, "outputs", ())
        shape = outs[0].shape if outs else ()
        classes = int(shape[-1]) if len(shape) >= 2 and shape[-1] > 0 else None
    return classes


def _policy_problem(policy: EscalationPolicy, classes: int | None, sha256: str | None, where: str) -> str:
    """Why ``policy`` cannot route this model ('' when it can); ``sha256`` is the model file's (the manifest's)."""
    if policy.device_model_sha256 and sha256 and policy.device_model_sha256 != sha256:
        return (f"{where}: the router policy was calibrated for device model {policy.device_model_sha256[:12]}, "
                f"not this one ({sha256[:12]})")
    if policy.classes is not None and classes is not None and policy.classes != classes:
        return f"{where}: the router policy is for {policy.classes} classes, the device model has {classes}"
    return ""


def _route_for(model: Any, manifest: Manifest | None, sha256: str | None, version: str | None) -> _Route:
    """The route of a model switched in at run time: its own manifest's policy, or none."""
    classes = _model_classes(model)
    where = f"model {sha256[:12]}" if sha256 else "the active model"
    rp = manifest.router_policy if manifest is not None else None
    if rp is None:
        return _Route(model, None, classes, sha256, version, f"{where} has no router policy")
    policy = EscalationPolicy.from_router_policy(rp)
    problem = _policy_problem(policy, classes, manifest.sha256 if manifest is not None else None, where)
    if problem:
        return _Route(model, None, classes, sha256, version, problem)
    return _Route(model, policy, classes, sha256, version)


class HybridClassifier:
    """Device-first classification with escalation to a KServe v2 cloud model under a deadline and a breaker.

    ``policy`` may be omitted when ``local`` carries a manifest with a router policy. A policy
    calibrated for another device model, or for another class count, is refused (InputError).
    """

    def __init__(self, local: DeviceModel, cloud: CloudModel | None, policy: EscalationPolicy | RouterPolicy | None = None, *,
                 deadline_ms: float = 100.0, breaker: CircuitBreaker | None = None, recorder: Recorder | None = None,
                 check_interval_s: float = 1.0) -> None:
        if not deadline_ms > 0:
            raise ValueError("deadline_ms must be > 0")
        from edgekit.runtime import ActiveModel

        self._live: ActiveModel | None = local if isinstance(local, ActiveModel) else None
        self.check_interval_s = float(check_interval_s)
        self._checked = time.monotonic()
        self._swap_lock = threading.Lock()
        self._device_lock = threading.Lock()  # LiteRT interpreters are not thread-safe
        manifest: Manifest | None = getattr(local, "manifest", None)
        sha256: str | None = getattr(local, "sha256", None) if self._live is not None else (manifest.sha256 if manifest else None)
        version = manifest.version if manifest is not None else None
        model: Any = local
        if self._live is not None:
            model, manifest, sha256, version = self._live.snapshot()
        if policy is None:
            rp = manifest.router_policy if manifest is not None else None
            if rp is None:
                raise InputError("the device model has no router policy", "Calibrate its bundle: edgekit router calibrate --device BUNDLE ...")
            policy = rp
        pol = EscalationPolicy.from_router_policy(policy) if isinstance(policy, RouterPolicy) else policy
        classes = _model_classes(model)
        problem = _policy_problem(pol, classes, manifest.sha256 if manifest is not None else None, "device model")
        if problem:
            raise InputError(problem, "Use the policy of this model's calibrated bundle, or calibrate this model: edgekit router calibrate.")
        self._route = _Route(model, pol, classes, sha256, version)
        self.local = local
        self.cloud = cloud
        if classes is not None and isinstance(cloud, KServeClient):
            try:
                cloud.require_classes(classes)
            except ValueError as e:
                raise InputError(f"cloud client: {e}", "Use one KServeClient per device model.") from None
        self.deadline_ms = float(deadline_ms)
        self.breaker = breaker or CircuitBreaker()
        self.recorder = recorder

    @classmethod
    def from_bundle(cls, bundle_path: str | os.PathLike[str], cloud_url: str | None = None, cloud_model: str | None = None, *,
                    deadline_ms: float = 100.0, breaker: CircuitBreaker | None = None, recorder: Recorder | None = None,
                    num_threads: int | None = None) -> HybridClassifier:
        """Load a calibrated bundle (policy from its manifest) and connect to the cloud model, if given."""
        from edgekit.runtime import load

        local = load(bundle_path, num_threads=num_threads)
        if local.manifest is None or local.manifest.router_policy is None:
            raise InputError(f"{bundle_path}: the bundle has no router policy", "Calibrate it first: edgekit router calibrate --device BUNDLE ...")
        return cls(local, cls._client(cloud_url, cloud_model), None, deadline_ms=deadline_ms, breaker=breaker, recorder=recorder)

    @classmethod
    def from_active(cls, data_dir: str | os.PathLike[str], cloud_url: str | None = None, cloud_model: str | None = None, *,
                    deadline_ms: float = 100.0, breaker: CircuitBreaker | None = None, recorder: Recorder | None = None,
                    num_threads: int | None = None, check_interval_s: float = 1.0) -> HybridClassifier:
        """The model the device agent made active in ``data_dir``, following its switches (model and policy together)."""
        from edgekit.runtime import load_active

        local = load_active(data_dir, num_threads=num_threads, check_interval_s=check_interval_s)
        return cls(local, cls._client(cloud_url, cloud_model), None, deadline_ms=deadline_ms, breaker=breaker, recorder=recorder,
                   check_interval_s=check_interval_s)

    @staticmethod
    def _client(cloud_url: str | None, cloud_model: str | None) -> KServeClient | None:
        if (cloud_url is None) != (cloud_model is None):
            raise InputError("give both cloud_url and cloud_model, or neither", "E.g. cloud_url='http://127.0.0.1:8500', cloud_model='mnist'.")
        return KServeClient(cloud_url, cloud_model) if cloud_url and cloud_model else None

    @property
    def policy(self) -> EscalationPolicy | None:
        """The policy of the current device model (None when that model has no usable one)."""
        return self._route.policy

    @property
    def model_sha256(self) -> str | None:
        """sha256 of the device model answering now."""
        return self._route.sha256

    def check_cloud(self, timeout_s: float = 5.0) -> None:
        """Raise IncompatibleError (or RemoteError) now if the cloud model cannot answer for the device model's classes."""
        from edgekit.errors import RemoteError

        if not isinstance(self.cloud, KServeClient):
            return
        try:
            self.cloud.contract(timeout_s)
        except CloudFailure as e:
            if e.reason == "bad_response":
                raise IncompatibleError(f"cloud model '{self.cloud.model}' at {self.cloud.url}: {e.detail}",
                                        "Point the router at a cloud model trained on the device model's classes, in the same order.") from None
            raise RemoteError(f"cloud model '{self.cloud.model}' at {self.cloud.url}: {e.reason} ({e.detail})",
                              "Check that the cloud server is running and serves that model.") from None

    def close(self) -> None:
        """Close the cloud client's connections."""
        if hasattr(self.cloud, "close"):
            self.cloud.close()

    # -- prediction ----------------------------------------------------------------------------

    def predict(self, x: np.ndarray) -> Prediction:
        """The answer for one example (no batch axis); never raises for a failing device model or cloud."""
        return self.predict_batch(np.asarray(x)[None])[0]

    def predict_batch(self, xs: np.ndarray) -> list[Prediction]:
        """Answers for a batch; the unsure examples go to the cloud in one request under one deadline."""
        start = time.monotonic()
        deadline = start + self.deadline_ms / 1000.0
        route = self._current()
        try:
            xs = np.asarray(xs, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise InputError(f"the input is not a float array ({e})", "Pass float32 data in the device model's layout.") from None
        specs = getattr(route.model, "inputs", ())
        want = tuple(specs[0].shape[1:]) if specs else None
        if want is not None and all(d > 0 for d in want) and tuple(xs.shape[1:]) != want:
            raise InputError(f"input shape {tuple(xs.shape[1:])} does not fit the device model's {want}",
                             "Pass one example in the model's layout (predict) or a batch of them (predict_batch).")
        n = len(xs)
        out, device_problem = self._run_device(route, xs)
        if out is None:
            return self._device_failed(route, xs, device_problem, start, deadline)
        if route.policy is None:
            labels = out.argmax(axis=1)
            return [self._finish(Prediction(int(labels[i]), out[i], "device", True, "no_policy", 0.0, None, False,
                                            model_sha256=route.sha256), start) for i in range(n)]
        labels, conf, probs, esc = decide_batch(out, route.policy)
        idx = np.flatnonzero(esc)
        cloud_out, reason = self._escalate(route, xs[idx], deadline) if len(idx) else (None, "")
        answers: list[Prediction] = []
        for i in range(n):
            if not esc[i]:
                answers.append(Prediction(int(labels[i]), probs[i], "device", False, "confident", 0.0, float(conf[i]), False,
                                          model_sha256=route.sha256))
            elif cloud_out is None:
                answers.append(Prediction(int(labels[i]), probs[i], "device", True, reason, 0.0, float(conf[i]), True,
                                          model_sha256=route.sha256))
            else:
                p = _as_probs(cloud_out[int(np.searchsorted(idx, i))])
                answers.append(Prediction(int(p.argmax()), p, "cloud", False, "escalated", 0.0, float(conf[i]), True,
                                          model_sha256=route.sha256))
        return [self._finish(a, start) for a in answers]

    def _current(self) -> _Route:
        """The route for this request; on a live model, the agent's latest switch (checked every ``check_interval_s``)."""
        live = self._live
        if live is None or time.monotonic() - self._checked < self.check_interval_s:
            return self._route
        with self._swap_lock:
            if time.monotonic() - self._checked < self.check_interval_s:
                return self._route
            self._checked = time.monotonic()
            try:
                live.refresh()
            except Exception as e:  # noqa: BLE001 - a broken switch keeps the model that works
                log.warning("could not load the newly active model (%s); keeping %s", e, (self._route.sha256 or "")[:12])
                return self._route
            model, manifest, sha256, version = live.snapshot()
            if model is not None and sha256 != self._route.sha256:
                route = _route_for(model, manifest, sha256, version)
                if route.no_policy:
                    log.warning("%s: answering from the device alone", route.no_policy)
                log.info("device model switched to %s (version %s)", (sha256 or "")[:12], version)
                self._route = route
            return self._route

    def _run_device(self, route: _Route, xs: np.ndarray) -> tuple[np.ndarray | None, str]:
        """The device outputs ``[n, classes]`` as float64, or None and what went wrong."""
        model = route.model
        try:
            with self._device_lock:
                name = route.policy.score_output if route.policy is not None else None
                if name:
                    raw = model.run({model.inputs[0].name: xs})[name]
                else:
                    raw = model.predict(xs)
            out = np.asarray(raw, dtype=np.float64)
        except Exception as e:  # noqa: BLE001 - a failing device model is escalated, never raised to the caller
            log.warning("device model failed: %s: %s", type(e).__name__, str(e)[:200])
            return None, f"{type(e).__name__}: {str(e)[:160]}"
        want = (len(xs), route.classes) if route.classes is not None else None
        if out.ndim != 2 or len(out) != len(xs) or (want is not None and out.shape != want):
            return None, f"device output of shape {out.shape} for {len(xs)} inputs" + (f" of {route.classes} classes" if want else "")
        if not np.isfinite(out).all():
            return None, "device output holds NaN or infinity"
        return out, ""

    def _device_failed(self, route: _Route, xs: np.ndarray, problem: str, start: float, deadline: float) -> list[Prediction]:
        """Escalate everything the device could not answer; an explicit error result where the cloud cannot either."""
        cloud_out, reason = self._escalate(route, xs, deadline)
        answers = []
        for i in range(len(xs)):
            if cloud_out is not None:
                p = _as_probs(cloud_out[i])
                answers.append(Prediction(int(p.argmax()), p, "cloud", False, "device_error", 0.0, None, True, model_sha256=route.sha256))
            else:
                answers.append(Prediction(-1, np.empty(0), "none", False, "device_error", 0.0, None, True,
                                          error=f"device: {problem}; cloud: {reason}", model_sha256=route.sha256))
        return [self._finish(a, start) for a in answers]

    def _escalate(self, route: _Route, x: np.ndarray, deadline: float) -> tuple[np.ndarray | None, str]:
        """Cloud outputs ``[len(x), classes]``, or None and the reason the device answer stands."""
        if self.cloud is None:
            return None, "unreachable"
        if not self.breaker.allow():
            return None, "circuit_open"
        try:
            result = self.cloud.infer(x, deadline)
            outputs = np.asarray(result.outputs, dtype=np.float64)
            if outputs.ndim != 2 or len(outputs) != len(x) or (route.classes is not None and outputs.shape[1] != route.classes):
                raise CloudFailure("bad_response", f"outputs of shape {outputs.shape} for {len(x)} inputs of {route.classes} classes")
            if not np.isfinite(outputs).all():
                raise CloudFailure("bad_response", "outputs hold NaN or infinity")
        except CloudFailure as e:
            self.breaker.record_failure()
            log.debug("cloud failed: %s", e)
            return None, e.reason
        except Exception:  # noqa: BLE001 - whatever the cloud side does, the caller gets the device answer
            self.breaker.record_failure()
            log.exception("cloud client raised unexpectedly; answering from the device")
            return None, "bad_response"
        self.breaker.record_success()
        return outputs, ""

    def _finish(self, p: Prediction, start: float) -> Prediction:
        latency = (time.monotonic() - start) * 1000.0
        # ``p`` was built for this call and no one else holds it: set the latency in place rather than copying the
        # frozen dataclass (dataclasses.replace was the largest single cost of a confident call)
        object.__setattr__(p, "latency_ms", latency)
        if self.recorder is not None:
            try:
                # degraded answers are answers: counted as degraded, not as errors; errors are results without an answer
                self.recorder.record(latency_ms=latency, confidence=p.confidence, source=p.source, error=p.error,
                                     escalated=p.escalated, degraded=p.degraded)
            except Exception:  # noqa: BLE001 - telemetry must never cost the caller its answer
                log.exception("recorder failed; prediction returned anyway")
        return p

    @property
    def breaker_state(self) -> BreakerState:
        """The circuit breaker's state."""
        return self.breaker.state
