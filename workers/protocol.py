"""The engine protocol: every message between the worker process and the engine, typed.

::

    worker -> engine   ToEngine   = RunBatch | CancelBatch | Stop
    engine -> worker   FromEngine = Ready | LoadFailed | Swapped | Started | Step | Done | Failed

The engine process is started with an ``EngineConfig`` (the models it may run, each a
``ModelSpec``) and answers ``Ready`` (or ``LoadFailed``) once its first model is loaded
and warm. Then, per batch: ``RunBatch`` in; ``Swapped`` first when the batch's model had
to be loaded (evicting others to stay within the memory budget), ``Started``, a ``Step``
at every step boundary, and ``Done`` or ``Failed`` out.
``CancelBatch`` stops a batch at its next step boundary (``Done(canceled=True)``);
``Stop`` lets the engine finish what it was sent and exit.

Step-level batching (``RunBatch.join``, issue 26): the batch does not wait for the running
ones to end. At the next step boundary it joins them (``Started``), each batch in the
running group keeps its own ``Step`` count, and each ends with its own ``Done`` as soon as
its own steps are done, while the others run on. A batch that cannot join (another model,
size, scheduler or adapters, a request-level batch, no room) waits until the group drains,
and so does every batch sent after it: the engine keeps the order it was sent.

Each direction is a closed union, and both ends dispatch on it with ``match`` ending in
``assert_never``: a message added here that one end does not handle is a type error
(``mypy --strict`` runs over this module in CI). What arrives over the pipe is only an
``object`` until ``to_engine``/``from_engine`` has checked it is one of the union: a
message outside it raises ``UnknownMessage``, which each end turns into a failed batch
(retried by the runner) or an engine restart, never a message silently dropped.

Why frozen dataclasses, not msgspec or pydantic: both ends are the same code (the worker
spawns the engine from its own install), so there is no foreign or older peer whose input
needs validating, only an agreement on the set of messages, which the type checker
proves. The messages cross a ``multiprocessing`` pipe, which pickles them: a dataclass
pickles as it is, numpy arrays included, with no codec to write. And the engine's one
thread sends a ``Step`` per denoising step, where per-message validation would be time
taken from the device's launcher. msgspec would add a dependency and an array codec for
no gain here.

Images leave the engine as one ``(n, height, width, 3)`` uint8 array per batch, written
into a shared-memory block the worker allocated (``RunBatch.output``, see ``images_view``),
or in ``Done.images`` when the batch named no block (the engine on a thread).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

from tasks.errors import UnknownMessage
from tasks.settings import BatchingMode, CompileMode, Quantization, WarmShape
from workers.work import CompatKey, Images, ImageWork


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """How the engine loads one model: its registry entry's part that the engine needs."""

    ref: str  # a diffusers directory, a hub id, or a sim: spec
    name: str = ""  # what ``CompatKey.model`` calls it (the registry's name); "": ``ref``
    dtype: str = "auto"
    quantize: Quantization = "none"
    warm: tuple[WarmShape, ...] = ()
    #: The LoRA adapters a batch may name: (adapter name, its directory or file).
    loras: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> str:
        return self.name or self.ref


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """What the engine process is started with (the spawn argument): the models it may run,
    the first loaded at start and the others when a batch needs them, keeping the most
    recently used within ``memory_budget`` bytes of weights (0: no budget)."""

    models: tuple[ModelSpec, ...]
    device: str = "auto"
    compile: CompileMode = "off"
    compile_cache_dir: str = ""
    #: Environment set in the engine before torch is imported (device pinning).
    env: tuple[tuple[str, str], ...] = ()
    log_format: str = "text"  # FLEET_LOG_FORMAT
    memory_budget: int = 0

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("an engine needs at least one model")

    @classmethod
    def one(
        cls,
        ref: str,
        *,
        dtype: str = "auto",
        quantize: Quantization = "none",
        warm: tuple[WarmShape, ...] = (),
        loras: tuple[tuple[str, str], ...] = (),
        **engine: Any,
    ) -> EngineConfig:
        """An engine of the one model ``ref``."""
        return cls((ModelSpec(ref, dtype=dtype, quantize=quantize, warm=warm, loras=loras),), **engine)

    @property
    def model(self) -> ModelSpec:
        """The model loaded at start."""
        return self.models[0]

    def environment(self) -> dict[str, str]:
        """What the engine sets before torch is imported: ``env``, and in compiled mode the
        compilers' caches (read once, when the compilers load)."""
        environment = dict(self.env)
        if self.compile != "off":
            environment |= {"TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}
            if self.compile_cache_dir:
                environment["TORCHINDUCTOR_CACHE_DIR"] = str(Path(self.compile_cache_dir) / "inductor")
                environment["TRITON_CACHE_DIR"] = str(Path(self.compile_cache_dir) / "triton")
        return environment


# -- worker -> engine ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Join:
    """Step-level batching: the batch joins the running batches of compatible slots
    (``CompatKey.joins``) at a step boundary, while they hold, with it, at most
    ``max_images`` images; each leaves once its own steps are done."""

    max_images: int

    def __post_init__(self) -> None:
        if self.max_images < 1:
            raise ValueError("a step-level batch joins at most max_images >= 1 images")


@dataclass(frozen=True, slots=True)
class RunBatch:
    """Run these images after the batches sent before it: as one model call of their own
    (request-level batching, ``join`` None) or joining the running slots (``Join``)."""

    batch_id: int
    key: CompatKey
    work: tuple[ImageWork, ...]
    output: str = ""  # shared-memory block for the images; "" sends them in ``Done``
    join: Join | None = None


@dataclass(frozen=True, slots=True)
class CancelBatch:
    """Stop this batch at its next step boundary (or never start it)."""

    batch_id: int


@dataclass(frozen=True, slots=True)
class Stop:
    """Finish the batches already sent, then exit."""


ToEngine: TypeAlias = RunBatch | CancelBatch | Stop


# -- engine -> worker ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Ready:
    """The model is loaded and warm: batches may come."""

    model_name: str
    pid: int
    load_s: float
    warm_s: float
    warmed: tuple[str, ...] = ()
    batching: BatchingMode = "request"  # what FLEET_BATCHING=auto runs the model's batches with


@dataclass(frozen=True, slots=True)
class LoadFailed:
    """The model could not be loaded or warmed; the engine exits."""

    error: str


@dataclass(frozen=True, slots=True)
class Swapped:
    """The next batch's model was not loaded: it is now (``load_s`` to load, ``warm_s`` to
    warm), and ``resident`` are the models loaded after the least recently used were
    evicted to make room."""

    batch_id: int
    model: str
    load_s: float
    warm_s: float
    resident: tuple[str, ...]
    batching: BatchingMode = "request"  # as Ready's, for this model


@dataclass(frozen=True, slots=True)
class Started:
    """The batch's model call began."""

    batch_id: int


@dataclass(frozen=True, slots=True)
class Step:
    """The batch's call finished ``step`` of ``total`` denoising steps."""

    batch_id: int
    step: int
    total: int


@dataclass(frozen=True, slots=True)
class Done:
    """The call returned (or was stopped early: ``canceled``)."""

    batch_id: int
    inference_s: float
    canceled: bool = False
    images: Images | None = field(default=None, repr=False)  # only when not in shared memory
    #: GPU bytes (allocated, reserved, peak during the call) when the model reports them.
    memory: tuple[int, int, int] | None = None
    #: Step-level: the mean images of the model calls its steps ran in (its own and its
    #: neighbours'); 0: it ran as a call of its own.
    shared_images: float = 0.0


@dataclass(frozen=True, slots=True)
class Failed:
    """The call raised; ``out_of_memory`` when the device ran out of memory."""

    batch_id: int
    error: str
    out_of_memory: bool = False
    #: Step-level: the images of the model call that failed, its neighbours' included;
    #: 0: a call of the batch's own.
    call_images: int = 0


FromEngine: TypeAlias = Ready | LoadFailed | Swapped | Started | Step | Done | Failed

_TO_ENGINE = (RunBatch, CancelBatch, Stop)
_FROM_ENGINE = (Ready, LoadFailed, Swapped, Started, Step, Done, Failed)


def to_engine(message: object) -> ToEngine:
    """What the engine received, checked: raises ``UnknownMessage`` for anything else."""
    if isinstance(message, _TO_ENGINE):
        return message
    raise _unknown(message, "the engine")


def from_engine(message: object) -> FromEngine:
    """What the worker received, checked: raises ``UnknownMessage`` for anything else."""
    if isinstance(message, _FROM_ENGINE):
        return message
    raise _unknown(message, "the worker")


def _unknown(message: object, receiver: str) -> UnknownMessage:
    batch_id: Any = getattr(message, "batch_id", None)
    return UnknownMessage(
        f"{receiver} got a message outside the engine protocol: {type(message).__qualname__} "
        f"({message!r:.200}); are the worker and the engine the same version?",
        batch_id if isinstance(batch_id, int) else None,
    )


# -- images ---------------------------------------------------------------------------------
def image_bytes(key: CompatKey, images: int) -> int:
    """The size of the shared-memory block for ``images`` images of ``key``'s shape."""
    return images * key.height * key.width * 3


def images_view(buffer: memoryview | None, batch: RunBatch) -> Images:
    """The batch's images as an array over a shared-memory block's buffer (no copy)."""
    if buffer is None:
        raise ValueError(f"the shared-memory block of batch {batch.batch_id} is closed")
    return np.ndarray((len(batch.work), batch.key.height, batch.key.width, 3), dtype=np.uint8, buffer=buffer)
