"""Where an experiment's jobs run: in this process on the one loaded pair, or on Ray actors that each hold a pair.

A job is a module-level function `task(decoder, item) -> result` and one picklable item. `Workers.map` yields an
`Outcome` per item as it finishes; the caller alone writes caches and outputs, so a cluster needs no shared
filesystem and a resumed run skips exactly what was written. A job that raises is an Outcome with its error and the
others go on. On Ray (`RayWorkers`) each actor loads its pair once, jobs go to actors as they free up, and an actor
lost with its process or its node costs only the job it held: that job runs again on another actor, and the actor
rejoins when Ray has restarted it.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from hlm.errors import UserError
from hlm.estimators import REGISTRY as ESTIMATORS
from hlm.models.numerics import without_draft
from hlm.policies import REGISTRY as POLICIES
from hlm.rows import BLOCK_ENV, pinned_block

if TYPE_CHECKING:
    from tqdm import tqdm

    from hlm.config import DeviceProfile, LinkConfig, RunConfig
    from hlm.decoder import HybridDecoder
    from hlm.estimators import SelectionCalibration
    from hlm.models.pairs import Calibration

T = TypeVar("T")
Task = Callable[["HybridDecoder", Any], Any]
LOCAL_NAME = "local"


@dataclass(frozen=True)
class Outcome(Generic[T]):
    item: T
    result: Any = None
    error: str | None = None  # "TypeName: message" of a job that raised
    worker: str = LOCAL_NAME


@dataclass(frozen=True)
class PairFacts:
    """What the driver needs of the pair without holding one: cache keys, thresholds, the selection calibration."""

    numerics: str
    block_rows: int  # the verifier's (`hlm.rows`): what the other workers of a run are told to take
    calibration: Calibration | None
    selection: SelectionCalibration
    description: dict[str, Any]
    attention_path: str = ""  # `ModelPair.attention_path`

    def run_key(self, config: RunConfig) -> list[str]:
        """What a cached run of `config` depends on beside its prompt and config: the pair's numerics (without the
        draft's for a policy that never drafts: the LLM alone is not decoded again when only the draft changed) and,
        where the policy asks an estimator, the selection calibration it asks (a refit must never be served the runs
        of the fit before it) and, where that estimator reads attention weights, the path that computes them if it is
        not the draft the numerics name (runs made before llama.cpp read them keep their keys)."""
        policy = POLICIES[config.policy.name]
        numerics = self.numerics if policy.drafts else without_draft(self.numerics)
        if not policy.uses_estimator:
            return [numerics]
        reads = ESTIMATORS[config.policy.estimator].attention and self.attention_path
        return [numerics, self.selection.digest, *([reads] if reads else [])]


def facts_of(decoder: HybridDecoder) -> PairFacts:
    pair = decoder.pair
    return PairFacts(pair.numerics, pair.verifier_block_rows, pair.calibration, pair.selection, pair.describe(),
                     pair.attention_path)


def energy_methods(decoder: HybridDecoder, item: tuple[LinkConfig, DeviceProfile]) -> dict[str, str]:
    """A task: how the worker's decoder obtains each energy part (it depends on the worker's hardware)."""
    return decoder.energy_methods(*item)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Workers(Protocol):
    facts: PairFacts

    def map(self, task: Task, items: Sequence[T], bar: tqdm | None = None,
            size: Callable[[T], int] = lambda item: 1) -> Iterator[Outcome[T]]:
        """One Outcome per item, in completion order; `bar` advances by `size(item)` per outcome."""
        ...

    def close(self) -> None: ...


def call(workers: Workers, task: Task, item: Any) -> Any:
    """`task(item)` on one worker; its error raised here."""
    outcome = next(iter(workers.map(task, [item])))
    if outcome.error:
        raise RuntimeError(outcome.error)
    return outcome.result


class LocalWorkers:
    """Every job in this process, in order, on the one decoder."""

    def __init__(self, decoder: HybridDecoder) -> None:
        self.decoder, self.facts = decoder, facts_of(decoder)

    def map(self, task: Task, items: Sequence[T], bar: tqdm | None = None,
            size: Callable[[T], int] = lambda item: 1) -> Iterator[Outcome[T]]:
        for item in items:
            try:
                outcome = Outcome(item, task(self.decoder, item))
            except Exception as exc:  # noqa: BLE001 - one job's failure is reported; the others go on
                outcome = Outcome(item, error=_error(exc))
            if bar is not None:
                bar.update(size(item))
            yield outcome

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class PairSpec:
    """How each actor opens its decoder: `hlm.session.open_decoder`'s arguments."""

    models: str
    device: str | None = None
    dtype: str | None = None
    quant: str = "auto"
    cloud: str | None = None


class _PairActor:
    """One model pair, loaded once; runs the jobs it is given (a Ray actor class, made remote in `RayWorkers`)."""

    def __init__(self, spec: PairSpec) -> None:
        from hlm import session

        self.decoder = session.open_decoder(spec.models, spec.device, spec.dtype, spec.quant, spec.cloud)

    def facts(self) -> PairFacts:
        return facts_of(self.decoder)

    def ready(self) -> bool:
        return True

    def run(self, task: Task, item: Any) -> Any:
        return task(self.decoder, item)


@dataclass
class _Pending:
    """What the driver waits on: a job on an actor, or a ping to an actor that failed (it rejoins when it answers)."""

    actor: int
    item: Any = None
    is_job: bool = True


@dataclass
class RayWorkers:
    """`n` actors, each holding the pair `spec` with `cpus`/`gpus` Ray resources (one pair per GPU with gpus=1)."""

    spec: PairSpec
    n: int = 1
    cpus: float = 1.0
    gpus: float = 0.0
    address: str = "local"
    patience_s: float = 600.0  # with every actor lost this long, the run stops (what finished is kept)
    done: Counter[str] = field(default_factory=Counter)  # jobs finished per actor, for the progress bar
    requeued: int = 0  # jobs that were on a lost actor and went back in the queue

    def __post_init__(self) -> None:
        from hlm import cluster

        self.actors: list[Any] = []  # every actor started and not stopped (`close` stops them)
        if self.n < 1 or self.cpus <= 0 or self.gpus < 0:
            raise UserError("--workers must be at least 1, --worker-cpus above 0 and --worker-gpus at least 0")
        self._started = cluster.connect(self.address)
        import ray

        total = ray.cluster_resources()
        if total.get("CPU", 0) < self.n * self.cpus or total.get("GPU", 0) < self.n * self.gpus:
            self.close()
            raise UserError(f"the cluster has {total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs; "
                            f"{self.n} workers of {self.cpus:g} CPUs and {self.gpus:g} GPUs do not fit")
        # The verifier's block is measured at load, and a timing near the middle comes out either way: one actor
        # measures it, then every actor (a restarted one too) is told to take it.
        block = pinned_block() or self._facts([self._start({})])[0].block_rows
        self._stop_actors()
        facts = self._facts([self._start({BLOCK_ENV: str(block)}) for _ in range(self.n)])
        if len({f.numerics for f in facts}) > 1:
            self.close()
            raise UserError("workers run the pair with different numerics "
                            f"({sorted({f.numerics for f in facts})}): pass --dtype and --quant explicitly")
        self.facts = facts[0]

    def _start(self, env: dict[str, str]) -> Any:
        """An actor with `env` beside the job's environment variables (Ray merges the two), kept in `actors`."""
        import ray

        remote = ray.remote(max_restarts=-1, max_task_retries=0)(_PairActor)
        actor = remote.options(num_cpus=self.cpus, num_gpus=self.gpus, runtime_env={"env_vars": env}).remote(self.spec)
        self.actors.append(actor)
        return actor

    def _facts(self, actors: list[Any]) -> list[PairFacts]:
        import ray

        try:
            return ray.get([a.facts.remote() for a in actors], timeout=self.patience_s)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            self.close()
            raise UserError(f"the workers could not start with {self.spec.models!r} within {self.patience_s:.0f} s "
                            f"(resources taken by other jobs, or a load error): {exc}") from exc

    def map(self, task: Task, items: Sequence[T], bar: tqdm | None = None,
            size: Callable[[T], int] = lambda item: 1) -> Iterator[Outcome[T]]:
        import ray

        queue, idle, pending = list(items), list(range(self.n)), {}
        lost_since: float | None = None
        while queue or any(p.is_job for p in pending.values()):
            while queue and idle:
                i, item = idle.pop(0), queue.pop(0)
                pending[self.actors[i].run.remote(task, item)] = _Pending(i, item)
            if len(pending) == sum(not p.is_job for p in pending.values()):  # only pings: every actor is away
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > self.patience_s:
                    raise UserError(f"every worker has been lost for {self.patience_s:.0f} s; "
                                    f"{len(queue)} jobs did not run (finished ones are kept)")
            else:
                lost_since = None
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=None if lost_since is None else 5.0)
            if ready:
                yield from self._settle(ready[0], pending.pop(ready[0]), queue, idle, pending, bar, size)

    def _settle(self, ref: Any, p: _Pending, queue: list, idle: list[int], pending: dict, bar: tqdm | None,
                size: Callable[[Any], int]) -> Iterator[Outcome]:
        """A finished future: an outcome (the actor goes back to work), or a lost actor (its job goes back first in
        the queue, and a ping waits for the actor's restart)."""
        import ray

        try:
            result = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.ObjectLostError):
            if p.is_job:
                queue.insert(0, p.item)
                self.requeued += 1
                print(f"[ray] worker w{p.actor} lost; its job is queued again", file=sys.stderr, flush=True)
            else:
                time.sleep(1.0)  # still away: ask again in a moment
            pending[self.actors[p.actor].ready.remote()] = _Pending(p.actor, is_job=False)
            return
        except ray.exceptions.RayTaskError as exc:
            idle.append(p.actor)
            cause = getattr(exc, "cause", None) or exc
            yield self._counted(Outcome(p.item, error=_error(cause), worker=f"w{p.actor}"), bar, size)
            return
        idle.append(p.actor)
        if p.is_job:
            yield self._counted(Outcome(p.item, result, worker=f"w{p.actor}"), bar, size)

    def _counted(self, outcome: Outcome, bar: tqdm | None, size: Callable[[Any], int]) -> Outcome:
        self.done[outcome.worker] += 1
        if bar is not None:
            bar.set_postfix_str(" ".join(f"{w}:{c}" for w, c in sorted(self.done.items())), refresh=False)
            bar.update(size(outcome.item))
        return outcome

    def _stop_actors(self) -> None:
        import ray

        if ray.is_initialized():
            for actor in self.actors:
                ray.kill(actor, no_restart=True)
        self.actors = []

    def close(self) -> None:
        """Stop the actors (also on Ctrl-C: their jobs are dropped; finished ones were already written)."""
        from hlm import cluster

        self._stop_actors()
        cluster.shutdown(self._started)
        self._started = False
