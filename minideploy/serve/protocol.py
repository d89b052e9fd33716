"""OpenAI-compatible request bodies, validated on arrival (a bad field is a 400 naming it).

Names and defaults follow LMDeploy's api_server (temperature 0.7, top_k 40, plus its
`repetition_penalty` and `ignore_eos` extensions); unknown fields are ignored, as
OpenAI clients send some this server has no use for.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..config import GenerationConfig

MAX_N = 16       # choices per request
MAX_STOP = 4     # stop strings per request (OpenAI's limit)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields chat and text completions share."""

    model_config = ConfigDict(allow_inf_nan=False)

    model: str
    max_tokens: Optional[int] = Field(None, ge=1, description="default: the rest of session_len")
    temperature: float = Field(0.7, ge=0, le=2, description="0 means greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(40, ge=0, description="0 disables top-k")
    repetition_penalty: float = Field(1.0, ge=0.01, le=10)
    n: int = Field(1, ge=1, le=MAX_N, description="choices to generate")
    stop: Optional[Union[str, Annotated[list[str], Field(max_length=MAX_STOP)]]] = None
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: Optional[StreamOptions] = None

    def stop_words(self) -> list[str]:
        words = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [w for w in words if w]

    def gen_configs(self, max_new_tokens: int) -> list[GenerationConfig]:
        """One config per choice; a seed gives choice i the seed + i, so choices differ."""
        # temperature 0 (or tiny: GenerationConfig.greedy) decodes greedily
        return [GenerationConfig(max_new_tokens=max_new_tokens, do_sample=self.temperature > 0,
                                 temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                 repetition_penalty=self.repetition_penalty, stop_words=self.stop_words(),
                                 ignore_eos=self.ignore_eos,
                                 random_seed=None if self.seed is None else (self.seed + i) % 2**63)
                for i in range(self.n)]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def as_dict(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)


class CompletionRequest(SamplingRequest):
    prompt: Union[str, Annotated[list[str], Field(min_length=1, max_length=MAX_N)]]

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
