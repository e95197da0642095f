"""The realm catalog (realms/catalog.py) is what every other part reads: each entry's code names
resolve, its settings exist, and nothing keeps a list of its own."""

from __future__ import annotations

import inspect

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
