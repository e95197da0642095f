"""The realm catalog (realms/catalog.py) is what every other part reads: each entry's code names
resolve, its settings exist, and nothing keeps a list of its own."""

from __future__ import annotations

import inspect
import json

import msgspec
import pytest

from rentahal.node import config, control
from rentahal.node.config import Config, RealmConfig
from rentahal.realms.catalog import CATALOG, REALMS
from rentahal.realms.events import BadRequest


@pytest.mark.parametrize("name", REALMS)
def test_every_entry_resolves_and_names_real_settings(name: str) -> None:
    spec = CATALOG[name]
    assert spec.name == name and spec.summary and spec.model_formats
    assert spec.settings <= {f.name for f in msgspec.structs.fields(RealmConfig)}
    assert {"serve", "model", "slots", "queue_limit"} <= spec.settings
    assert inspect.iscoroutinefunction(spec.factory())
    with pytest.raises(BadRequest):  # an empty payload is no query of any realm
        spec.checker()({})
    assert spec.concurrency >= 1 and spec.text_field


def test_the_rest_of_the_node_reads_the_catalog() -> None:
    from rentahal.models import registry

    assert config.REALMS == registry.REALMS == REALMS
    assert set(Config().realms) == set(REALMS)
    limits = control.message_limits(Config())
    for name, spec in CATALOG.items():
        assert (limits[name] > limits["chat"]) == spec.media, name


@pytest.mark.parametrize("name", REALMS)
def test_each_realm_describes_its_form(name: str) -> None:
    """What the web UI builds a realm's panel from: its payload's fields with their bounds, and
    this node's caps where a setting caps a field (chat's max_tokens, imagine's steps)."""
    spec = CATALOG[name]
    settings = msgspec.structs.replace(Config().realms[name], max_tokens=77, max_steps=9)
    form = spec.form(settings)
    json.dumps(form)  # it travels as JSON
    fields = {f["name"]: f for f in form["fields"]}
    assert spec.text_field in fields and set(spec.media_fields) <= set(fields)
    assert all(fields[m]["kind"] == "bytes" for m in spec.media_fields)
    for field, setting in spec.caps.items():
        assert fields[field]["max"] == getattr(settings, setting)
        assert fields[field]["what"].endswith(f"..{getattr(settings, setting)}")
    assert all(
        f["kind"] in {"text", "integer", "number", "boolean", "bytes", "choice", "list", "object"}
        for f in fields.values()
    )
