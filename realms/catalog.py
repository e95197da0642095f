"""The realms a node can serve, each defined once, here.

A realm is what a user asks for (chat, vision, imagine, speech); this catalog says, for each one,
everything the rest of the node needs to know about it: its ``realms.<name>.*`` settings (a key
another realm has, such as ``realms.speech.n_ctx``, is an error, not silently ignored), how its
payload is checked before a query is stored, the backend that serves it and the pip extra that
backend needs, the model formats it loads, how large a websocket message for it may be, how the
CLI shapes a payload, and how many queries its backend really runs at once (``slots`` may not
promise more: every backend here serialises on one model context).

Adding a realm = one :class:`RealmDef` here + one backend (``models/``) and its factory
(``node/executor.py``). Code names live in strings and are imported on use: this module imports
nothing heavy, and ``realms/`` stays free of ``node/`` and ``models/``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .schema import form as payload_form

# Settings every realm has: whether and what to serve, its queue, its price, who may use it.
COMMON_SETTINGS = frozenset({
    "serve", "model", "slots", "queue_limit", "threads", "cost_per_query", "cost_per_second", "allow", "trusted",
})  # fmt: skip
LLAMA_SETTINGS = frozenset({"n_ctx", "n_gpu_layers", "max_tokens", "cost_per_token"})
# A realm that may be served by an external model server (models/external.py) instead.
EXTERNAL_SETTINGS = frozenset({"url", "api", "remote_model", "key_env", "key_file"})


@dataclass(frozen=True)
class RealmDef:
    name: str
    summary: str  # one line, for --help, `realms` and the README
    settings: frozenset[str]  # the realms.<name>.* keys that apply to it
    backend: str  # "module:function": async factory(LocalRealms, RealmConfig) -> backend
    check_payload: str  # "module:function": raises BadRequest for a payload no executor would take
    payload: str  # "module:Struct": what a payload may say (realms/schema.py; forms in the UI)
    model_formats: str  # what realms.<name>.model may name
    store_formats: tuple[str, ...]  # what `rentahal-node models add/pull` takes (models/registry.py)
    canary: str  # "module:function": (words, seed) -> a deterministic payload for spot-checks
    extra: str | None = None  # `pip install rentahal-node[<extra>]` for its backend, if any
    concurrency: int = 1  # queries its backend runs at once (the most `slots` may say)
    media: bool = False  # its payloads carry media: websocket messages up to storage.max_payload_bytes
    text_field: str = "prompt"  # the payload field the CLI's positional text goes to
    media_fields: tuple[str, ...] = ()  # payload fields the CLI fills from files (--image, --audio)
    media_replaces_text: bool = False  # a media file given, the text is not sent (speech: transcribe)
    defaults: Mapping[str, Any] = field(default_factory=dict)  # realm-specific setting defaults
    # payload field -> the realms.<name>.* setting that caps it on this node (max_tokens, steps)
    caps: Mapping[str, str] = field(default_factory=dict)

    def checker(self) -> Callable[[dict[str, Any]], None]:
        checker: Callable[[dict[str, Any]], None] = _resolve(self.check_payload)
        return checker

    def canary_payload(self, words: str, seed: int) -> dict[str, Any]:
        payload: dict[str, Any] = _resolve(self.canary)(words, seed)
        return payload

    def payload_type(self) -> type:
        payload_type: type = _resolve(self.payload)
        return payload_type

    def form(self, settings: Any = None) -> dict[str, Any]:
        """What a client needs to build this realm's form (the web UI does): its fields with
        their bounds (realms/schema.py ``form``), capped by this node's ``settings`` (a
        RealmConfig) where a setting caps a field."""
        fields = payload_form(self.payload_type())
        for f in fields:
            setting = self.caps.get(f["name"])
            if setting is not None and settings is not None:
                f["max"] = getattr(settings, setting)
                f["what"] = f"an integer in {f.get('min', 1)}..{f['max']}"
        return {
            "realm": self.name,
            "summary": self.summary,
            "text_field": self.text_field,
            "media_fields": list(self.media_fields),
            "media_replaces_text": self.media_replaces_text,
            "fields": fields,
        }

    def factory(self) -> Callable[..., Any]:
        factory: Callable[..., Any] = _resolve(self.backend)
        return factory


def _resolve(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


CATALOG: Mapping[str, RealmDef] = MappingProxyType({
    r.name: r
    for r in (
        RealmDef(
            "chat", "text generation with an LLM (llama.cpp, or an external OpenAI/Anthropic-API server)",
            COMMON_SETTINGS | LLAMA_SETTINGS | EXTERNAL_SETTINGS,
            backend="rentahal.node.executor:chat_backend",
            check_payload="rentahal.models.chat:check_payload", payload="rentahal.models.chat:ChatPayload",
            caps={"max_tokens": "max_tokens"},
            model_formats="a GGUF file (a path, store:<name> or hf:<repo>/<file>)",
            store_formats=("gguf",), canary="rentahal.models.chat:canary",
        ),
        RealmDef(
            "vision", "questions about an image (a LLaVA-style GGUF and its projector)",
            COMMON_SETTINGS | LLAMA_SETTINGS | {"mmproj"},
            backend="rentahal.node.executor:vision_backend",
            check_payload="rentahal.models.vision:check_payload", payload="rentahal.models.vision:VisionPayload",
            caps={"max_tokens": "max_tokens"},
            model_formats="a GGUF file and its mmproj GGUF", media=True, media_fields=("image",),
            # A plain GGUF is accepted: its projector is then named by realms.vision.mmproj.
            store_formats=("gguf+mmproj", "gguf"), canary="rentahal.models.vision:canary",
        ),
        RealmDef(
            "imagine", "text to image (diffusers, torch)",
            COMMON_SETTINGS | {"max_steps", "max_pixels"},
            backend="rentahal.node.executor:imagine_backend",
            check_payload="rentahal.models.imagine:check_payload", payload="rentahal.models.imagine:ImaginePayload",
            caps={"steps": "max_steps"},
            model_formats="a diffusers pipeline folder", extra="image", media=True,
            store_formats=("diffusers",), canary="rentahal.models.imagine:canary",
        ),
        RealmDef(
            "speech", "speech to text (whisper.cpp) and text to speech (espeak-ng)",
            COMMON_SETTINGS,
            backend="rentahal.node.executor:speech_backend",
            check_payload="rentahal.models.speech:check_payload", payload="rentahal.models.speech:SpeechPayload",
            model_formats="a whisper.cpp ggml .bin file", extra="speech", media=True, text_field="text",
            media_fields=("audio",), media_replaces_text=True,
            store_formats=("ggml-whisper",), canary="rentahal.models.speech:canary",
        ),
    )
})  # fmt: skip

REALMS: tuple[str, ...] = tuple(CATALOG)

# A payload field for the router, not the backend: "model" asks for executors serving that
# model (the OpenAI API's `model`); the executor checks it and hands the backend the rest.
MODEL_FIELD = "model"
MAX_MODEL_NAME = 256


def wanted_model(payload: Mapping[str, Any]) -> str | None:
    """The model a payload asks for, if any; ValueError names what is wrong with it."""
    model = payload.get(MODEL_FIELD)
    if model is None:
        return None
    if not isinstance(model, str) or not 1 <= len(model) <= MAX_MODEL_NAME or not model.isprintable():
        raise ValueError(f"payload.{MODEL_FIELD}: expected a model name of 1..{MAX_MODEL_NAME} printable characters")
    return model


def backend_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload without its routing fields: what the realm's backend is given."""
    return payload if MODEL_FIELD not in payload else {k: v for k, v in payload.items() if k != MODEL_FIELD}


def realm(name: str) -> RealmDef:
    """The realm called ``name``; KeyError names the known ones."""
    try:
        return CATALOG[name]
    except KeyError:
        raise KeyError(f"unknown realm {name!r}; expected one of {', '.join(REALMS)}") from None
