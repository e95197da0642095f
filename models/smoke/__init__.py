"""Smoke-test models: tiny random-weight models a fresh node (or CI) writes itself, loaded through
the same code path real weights take. The writers (``tiny_llama``, ``tiny_vision``,
``tiny_diffusers``, ``tiny_whisper``) are imported only when a node has no model configured for
a realm, and by tests; the backends need only the markers below to say "this is a smoke-test
model" in what they advertise.
"""

from __future__ import annotations

from collections.abc import Mapping

SMOKE_TEST_MODEL_NAME = "rentahal-smoke-test"  # the name every smoke-test model reports
SMOKE_MARKER = "rentahal-smoke-test.json"  # the file that marks a tiny diffusers pipeline folder

# The tiny whisper's shape (tiny_whisper.py writes it; the speech backend recognises it).
WHISPER_N_STATE = 64
WHISPER_N_LAYER = 1


def is_tiny_whisper_hparams(hparams: Mapping[str, int]) -> bool:
    """True for the hyperparameters ``tiny_whisper.write_tiny_whisper`` writes (the marker)."""
    return (
        hparams.get("n_audio_state") == WHISPER_N_STATE
        and hparams.get("n_text_state") == WHISPER_N_STATE
        and hparams.get("n_audio_layer") == WHISPER_N_LAYER
        and hparams.get("n_text_layer") == WHISPER_N_LAYER
    )
