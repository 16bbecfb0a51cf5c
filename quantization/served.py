"""The contract between the quality gate and a served-path check (which lives with the server).

The gate measures transformers' plain forward; replicas run another path (fused projections, a
slot KV cache, packed prefill, prefix-cache hits, the chat template). A `ServedPathCheck` loads the
candidate the way a replica does and says how far that path is from the transformers forward of
the same artifact. It is injected (the CLI passes the serving package's implementation), so this
package never imports the server.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class ChatProbe:
    """A chat question whose greedy answer from the FP16 model states `key_fact`."""

    question: str
    key_fact: str


DEFAULT_CHAT_PROBES = (
    ChatProbe("What is the capital of France?", "Paris"),
    ChatProbe("Which city is the capital of France? Answer in one sentence.", "Paris"),
)


@dataclass(frozen=True)
class ChatAnswer:
    question: str
    key_fact: str
    reference_answer: str  # the FP16 model's greedy answer (transformers generate)
    served_answer: str  # the candidate's greedy answer through the serving engine

    @property
    def reference_has_fact(self) -> bool:
        return self.key_fact.lower() in self.reference_answer.lower()

    @property
    def served_has_fact(self) -> bool:
        return self.key_fact.lower() in self.served_answer.lower()


@dataclass(frozen=True)
class ServedCheckResult:
    """Serving engine vs transformers forward of the same artifact, per next-token position."""

    kl_per_token: float  # mean KL(transformers || engine), nats
    top1_agreement: float
    tokens_compared: int
    kl_by_path: dict[str, float]  # packed_prefill, chunked_prefill, prefix_hit, decode
    chat: list[ChatAnswer] = field(default_factory=list)
    engine: str = ""

    @property
    def facts_lost(self) -> list[ChatAnswer]:
        """Probes where FP16 states the fact and the served candidate does not."""
        return [a for a in self.chat if a.reference_has_fact and not a.served_has_fact]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServedCheckResult:
        chat = [ChatAnswer(**a) for a in data.get("chat", [])]
        return cls(**{**data, "chat": chat})


@runtime_checkable
class ServedPathCheck(Protocol):
    """Loads `candidate_dir` as a replica would and compares it with its transformers forward.

    `key` names everything the result depends on besides the inputs (engine code, settings), so a
    cached result is reused only for the same engine.
    """

    key: str

    def __call__(
        self,
        reference_dir: Path,
        candidate_dir: Path,
        prompts: list[list[int]],
        chat: list[ChatProbe],
    ) -> ServedCheckResult: ...
